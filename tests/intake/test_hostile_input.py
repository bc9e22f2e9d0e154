"""Hostile input: control characters, huge numbers and forged cursors get a plain 400 (or the
documented alternative), never a 500, and change nothing.

The documented alternatives: a queue cursor that is not one the app issues is ignored (the
first page is shown, as for no cursor); an audit ``seq`` in a path that cannot exist is a 404
(outside 0..2**63-1 in the ``before``/``after`` query it is a 400); an audit filter date outside
2000..2200, or a control character in an audit filter field, is a 400 with a message beside the
field.
A login refused for control characters never reaches authentication, so it writes nothing, not
even the ``user.login_failed`` event an ordinary wrong password writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.exc import DataError

from intake.audit.chain import record_event
from intake.extensions import db
from intake.models import PRIORITY_RANK, AuditEvent, BreakGlassReview, Request
from tests.conftest import Patient
from tests.intake.staff.conftest import (
    PASSWORD,
    FakeClock,
    StaffClient,
    StaffUser,
    create_staff_user,
    create_teams,
    database_values,
    events_since,
    install_clock,
    last_seq,
    login,
    post_login,
    queue_references,
    submit_routed,
)

BAD_REQUEST = "Something was wrong with that request"
SERVER_ERROR = "Something went wrong on our side"
BIGINT_MAX = 2**63 - 1
HUGE = "99999999999999999999999"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def clock(app: Flask) -> FakeClock:
    return install_clock(app)


@pytest.fixture
def teams(app: Flask) -> list[str]:
    return create_teams(app)


@pytest.fixture
def people(app: Flask, teams: list[str]) -> dict[str, StaffUser]:
    return {
        "ana": create_staff_user(app, "ana", "staff", ("refills-main",)),
        "dana": create_staff_user(app, "dana", "staff", ("clinical",)),
        "sam": create_staff_user(app, "sam", "supervisor"),
        "olivia": create_staff_user(app, "olivia", "compliance"),
    }


@pytest.fixture
def sign_in(
    app: Flask, clock: FakeClock, people: dict[str, StaffUser]
) -> Callable[[str], StaffClient]:
    def sign_in(name: str) -> StaffClient:
        client = app.test_client()
        login(client, people[name], clock)
        return StaffClient(client, people[name])

    return sign_in


def count(app: Flask, model: Any) -> int:
    with app.app_context():
        return int(db.session.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


def is_plain_400(response: Any) -> bool:
    return response.status_code == 400 and BAD_REQUEST in response.get_data(as_text=True)


def routed(app: Flask, patient: Patient, clock: FakeClock, **fields: Any) -> str:
    return submit_routed(app, patient, "refill", clock(), **fields)


# -- 1. control characters: login, path, query, form ------------------------------------------


@pytest.mark.parametrize(
    "username, password, otp",
    [
        ("ali\x00ce", PASSWORD, "123456"),  # the reviewed case: no such user
        ("ana", PASSWORD + "\x00", None),  # a real user, a NUL in the password
        ("ana", PASSWORD, "\x1b"),  # a real user, an escape as the code
    ],
)
def test_a_login_with_control_characters_is_refused_and_writes_nothing(
    app, clock, people, username, password, otp
):
    ana = people["ana"]
    since = last_seq(app)
    before = database_values(app)
    client = app.test_client()

    response = post_login(client, username, password, otp or ana.code(clock()))

    assert is_plain_400(response)
    # Not a row changed: no user.login_failed event, no failure counted, no session.
    assert database_values(app) == before
    assert client.get("/staff/queue").status_code == 302  # not logged in

    # For contrast, an ordinary wrong password is refused with exactly one event.
    wrong = post_login(client, "ana", "not-the-password", ana.code(clock()))
    assert wrong.status_code == 400
    assert [e.action for e in events_since(app, since)] == ["user.login_failed"]


@pytest.mark.parametrize("who, path", [
    ("ana", "/staff/requests/R-%00"),
    ("ana", "/staff/requests/R-7K3M-Q9P2%0a"),
    ("olivia", "/compliance/users/a%00"),
    ("olivia", "/compliance/access/R-%1b"),
    (None, "/nowhere%00"),
    (None, "/thanks/R-%00"),
])  # fmt: skip
def test_control_characters_in_the_path_are_a_400(app, sign_in, who, path):
    client = sign_in(who) if who else app.test_client()
    since = last_seq(app)
    assert is_plain_400(client.get(path))
    assert events_since(app, since) == []


@pytest.mark.parametrize("who, query", [
    # The audit filter's own fields answer beside the field (tests/intake/compliance/
    # test_audit_search.py); the rest of its query, and its export, are refused here.
    ("olivia", "/compliance/audit?actor=a&before=1%00"),
    ("olivia", "/compliance/audit.csv?actor=a%00"),  # an export that is refused is not recorded
    ("olivia", "/compliance/audit?reference=R-1&x%00=1"),
    ("olivia", "/compliance/access?reference=%00"),
    ("sam", "/staff/queue?after=%00"),  # the queue view would record phi.viewed
    ("sam", "/staff/queue?team=refills-main&x%00=1"),  # in a name, too
    ("sam", "/staff/search?last_name=O%00Brien&date_of_birth=1980-03-15"),
    ("sam", "/staff/search?reference=R-7K3M-Q9P2%09"),  # tab: no place in a query
    (None, "/staff/login?next=/staff/queue%00"),
])  # fmt: skip
def test_control_characters_in_the_query_are_a_400(app, sign_in, who, query):
    client = sign_in(who) if who else app.test_client()
    since = last_seq(app)
    assert is_plain_400(client.get(query))
    assert events_since(app, since) == []


def test_a_patient_name_of_control_characters_is_refused_beside_the_field(app, patient):
    # Patient forms drop control characters themselves (a stray paste should not cost the
    # patient their form); a name left empty by that is refused beside the field.
    response = patient.refill(first_name="\x00\x01", lang="es")
    assert response.status_code == 400
    assert 'id="first_name-error"' in response.get_data(as_text=True)
    assert count(app, Request) == 0 and count(app, AuditEvent) == 0


def test_patient_textareas_keep_their_newlines_and_tabs(app, patient):
    response = patient.refill(
        rx_numbers="1234567\r\n7654321", notes="Leave it at the side door.\r\n\tThank you"
    )
    assert response.status_code == 303
    assert count(app, Request) == 1


def test_a_break_glass_reason_with_a_nul_is_refused_and_not_recorded(app, patient, clock, sign_in):
    reference = routed(app, patient, clock, location="main")  # refills-main: not dana's team
    dana = sign_in("dana")
    since = last_seq(app)

    refused = dana.act(reference, "break-glass", reason="Weekend on-call\x00 cover for the team")
    assert is_plain_400(refused)
    assert events_since(app, since) == []

    opened = dana.act(reference, "break-glass", reason="Weekend on-call\r\ncover for the team")
    assert opened.status_code == 200
    assert [e.action for e in events_since(app, since)] == ["phi.break_glass", "phi.viewed"]


def test_a_review_comment_with_a_nul_is_refused_and_the_access_stays_pending(
    app, patient, clock, sign_in
):
    reference = routed(app, patient, clock, location="main")
    sign_in("dana").act(reference, "break-glass", reason="Weekend on-call cover for the team")
    seq = events_since(app)[-2].seq
    olivia = sign_in("olivia")
    since = last_seq(app)

    refused = olivia.post(
        f"/compliance/break-glass/{seq}/review",
        {"comment": "Checked\x00 with the roster.", "outcome": "appropriate"},
    )
    assert is_plain_400(refused)
    assert events_since(app, since) == [] and count(app, BreakGlassReview) == 0
    assert "Pending review (1)" in olivia.get("/compliance/break-glass").get_data(as_text=True)

    done = olivia.post(
        f"/compliance/break-glass/{seq}/review",
        {"comment": "Checked with the roster.\r\nJustified.", "outcome": "appropriate"},
    )
    assert done.status_code == 303 and count(app, BreakGlassReview) == 1


def test_a_value_the_database_rejects_is_a_400_and_rolled_back(app, backend, clock):
    """The backstop behind the check above: DataError is a 400, and the session is reusable."""

    def store_bad_value() -> str:
        record_event(db.session, actor="system:test", action="team.created", details={})
        if backend == "postgresql":
            # A NUL inside the transaction, as a bypass of the request check would send it.
            record_event(db.session, actor="system:test", action="team.created", reference="\x00")
            db.session.flush()
        else:
            # SQLite stores NUL; stand in for a value it would refuse.
            raise DataError("INSERT INTO audit_events ...", None, ValueError("refused"))
        db.session.commit()
        return "stored"

    app.add_url_rule("/_test/bad-value", view_func=store_bad_value)
    client = app.test_client()
    since = last_seq(app)

    assert is_plain_400(client.get("/_test/bad-value"))
    assert events_since(app, since) == []
    assert client.get("/healthz").status_code == 200
    assert client.get("/refill").status_code == 200


# -- 2. the queue cursor ------------------------------------------------------------------------


@pytest.mark.parametrize("cursor", [
    HUGE + "||",
    "1|0001-01-01T00:00:00-05:00|x",
    "1|9999-12-31T23:59:59+00:00|x",
    "1|1999-12-31T23:59:59+00:00|x",
    "1|2026-03-10T10:00:00|x",  # naive: not one the app issues
    "1|2026-03-10|x",
    "1|yesterday|x",
    "4||x",
    "-1||x",
    "\u0661||x",  # ARABIC-INDIC DIGIT ONE, which int() would read as 1
    "1||" + "f" * 37,
    "1||",
    "1",
    "1|2026-03-10T10:00:00+00:00",
    "1|2026-03-10T10:00:00+00:00|x|y",
    "x" * 5000,
])  # fmt: skip
def test_a_cursor_the_app_did_not_issue_shows_the_first_page(app, patient, clock, sign_in, cursor):
    made = [routed(app, patient, clock, location=place) for place in ("main", "north")]
    sam = sign_in("sam")
    first = queue_references(sam.queue_html())
    assert sorted(first) == sorted(made)
    version = sam.get("/staff/queue/version").get_json()["version"]

    assert queue_references(sam.queue_html("?after=" + quote(cursor))) == first
    forged = sam.get("/staff/queue/version?after=" + quote(cursor))
    assert forged.status_code == 200 and forged.get_json()["version"] == version

    # A cursor the app did issue still moves on past its row.
    with app.app_context():
        top = db.session.execute(
            sa.select(Request).where(Request.reference == first[0])
        ).scalar_one()
        issued = f"{PRIORITY_RANK[top.priority]}|{top.sla_due_at.isoformat()}|{top.id}"
    assert queue_references(sam.queue_html("?after=" + quote(issued))) == first[1:]


# -- 3. compliance dates and numbers -------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "until=9999-12-31",  # the reviewed case: one day more does not exist
    "since=9999-12-31",
    "since=1999-12-31",
    "until=0001-01-01 00:00",
    "since=2201-01-01&until=2201-01-02",
])  # fmt: skip
def test_dates_outside_2000_to_2200_get_a_message_beside_the_field(app, sign_in, query):
    olivia = sign_in("olivia")
    since = last_seq(app)

    response = olivia.get("/compliance/audit?" + query)
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert 'aria-invalid="true"' in html and "between 2000 and 2200" in html
    assert olivia.get("/compliance/audit.csv?" + query).status_code == 400
    assert events_since(app, since) == []  # no export recorded


def test_the_edges_of_the_date_range_are_accepted(sign_in):
    olivia = sign_in("olivia")
    response = olivia.get("/compliance/audit?since=2000-01-01&until=2200-12-31 23:59:59")
    assert response.status_code == 200
    assert "ana" in response.get_data(as_text=True)  # user.created events fall in the range


@pytest.mark.parametrize("query", [
    f"before={HUGE}", f"after={HUGE}", f"before={BIGINT_MAX + 1}", f"after=-{HUGE}", "before=-1",
])  # fmt: skip
def test_audit_page_bounds_outside_the_seq_range_are_a_400(sign_in, query):
    assert is_plain_400(sign_in("olivia").get("/compliance/audit?" + query))


def test_audit_page_bounds_at_the_edges_of_the_seq_range_work(sign_in):
    olivia = sign_in("olivia")
    newest = olivia.get(f"/compliance/audit?before={BIGINT_MAX}")
    assert newest.status_code == 200 and "ana" in newest.get_data(as_text=True)
    assert olivia.get(f"/compliance/audit?after={BIGINT_MAX}").status_code == 200
    assert olivia.get("/compliance/audit?before=0").status_code == 200


@pytest.mark.parametrize("seq", [HUGE, str(BIGINT_MAX + 1), str(BIGINT_MAX)])
def test_a_verification_number_that_cannot_exist_is_a_404(sign_in, seq):
    assert sign_in("olivia").get(f"/compliance/verify/{seq}").status_code == 404


def test_reviewing_a_break_glass_number_that_cannot_exist_is_a_404(app, sign_in):
    olivia = sign_in("olivia")
    since = last_seq(app)
    response = olivia.post(
        f"/compliance/break-glass/{HUGE}/review",
        {"comment": "Looks fine.", "outcome": "appropriate"},
    )
    assert response.status_code == 404
    assert "no break-glass access with that number" in response.get_data(as_text=True)
    assert events_since(app, since) == [] and count(app, BreakGlassReview) == 0


# -- 4. a small fuzz over the GET pages ----------------------------------------------------------

STAFF_PAGES = (
    "/staff/login?next={v}",
    "/staff/queue?after={v}",
    "/staff/queue?fragment=1&after={v}",
    "/staff/queue?status={v}",
    "/staff/queue?team={v}",
    "/staff/queue?kind={v}",
    "/staff/queue/version?after={v}",
    "/staff/search?reference={v}",
    "/staff/search?phone={v}",
    "/staff/search?last_name={v}&date_of_birth={v}",
    "/staff/search?last_name=Smith&date_of_birth={v}",
    "/staff/requests/{v}",
)
COMPLIANCE_PAGES = (
    "/compliance/?view={v}",
    "/compliance/audit?actor={v}",
    "/compliance/audit?action={v}",
    "/compliance/audit?reference={v}",
    "/compliance/audit?since={v}",
    "/compliance/audit?until={v}",
    "/compliance/audit?before={v}",
    "/compliance/audit?after={v}",
    "/compliance/audit?since=2026-01-01&until={v}",
    "/compliance/audit.csv?until={v}",
    "/compliance/audit.csv?actor={v}",
    "/compliance/verify/{v}",
    "/compliance/access?reference={v}",
    "/compliance/access/{v}",
    "/compliance/users/{v}",
    "/compliance/anomalies?days={v}",
    "/compliance/break-glass?after={v}",
)
ODD_VALUES = {
    "huge": HUGE,
    "minus-huge": "-" + HUGE,
    "bigint+1": str(BIGINT_MAX + 1),
    "far-date": "9999-12-31",
    "year-one": "0001-01-01T00:00:00-05:00",
    "cursor": "1|0001-01-01T00:00:00-05:00|x",
    "nul": "a\x00b",
    "escape": "\x1b[2J",
    "rtl-override": "\u202eevil\u202c.exe",
    "arabic-digits": "\u0661\u0662\u0663",
    "long": "x" * 5000,
    "quotes": "' OR 1=1 --\"",
}


@pytest.mark.parametrize("value", list(ODD_VALUES.values()), ids=list(ODD_VALUES))
def test_odd_query_values_never_cause_a_server_error(app, sign_in, value):
    has_control = any(ord(c) < 0x20 for c in value)
    for name, pages in (("sam", STAFF_PAGES), ("olivia", COMPLIANCE_PAGES)):
        client = sign_in(name)
        for page in pages:
            url = page.format(v=quote(value, safe=""))
            response = client.get(url)
            body = response.get_data(as_text=True)
            response.close()
            assert response.status_code < 500 and SERVER_ERROR not in body, (url[:120], body[:300])
            if has_control:
                assert response.status_code == 400, url
    # Whatever came before, the database session is still good.
    assert client.get("/compliance/audit").status_code == 200


HOSTILE_VALUES = ["x" * 6000, "\u202e٣١٢", "%00", "' OR 1=1 --", "<script>", "R-" + "Z" * 500]


@pytest.mark.parametrize("lang", ["en", "es"])
def test_hostile_status_look_ups_get_a_message_in_the_page_language(app, client, lang):
    """Every value a script can post to the status page: a 400 beside the field in the page's
    language, or the plain "not found"; never a 500, never a throttle row left half-written."""
    from tests.conftest import hidden_fields

    page = client.get(f"/status?lang={lang}")
    token = hidden_fields(page.get_data(as_text=True))["csrf_token"]
    for value in HOSTILE_VALUES:
        for field in ("reference", "date_of_birth"):
            data = {"csrf_token": token, "reference": "R-0000-0000", "date_of_birth": "1980-01-01"}
            data[field] = value
            response = client.post("/status", data=data)
            assert response.status_code in (200, 400), (field, value[:20])
            assert f'<html lang="{lang}">' in response.get_data(as_text=True)
    many = {"csrf_token": token, "reference": ["R-0000-0000", "R-1111-1111"]}
    assert client.post("/status", data={**many, "date_of_birth": "1980-01-01"}).status_code == 200


@pytest.mark.parametrize("lang", ["en", "es"])
@pytest.mark.parametrize("kind", ["refill", "contact"])
def test_hostile_values_in_the_new_form_fields_never_cause_a_500(app, client, kind, lang):
    """The stamp, the language switch and the honeypot, posted with nonsense: the form comes
    back in the page's language (or a decoy for a filled honeypot), and nothing half-written."""
    from sqlalchemy import func, select

    from intake.extensions import db
    from intake.models import Request
    from tests.conftest import hidden_fields, valid_contact, valid_refill

    answers = valid_refill() if kind == "refill" else valid_contact()
    for field in ("rendered_at", "switch_language", "topic", "contact_method", "location"):
        for value in [*HOSTILE_VALUES, ["xx", "yy"]]:
            hidden = hidden_fields(client.get(f"/{kind}?lang={lang}").get_data(as_text=True))
            response = client.post(f"/{kind}", data={**answers, **hidden, field: value})
            assert response.status_code in (200, 303, 400), (field, str(value)[:20])
            if response.status_code != 303:
                assert f'<html lang="{lang}">' in response.get_data(as_text=True)
    with app.app_context():
        stored = db.session.scalar(select(func.count()).select_from(Request))
    assert stored <= 3 * len(HOSTILE_VALUES) + 3
