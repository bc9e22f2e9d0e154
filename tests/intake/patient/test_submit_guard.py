"""The patient forms' guard: a person's form is never thrown away, and one form is one request.

The fill-time check counts from the first time the form was shown, through every re-render; a
form sent too soon comes back to be sent again; only a filled honeypot gets a decoy page. A form
sent twice (a double click, a resend, back and send again), even at the same instant, stores one
request and answers with its reference. Time is the app's clock, moved by the test; both
databases.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import pytest
from flask_babel import force_locale
from sqlalchemy import func, select

from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request
from intake.patient import views
from intake.patient.form_stamp import read_stamp
from tests.conftest import hidden_fields, reference_from, valid_contact, valid_refill
from tests.intake.staff.conftest import install_clock

MIN_FILL = 3


@pytest.fixture
def guarded(app, settings):
    """The app with a 3-second fill time and a 2-hour form age, as deployed."""
    app.extensions["intake.settings"] = settings.replace(
        min_fill_seconds=MIN_FILL, max_form_age_seconds=7200
    )
    return app


@pytest.fixture
def clock(guarded):
    return install_clock(guarded)


def stored(app) -> dict[str, int]:
    with app.app_context():
        submitted = select(func.count()).where(AuditEvent.action == "request.submitted")
        return {
            "requests": db.session.scalar(select(func.count()).select_from(Request)),
            "outbox": db.session.scalar(select(func.count()).select_from(OutboxMessage)),
            "submitted": db.session.scalar(submitted),
        }


def stored_reference(app, reference: str) -> Request | None:
    with app.app_context():
        row = db.session.execute(
            select(Request).where(Request.reference == reference)
        ).scalar_one_or_none()
        db.session.expunge_all()
        return row


def open_form(client, kind: str = "refill", lang: str = "en") -> dict[str, str]:
    page = client.get(f"/{kind}?lang={lang}")
    assert page.status_code == 200
    return hidden_fields(page.get_data(as_text=True))


def decisions(caplog) -> list[dict[str, Any]]:
    return [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "submission_decision"
    ]


def in_language(app, message, language: str) -> str:
    with app.test_request_context(), force_locale(language):
        return str(message)


def shown(html: str) -> str:
    return html.replace("&#39;", "'").replace("&amp;", "&")


# -- the fill time counts from the first render ------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "es"])
def test_a_correction_sent_at_once_after_an_error_is_stored(guarded, client, clock, lang):
    hidden = open_form(client, lang=lang)
    clock.advance(seconds=40)  # the patient fills the form, forgets one box
    error = client.post("/refill", data={**hidden, **valid_refill(consent_contact=None)})
    assert error.status_code == 400
    carried = hidden_fields(error.get_data(as_text=True))
    assert carried["rendered_at"] == hidden["rendered_at"], "the first render's stamp is kept"

    clock.advance(seconds=1)  # ticks the box and sends again at once
    sent = client.post("/refill", data={**carried, **valid_refill()})
    reference = reference_from(sent)
    row = stored_reference(guarded, reference)
    assert row is not None and (row.kind, row.language) == ("refill", lang)
    assert stored(guarded) == {"requests": 1, "outbox": 1, "submitted": 1}


def test_the_fill_time_is_not_restarted_by_a_re_render(guarded, client, clock):
    hidden = open_form(client, "contact")
    clock.advance(seconds=2)  # too soon, and with an error
    first = client.post("/contact", data={**hidden, **valid_contact(message="")})
    assert first.status_code == 400
    clock.advance(seconds=1.5)  # 3.5 s after the first render, 1.5 s after the second
    sent = client.post(
        "/contact", data={**hidden_fields(first.get_data(as_text=True)), **valid_contact()}
    )
    assert stored_reference(guarded, reference_from(sent)) is not None


@pytest.mark.parametrize("lang", ["en", "es"])
def test_a_form_sent_too_soon_comes_back_with_its_values(guarded, client, clock, caplog, lang):
    hidden = open_form(client, lang=lang)
    clock.advance(seconds=1)
    response = client.post("/refill", data={**hidden, **valid_refill(medication="Gamunex")})
    html = shown(response.get_data(as_text=True))
    assert response.status_code == 400
    assert "/thanks/" not in response.headers.get("Location", "")
    assert 'id="reference"' not in html, "never a confirmation for a request that was not stored"
    assert in_language(guarded, views.FORM_SEND_AGAIN, lang) in html
    assert 'value="Maria"' in html and 'value="Gamunex"' in html and "1234567" in html
    assert f'<html lang="{lang}">' in html
    assert stored(guarded)["requests"] == 0
    assert [d["outcome"] for d in decisions(caplog)] == ["too_fast"]

    clock.advance(seconds=MIN_FILL)  # the same form, sent again a moment later
    again = client.post("/refill", data={**hidden_fields(html), **valid_refill()})
    assert stored_reference(guarded, reference_from(again)) is not None


def test_a_csrf_re_render_keeps_the_stamp(guarded, client, clock):
    hidden = open_form(client)
    clock.advance(seconds=30)
    refused = client.post("/refill", data={**valid_refill(), **hidden, "csrf_token": "expired"})
    assert refused.status_code == 400
    carried = hidden_fields(refused.get_data(as_text=True))
    assert carried["rendered_at"] == hidden["rendered_at"]
    sent = client.post("/refill", data={**valid_refill(), **carried})
    assert stored_reference(guarded, reference_from(sent)) is not None


def test_an_expired_form_comes_back_with_a_new_stamp_that_can_be_sent_at_once(
    guarded, client, clock
):
    hidden = open_form(client)
    clock.advance(hours=3)
    stale = client.post("/refill", data={**hidden, **valid_refill()})
    html = shown(stale.get_data(as_text=True))
    assert stale.status_code == 400 and 'value="Maria"' in html
    assert in_language(guarded, views.FORM_STALE, "en") in html
    renewed = hidden_fields(html)
    assert renewed["rendered_at"] != hidden["rendered_at"]
    assert stored(guarded)["requests"] == 0
    # The patient was there for hours: sending the renewed form at once is not "too fast".
    sent = client.post("/refill", data={**renewed, **valid_refill()})
    assert stored_reference(guarded, reference_from(sent)) is not None


@pytest.mark.parametrize(
    "stamp",
    ["", "tampered", "refill-stamp-on-contact"],
    ids=["missing", "tampered", "other-form"],
)
def test_a_stamp_that_is_not_this_forms_is_replaced_not_carried(guarded, client, clock, stamp):
    refill_stamp = open_form(client)["rendered_at"]
    hidden = open_form(client, "contact")
    forged = refill_stamp if stamp == "refill-stamp-on-contact" else stamp
    clock.advance(seconds=60)
    response = client.post("/contact", data={**valid_contact(), **hidden, "rendered_at": forged})
    html = shown(response.get_data(as_text=True))
    assert response.status_code == 400
    assert in_language(guarded, views.FORM_SEND_AGAIN, "en") in html
    assert 'value="John"' in html
    renewed = hidden_fields(html)["rendered_at"]
    assert renewed not in (forged, hidden["rendered_at"])
    with guarded.test_request_context():
        assert read_stamp(renewed, "contact") is not None
    assert stored(guarded)["requests"] == 0


def test_only_a_filled_honeypot_gets_the_decoy(guarded, client, clock, caplog):
    hidden = open_form(client)
    clock.advance(seconds=30)
    decoy = client.post("/refill", data={**hidden, **valid_refill(extra_comments="buy now")})
    assert decoy.status_code == 200
    assert re.search(r'id="reference">R-[0-9A-Z]{4}-[0-9A-Z]{4}<', decoy.get_data(as_text=True))
    assert stored(guarded)["requests"] == 0
    # A browser's autofill has no reason to fill the honeypot: no autofill name, no tab stop.
    form = client.get("/refill").get_data(as_text=True)
    box = re.search(r'<div class="honeypot" aria-hidden="true">(.*?)</div>', form, re.S)
    assert box, "the honeypot is hidden from screen readers"
    field = re.search(r'<input[^>]*name="([a-z_]+)"[^>]*>', box.group(1))
    assert field and field.group(1) == "extra_comments"
    assert 'autocomplete="off"' in field.group(0) and 'tabindex="-1"' in field.group(0)
    assert 'name="website"' not in form
    assert [d["outcome"] for d in decisions(caplog)] == ["honeypot"]


def test_every_decision_is_logged_without_phi(guarded, client, clock, caplog):
    hidden = open_form(client)
    clock.advance(seconds=1)
    client.post("/refill", data={**hidden, **valid_refill()})  # too fast
    clock.advance(seconds=5)
    client.post("/refill", data={**hidden, **valid_refill(phone="12")})  # invalid
    client.post("/refill", data={**hidden, **valid_refill()})  # accepted
    client.post("/refill", data={**hidden, **valid_refill()})  # duplicate
    client.post("/refill", data={**hidden, **valid_refill(extra_comments="x")})  # honeypot
    other = open_form(client)
    clock.advance(hours=3)
    client.post("/refill", data={**other, **valid_refill()})  # stale
    logged = decisions(caplog)
    assert [(d["form"], d["outcome"]) for d in logged] == [
        ("refill", "too_fast"),
        ("refill", "invalid"),
        ("refill", "accepted"),
        ("refill", "duplicate"),
        ("refill", "honeypot"),
        ("refill", "stale"),
    ]
    assert logged[1]["fields"] == ["phone"]
    assert logged[2]["reference"] == logged[3]["reference"]
    text = json.dumps(logged, default=str)
    for phi in ("Maria", "Núñez", "1980-03-15", "555", "0143", "maria@example.com", "1234567"):
        assert phi not in text


# -- one form, one request ----------------------------------------------------------------------


def test_the_same_form_sent_again_answers_with_the_same_reference(guarded, client, clock):
    hidden = open_form(client)
    clock.advance(seconds=30)
    first = client.post("/refill", data={**hidden, **valid_refill()})
    reference = reference_from(first)
    # A resend after a lost answer, and the same answers again in the other language.
    again = client.post("/refill", data={**hidden, **valid_refill()})
    switched = client.post("/refill?lang=es", data={**hidden, **valid_refill()})
    for response in (again, switched):
        assert response.status_code == 303
        assert response.headers["Location"] == first.headers["Location"]
    assert stored(guarded) == {"requests": 1, "outbox": 1, "submitted": 1}
    thanks = client.get(again.headers["Location"])
    assert thanks.status_code == 200 and reference in thanks.get_data(as_text=True)


@pytest.mark.parametrize("lang", ["en", "es"])
def test_other_answers_under_a_used_key_never_see_the_first_reference(
    guarded, client, clock, caplog, lang
):
    """Whoever gets hold of a sent form's stamp (a shared computer's history, a saved page)
    and sends other answers with it is not told the first patient's reference, and gets no
    summary of the first request; the form comes back with a new key."""
    hidden = open_form(client, lang=lang)
    clock.advance(seconds=30)
    reference = reference_from(client.post("/refill", data={**hidden, **valid_refill()}))

    stranger = guarded.test_client()
    own = open_form(stranger, lang=lang)
    answers = valid_refill(first_name="Eve", date_of_birth="1990-01-01")
    reused = stranger.post("/refill", data={**answers, **own, "rendered_at": hidden["rendered_at"]})
    html = shown(reused.get_data(as_text=True))
    assert reused.status_code == 400 and "Location" not in reused.headers
    assert reference not in html
    with guarded.test_request_context(), force_locale(lang):
        expected = str(views.FORM_ALREADY_SENT) % {"phone": "(800) 555-0142"}
    assert expected in html and 'value="Eve"' in html
    renewed = hidden_fields(html)["rendered_at"]
    assert renewed != hidden["rendered_at"]
    # Nor a summary of it on its thanks page.
    assert 'id="received-at"' not in stranger.get(f"/thanks/{reference}").get_data(as_text=True)
    assert stored(guarded) == {"requests": 1, "outbox": 1, "submitted": 1}
    # The patient's own change after going back is refused the same way: the first request is
    # not silently answered for with the change thrown away.
    changed = client.post("/refill", data={**hidden, **valid_refill(notes="one more thing")})
    assert changed.status_code == 400 and "one more thing" in changed.get_data(as_text=True)
    # Sending the returned form again is a deliberate new request.
    again = stranger.post("/refill", data={**answers, **hidden_fields(html)})
    assert reference_from(again) != reference
    assert stored(guarded)["requests"] == 2
    assert "key_reused" in [d["outcome"] for d in decisions(caplog)]


def test_a_stamp_from_a_clock_ahead_is_not_too_fast_forever(guarded, client, clock):
    """A stamp signed by a web server whose clock runs ahead (or before this one's clock was
    stepped back) must not make every send "too fast" for as long as the gap."""
    hidden = open_form(client)
    clock.advance(minutes=-10)
    first = client.post("/refill", data={**hidden, **valid_refill()})
    assert first.status_code == 400  # too soon to tell it was filled
    carried = hidden_fields(first.get_data(as_text=True))
    with guarded.test_request_context():
        old, new = (read_stamp(h["rendered_at"], "refill") for h in (hidden, carried))
    assert old is not None and new is not None and new.key == old.key, "the same key, re-dated"
    clock.advance(seconds=MIN_FILL)
    sent = client.post("/refill", data={**carried, **valid_refill()})
    reference = reference_from(sent)
    # Still one form: a resend of either version of its stamp is the same request.
    again = client.post("/refill", data={**hidden, **valid_refill()})
    assert reference_from(again) == reference
    assert stored(guarded)["requests"] == 1


def test_each_new_form_gets_its_own_key(guarded, client, clock):
    first, second = open_form(client), open_form(client)
    with guarded.test_request_context():
        keys = {read_stamp(h["rendered_at"], "refill").key for h in (first, second)}  # type: ignore[union-attr]
    assert len(keys) == 2
    clock.advance(seconds=30)
    # Two forms really are two requests, even with the same answers.
    one = reference_from(client.post("/refill", data={**first, **valid_refill()}))
    two = reference_from(client.post("/refill", data={**second, **valid_refill()}))
    assert one != two and stored(guarded)["requests"] == 2
    # A form shown after sending one starts over with a new key.
    third = open_form(client)
    assert third["rendered_at"] not in (first["rendered_at"], second["rendered_at"])


def test_the_key_is_stored_only_as_a_keyed_hash(guarded, client, clock):
    hidden = open_form(client)
    with guarded.test_request_context():
        key = read_stamp(hidden["rendered_at"], "refill").key  # type: ignore[union-attr]
    clock.advance(seconds=30)
    reference = reference_from(client.post("/refill", data={**hidden, **valid_refill()}))
    row = stored_reference(guarded, reference)
    assert row is not None and row.submission_key_index
    assert key not in row.submission_key_index and len(row.submission_key_index) == 64
    with guarded.app_context():
        events = db.session.execute(select(AuditEvent.details)).scalars().all()
    assert all(key not in details for details in events)


def test_two_posts_of_one_form_at_the_same_instant_store_one_request(guarded, clock, caplog):
    """A double click: the same form, cookies and token, sent twice at once (real threads)."""
    rounds = 4
    references: list[set[str]] = []
    for _ in range(rounds):
        first, second = guarded.test_client(), guarded.test_client()
        hidden = open_form(first)
        session_cookie = first.get_cookie("intake_session")
        assert session_cookie is not None
        second.set_cookie("intake_session", session_cookie.value)
        clock.advance(seconds=30)
        barrier = threading.Barrier(2)
        answers: list[Any] = []
        errors: list[BaseException] = []

        def send(client, answers=answers, errors=errors, barrier=barrier, hidden=hidden):
            try:
                barrier.wait(timeout=10)
                answers.append(client.post("/refill", data={**hidden, **valid_refill()}))
            except BaseException as error:  # reported below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=send, args=(c,)) for c in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors, errors
        assert [a.status_code for a in answers] == [303, 303]
        references.append({reference_from(a) for a in answers})
    assert all(len(pair) == 1 for pair in references), references
    # How many losers were stopped by the database's unique index rather than the first check
    # (it depends on the timing; the domain test makes that path certain).
    raced = [d for d in decisions(caplog) if d.get("raced")]
    print(f"{len(raced)} of {rounds} duplicates were stopped by the unique index")
    assert stored(guarded) == {"requests": rounds, "outbox": rounds, "submitted": rounds}


@pytest.mark.parametrize("lang", ["en", "es"])
@pytest.mark.parametrize(
    "payload",
    [
        {"form": "refill", "key": ["a"], "at": 1},
        {"form": "refill", "key": "k", "at": "yesterday"},
        {"form": "refill", "key": "k", "at": float("inf")},
        {"form": "refill", "key": "k", "at": -1e20},
        {"form": "refill", "key": "k", "at": 253402300799.0},  # 9999-12-31
        {"form": "refill", "key": "k", "at": True},
        ["refill", "k", 1],
        "refill",
    ],
    ids=["key-list", "at-text", "at-inf", "at-far-past", "at-year-9999", "at-bool", "list", "str"],
)
def test_signed_but_malformed_stamps_get_the_form_back_never_a_500(
    guarded, client, clock, payload, lang
):
    """A stamp signed with the app's secret but holding nonsense (a leaked secret, a future
    format) is replaced or re-dated; the patient's answers come back in their language."""
    from intake.patient.form_stamp import _serializer

    hidden = open_form(client, lang=lang)
    with guarded.test_request_context():
        forged = _serializer().dumps(payload)
    clock.advance(seconds=30)
    response = client.post("/refill", data={**valid_refill(), **hidden, "rendered_at": forged})
    html = shown(response.get_data(as_text=True))
    assert response.status_code == 400 and 'value="Maria"' in html
    assert f'<html lang="{lang}">' in html
    assert stored(guarded)["requests"] == 0
    clock.advance(seconds=MIN_FILL)
    again = client.post("/refill", data={**valid_refill(), **hidden_fields(html)})
    assert stored_reference(guarded, reference_from(again)) is not None


