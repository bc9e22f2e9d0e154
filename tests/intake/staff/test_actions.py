"""Each staff action is one audited change: exactly its event, or nothing at all."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import OutboxMessage
from tests.intake.staff.conftest import (
    database_values,
    events_since,
    last_seq,
    request_state,
    sqlite_file_bytes,
)

NOTE_CANARY = "Canarynote: prescriber Dr Vexworthy called back about lot 7QX"


def actions_since(app, seq: int) -> list[tuple[str, str | None]]:
    return [(e.action, e.reference) for e in events_since(app, seq)]


def page_text(staff, reference: str) -> str:
    response = staff.get(f"/staff/requests/{reference}")
    assert response.status_code == 200
    return str(response.get_data(as_text=True))


def test_opening_a_request_shows_its_phi_and_records_phi_viewed(app, route, make_user, staff_login):
    reference = route("refill", location="main")
    ana = staff_login(make_user("ana", teams=("refills-main",)))
    since = last_seq(app)

    html = page_text(ana, reference)

    assert "Maria Núñez-Ortiz" in html and "March 15, 1980" in html
    assert '<a href="tel:+12025550143">(202) 555-0143</a>' in html
    assert actions_since(app, since) == [("phi.viewed", reference)]


def test_claim_release_status_and_note_each_write_exactly_their_event(
    app, route, make_user, staff_login
):
    reference = route("refill", location="main")
    ana = staff_login(make_user("ana", teams=("refills-main",)))

    steps = [
        ("claim", {}, "request.claimed", "You claimed this request."),
        ("release", {}, "request.released", "You released this request."),
        ("status", {"status": "in_progress"}, "request.status_changed", "Status changed to in"),
        ("note", {"text": "Left a voicemail for the patient."}, "note.added", "Note added."),
        ("status", {"status": "completed"}, "request.status_changed", "Status changed to com"),
    ]
    for action, fields, event, flash in steps:
        since = last_seq(app)
        response = ana.act(reference, action, **fields)
        assert response.status_code == 303, (action, response.get_data(as_text=True)[:500])
        assert response.headers["Location"] == f"/staff/requests/{reference}"
        assert actions_since(app, since) == [(event, reference)], action
        assert flash in page_text(ana, reference)

    events = [e for e in events_since(app) if e.action == "request.status_changed"]
    assert [(e.details["old"], e.details["new"]) for e in events] == [
        ("queued", "in_progress"),
        ("in_progress", "completed"),
    ]
    html = page_text(ana, reference)
    assert '<dd id="status" data-status="completed">Completed</dd>' in html
    assert "Left a voicemail for the patient." in html
    # The timeline shows every step, in words.
    for line in (
        "Claimed by ana",
        "Released by ana",
        "Status: in progress, by ana (was queued)",
        "Note added by ana",
        "Status: completed, by ana (was in progress)",
    ):
        assert line in html, line


def test_claiming_shows_who_works_on_it_and_keeps_others_off(app, route, make_user, staff_login):
    reference = route("refill", location="main")
    ana = staff_login(make_user("ana", teams=("refills-main",)))
    boris = staff_login(make_user("boris", teams=("refills-main",)))
    ana.act(reference, "claim")
    before, since = request_state(app, reference), last_seq(app)

    taken = boris.act(reference, "claim")
    release = boris.act(reference, "release")

    for response in (taken, release):
        assert response.status_code == 409
    assert "Another team member is working on this request" in taken.get_data(as_text=True)
    assert "Only the assignee or a supervisor" in release.get_data(as_text=True)
    assert request_state(app, reference) == before
    assert events_since(app, since) == []
    assert '<dd id="assignee">ana</dd>' in page_text(boris, reference)


def test_transfer_moves_the_request_and_queues_the_new_teams_notification(
    app, route, make_user, staff_login
):
    reference = route("refill", location="main")
    ana = staff_login(make_user("ana", teams=("refills-main",)))
    nico = staff_login(make_user("nico", teams=("refills-north",)))
    ana.act(reference, "claim")
    since = last_seq(app)

    response = ana.act(
        reference, "transfer", confirm="yes", team="refills-north", reason="Patient moved north"
    )

    assert response.status_code == 303 and response.headers["Location"] == "/staff/queue"
    events = events_since(app, since)
    assert [(e.action, e.reference) for e in events] == [("request.transferred", reference)]
    assert events[0].details["from_team"] == "refills-main"
    assert events[0].details["to_team"] == "refills-north"
    assert events[0].details["reason"] == "Patient moved north"
    state = request_state(app, reference)
    assert (state["team"], state["status"], state["assignee_id"]) == (
        "refills-north",
        "queued",
        None,
    )
    with app.app_context():
        messages = db.session.execute(
            sa.select(OutboxMessage.task, OutboxMessage.status)
            .where(OutboxMessage.request_id == state["id"])
            .order_by(OutboxMessage.id)
        ).all()
    # route_request (done), notify_team for the first team, then one for the new team.
    assert [tuple(m) for m in messages][-1] == ("notify_team", "pending")
    assert sum(1 for m in messages if m.task == "notify_team") == 2
    assert "Transferred to Refills: North Clinic." in ana.queue_html()
    assert reference not in ana.queue_html()
    assert ana.get(f"/staff/requests/{reference}").status_code == 404
    assert reference in nico.queue_html()


def test_searching_records_request_searched_without_the_terms(app, route, make_user, staff_login):
    reference = route("refill", location="main", phone="(202) 555-0177", last_name="Abernathy")
    ana = staff_login(make_user("ana", teams=("refills-main",)))

    for query, by in (
        ({"phone": "202-555-0177"}, "phone"),
        ({"last_name": "Abernathy", "date_of_birth": "1980-03-15"}, "name_dob"),
        ({"reference": reference}, "reference"),
    ):
        since = last_seq(app)
        response = ana.post("/staff/search", data=query)
        assert reference in response.get_data(as_text=True)
        events = events_since(app, since)
        assert [(e.action, e.reference) for e in events] == [("request.searched", None)]
        # The references found are recorded (so the patient's access report lists the search);
        # what was typed (phone, name, date of birth) never is.
        assert events[0].details == {
            "by": by,
            "results": 1,
            "username": "ana",
            "references": [reference],
        }
        for term in ("555", "0177", "Abernathy", "abernathy", "1980"):
            assert term not in events[0].raw_details


def test_illegal_actions_get_409_and_change_nothing(app, route, make_user, staff_login):
    queued = route("refill", location="main")
    done = route("refill", location="main")
    ana = staff_login(make_user("ana", teams=("refills-main",)))
    ana.act(done, "status", status="in_progress")
    ana.act(done, "status", status="completed")
    before = {ref: request_state(app, ref) for ref in (queued, done)}
    since = last_seq(app)

    attempts = [
        (queued, "status", {"status": "completed"}, "queued cannot become completed"),
        (queued, "status", {"status": "waiting_on_patient"}, "cannot become waiting on patient"),
        (queued, "release", {}, "This request is not claimed"),
        (
            queued,
            "transfer",
            {"confirm": "yes", "team": "refills-main", "reason": "Same team again"},
            "already",
        ),
        (done, "status", {"status": "in_progress"}, "completed cannot become in progress"),
        (done, "claim", {}, "Only an open request can be claimed"),
        (
            done,
            "transfer",
            {"confirm": "yes", "team": "refills-north", "reason": "Too late now"},
            "open request",
        ),
    ]
    for reference, action, fields, message in attempts:
        response = ana.act(reference, action, **fields)
        assert response.status_code == 409, (action, fields, response.status_code)
        html = response.get_data(as_text=True)
        assert "That was not done" in html and message in html, (action, html[:1500])

    assert {ref: request_state(app, ref) for ref in (queued, done)} == before
    assert events_since(app, since) == []


def test_bad_input_gets_400_and_changes_nothing(app, route, make_user, staff_login):
    reference = route("refill", location="main")
    ana = staff_login(make_user("ana", teams=("refills-main",)))
    before, since = request_state(app, reference), last_seq(app)

    for action, fields in (
        ("note", {"text": "   "}),
        ("note", {"text": "x" * 4001}),
        ("transfer", {"confirm": "yes", "team": "no-such-team", "reason": "Somewhere else"}),
        ("transfer", {"confirm": "yes", "team": "refills-north", "reason": "hm"}),
    ):
        response = ana.act(reference, action, **fields)
        assert response.status_code == 400, (action, fields)
        assert "That was not done" in response.get_data(as_text=True)
    assert ana.act(reference, "teleport").status_code == 404

    assert request_state(app, reference) == before
    assert events_since(app, since) == []


def test_a_notes_text_is_stored_nowhere_in_plain_text(
    app, route, make_user, staff_login, backend, database_url, settings
):
    reference = route("refill", location="main")
    ana = staff_login(make_user("ana", teams=("refills-main",)))

    assert ana.act(reference, "note", text=NOTE_CANARY).status_code == 303

    assert NOTE_CANARY in page_text(ana, reference)  # stored, and opens for staff
    needles = [NOTE_CANARY, "Canarynote", "Vexworthy"]
    for value in database_values(app):
        haystack = value if isinstance(value, bytes) else value.encode()
        assert not [n for n in needles if n.encode() in haystack], "note text in a table"
    if backend == "sqlite":
        raw = sqlite_file_bytes(database_url)
        assert raw and b"Vexworthy" not in raw and b"Canarynote" not in raw
    log = (settings.data_dir / "logs" / "intake.log").read_bytes()
    assert b"Vexworthy" not in log


@pytest.mark.parametrize(
    "reason",
    [
        "Patient Maria DOB 1980-03-15",
        "call back on 202 555 0143",
        "mail maria@example.com",
        "born 3/15/80 asked for it",
    ],
)
def test_reasons_that_look_like_patient_details_are_refused(
    app, route, make_user, staff_login, reason
):
    reference = route("refill", location="main")
    ana = staff_login(make_user("ana", teams=("refills-main",)))
    since = last_seq(app)
    response = ana.act(reference, "transfer", confirm="yes", team="refills-north", reason=reason)
    assert response.status_code == 400
    assert "no numbers, dates or e-mail addresses" in response.get_data(as_text=True)
    assert last_seq(app) == since