def test_a_stamp_signed_with_another_apps_secret_is_not_carried(guarded, client, clock, make_app):
    """A stamp from another deployment (a staging site, a copy of the app) is not genuine."""
    other = make_app(guarded.extensions["intake.settings"].replace(secret_key="another-secret"))
    foreign = hidden_fields(other.test_client().get("/refill").get_data(as_text=True))
    hidden = open_form(client)
    clock.advance(seconds=30)
    response = client.post(
        "/refill", data={**valid_refill(), **hidden, "rendered_at": foreign["rendered_at"]}
    )
    assert response.status_code == 400
    assert hidden_fields(response.get_data(as_text=True))["rendered_at"] != foreign["rendered_at"]
    assert stored(guarded)["requests"] == 0


def test_other_answers_that_lose_the_race_do_not_see_the_first_reference(
    guarded, client, clock, monkeypatch
):
    """The loser of two simultaneous posts of one key is stopped by the unique index, not by
    the first look-up; with other answers it must still not be told the winner's reference."""
    hidden = open_form(client)
    clock.advance(seconds=30)
    reference = reference_from(client.post("/refill", data={**hidden, **valid_refill()}))
    monkeypatch.setattr(views, "find_submission", lambda *args: None)  # both passed the check
    raced = client.post("/refill", data={**hidden, **valid_refill(first_name="Eve")})
    assert raced.status_code == 400 and reference not in raced.get_data(as_text=True)
    same = client.post("/refill", data={**hidden, **valid_refill()})
    assert reference_from(same) == reference
    assert stored(guarded)["requests"] == 1
