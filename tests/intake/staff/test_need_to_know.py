"""Need-to-know inside a team: a colleague's claim keeps teammates off the request, and the
staff timeline tells the workflow in words without what only compliance should read."""

from __future__ import annotations

import re

import sqlalchemy as sa

from intake.audit.chain import verify_chain
from intake.clock import utcnow
from intake.compliance.break_glass import review_break_glass
from intake.extensions import db
from intake.models import Note, OutboxMessage
from intake.requests import casework
from tests.intake.staff.conftest import events_since, last_seq, request_state

CLAIMED = "Claimed by ana — ask them or a supervisor"
GLASS_REASON = "Covering the weekend on-call for the infusion team"
REVIEW_COMMENT = "Checked against the on-call roster, justified"


def notes_and_messages(app, reference: str) -> tuple[int, int]:
    request_id = request_state(app, reference)["id"]
    with app.app_context():
        notes = db.session.scalar(
            sa.select(sa.func.count()).select_from(Note).where(Note.request_id == request_id)
        )
        messages = db.session.scalar(
            sa.select(sa.func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.request_id == request_id)
        )
    return int(notes or 0), int(messages or 0)


def chain_is_intact(app) -> bool:
    with app.app_context():
        report = verify_chain(db.session)
        db.session.rollback()
        return report.ok


def test_a_teammate_cannot_work_a_colleagues_claimed_request(app, route, make_user, staff_login):
    reference = route("refill", location="main")
    ana_user = make_user("ana", teams=("refills-main",))
    ana = staff_login(ana_user)
    boris = staff_login(make_user("boris", teams=("refills-main",)))
    assert ana.act(reference, "claim").status_code == 303
    assert ana.act(reference, "status", status="in_progress").status_code == 303
    before, rows_before, since = (
        request_state(app, reference),
        notes_and_messages(app, reference),
        last_seq(app),
    )

    attempts = {
        "request.status_changed": boris.act(reference, "status", status="cancelled"),
        "note.added": boris.act(reference, "note", text="Patient asked to cancel, per phone"),
        "request.transferred": boris.act(
            reference,
            "transfer",
            confirm="yes",
            team="refills-north",
            reason="Closer to the patient",
        ),
    }

    for action, response in attempts.items():
        html = response.get_data(as_text=True)
        assert response.status_code == 409, (action, response.status_code)
        assert "That was not done" in html and CLAIMED in html, action
    # Nothing changed: the request, its notes and its outbox are as they were.
    assert request_state(app, reference) == before
    assert notes_and_messages(app, reference) == rows_before
    # Each attempt is one refused event, naming who holds the claim; never the note's text.
    events = events_since(app, since)
    assert [(e.action, e.outcome, e.actor) for e in events] == [
        (action, "refused", boris.user.actor) for action in attempts
    ]
    for event in events:
        assert event.reference == reference
        assert event.details["refused"] == "claimed_by_other"
        assert event.details["assignee"] == ana_user.actor
    assert events[0].details["new"] == "cancelled"
    assert events[2].details["to_team"] == "refills-north"
    assert "cancel" not in events[1].raw_details and events[1].details["length"] > 0
    # The status field comes from the browser: a made-up value never reaches the trail.
    since = last_seq(app)
    forged = boris.act(reference, "status", status="Maria Nunez 202 555 0143")
    assert forged.status_code == 409
    (event,) = events_since(app, since)
    assert event.outcome == "refused" and event.details["new"] is None
    assert "Maria" not in event.raw_details and "555" not in event.raw_details
    assert chain_is_intact(app)

    # The page says so up front and offers boris none of the forms he may not use.
    page = boris.get(f"/staff/requests/{reference}").get_data(as_text=True)
    assert CLAIMED in page
    for action in ("claim", "status", "note", "transfer"):
        assert f"/staff/requests/{reference}/{action}" not in page
    # The assignee still works it.
    assert ana.act(reference, "note", text="Left a voicemail").status_code == 303


def test_a_supervisor_can_still_work_a_claimed_request(app, route, make_user, staff_login):
    reference = route("refill", location="main")
    ana_user = make_user("ana", teams=("refills-main",))
    ana = staff_login(ana_user)
    sofia = staff_login(make_user("sofia", role="supervisor"))
    ana.act(reference, "claim")
    since = last_seq(app)

    page = sofia.get(f"/staff/requests/{reference}").get_data(as_text=True)
    assert CLAIMED not in page and f"/staff/requests/{reference}/note" in page
    assert sofia.act(reference, "note", text="Covering for ana today").status_code == 303
    assert sofia.act(reference, "status", status="in_progress").status_code == 303
    # Stepping in does not take the claim away from ana.
    assert request_state(app, reference)["assignee_id"] == ana_user.id
    moved = sofia.act(
        reference, "transfer", confirm="yes", team="refills-north", reason="North has stock"
    )
    assert moved.status_code == 303

    events = events_since(app, since)
    assert [(e.action, e.outcome) for e in events] == [
        ("phi.viewed", "success"),
        ("note.added", "success"),
        ("request.status_changed", "success"),
        ("request.transferred", "success"),
    ]
    assert request_state(app, reference)["team"] == "refills-north"


def test_an_unclaimed_or_idle_request_is_worked_by_anyone_on_the_team(
    app, route, make_user, staff_login, clock
):
    unclaimed = route("refill", location="main")
    idle = route("refill", location="main")
    ana_user = make_user("ana", teams=("refills-main",))
    ana = staff_login(ana_user)
    boris_user = make_user("boris", teams=("refills-main",))
    boris = staff_login(boris_user)

    # Nobody claimed it: the team works it, and starting work claims it.
    assert boris.act(unclaimed, "note", text="Checked the stock").status_code == 303
    assert boris.act(unclaimed, "status", status="in_progress").status_code == 303
    assert request_state(app, unclaimed)["assignee_id"] == boris_user.id

    # A claim idle past CLAIM_IDLE no longer keeps the team off; work passes the claim on.
    ana.act(idle, "claim")
    assert boris.act(idle, "note", text="Anyone on this?").status_code == 409
    clock.advance(seconds=casework.CLAIM_IDLE.total_seconds() + 60)
    ana, boris = staff_login(ana_user), staff_login(boris_user)  # their sessions went idle too
    assert boris.act(idle, "note", text="Picking this up").status_code == 303
    # boris's note did not revive ana's idle claim for her...
    assert boris.act(idle, "status", status="in_progress").status_code == 303
    # ...and starting work made the request his.
    assert request_state(app, idle)["assignee_id"] == boris_user.id
    assert ana.act(idle, "status", status="cancelled").status_code == 409


def timeline_of(html: str) -> str:
    match = re.search(r'<ol class="timeline">(.*?)</ol>', html, re.S)
    assert match, "no timeline on the page"
    return match.group(1)


def test_the_staff_timeline_is_workflow_in_words_without_compliance_details(
    app, route, make_user, staff_login
):
    reference = route("refill", location="main")
    ana = staff_login(make_user("ana", teams=("refills-main",)))
    boris = staff_login(make_user("boris", teams=("refills-main",)))
    dana = make_user("dana", teams=("refills-north",))
    olga = make_user("olga", role="compliance")
    for _ in range(3):
        ana.get(f"/staff/requests/{reference}")
    ana.act(reference, "claim")
    ana.act(reference, "status", status="in_progress")
    ana.act(reference, "note", text="Prescriber will fax the renewal")
    boris.act(reference, "status", status="cancelled")  # refused: ana's claim
    # An outsider breaks the glass; compliance reviews it with a comment.
    with app.app_context():
        actor = casework.Actor(dana.id, "dana", "staff", ("refills-north",))
        casework.open_request(
            db.session,
            app.extensions["intake.keyring"],
            reference,
            actor,
            utcnow(),
            break_glass_reason=GLASS_REASON,
        )
        glass = db.session.scalar(
            sa.select(sa.func.max(sa.text("seq"))).select_from(sa.text("audit_events"))
        )
        officer = casework.Actor(olga.id, "olga", "compliance", ())
        review_break_glass(db.session, officer, int(glass) - 1, REVIEW_COMMENT, utcnow())

    html = boris.get(f"/staff/requests/{reference}").get_data(as_text=True)
    timeline = timeline_of(html)
    texts = re.findall(r'<span class="timeline__text">(.*?)</span>', timeline)

    assert texts[:2] == [
        "Received from the patient",
        "Routed to Refills: Main Street, normal priority",
    ]
    assert "Viewed by ana, 3 times" in texts
    assert "Claimed by ana" in texts
    assert "Status: in progress, by ana (was queued)" in texts
    assert "Note added by ana" in texts
    assert texts[-1] == "Viewed by boris"
    # No audit JSON, no usernames field, no compliance-only events, no refused attempt.
    for leaked in (
        GLASS_REASON,
        REVIEW_COMMENT,
        "dana",
        "olga",
        "break",
        "review",
        "refused",
        "cancelled",
        "Cancelled",
        "{",
        "&#34;",
        "username",
        "user:",
    ):
        assert leaked not in timeline, leaked
    # Compliance keeps the full story on its own pages.
    with app.app_context():
        from intake.compliance.reports import access_report

        report = access_report(db.session, reference)
    whys = [entry.why for entry in report.entries]
    assert GLASS_REASON in whys and REVIEW_COMMENT in whys
    assert any(e.what.startswith("Refused attempt: changed the status") for e in report.entries)


def test_a_claim_taken_after_the_page_loaded_still_refuses_the_post(
    app, route, make_user, staff_login, clock
):
    """boris opens an unclaimed request (its forms are on his page), ana claims it, then
    boris sends the forms he already has: each is refused, as is a claim of his own."""
    reference = route("refill", location="main")
    ana_user = make_user("ana", teams=("refills-main",))
    boris_user = make_user("boris", teams=("refills-main",))
    ana, boris = staff_login(ana_user), staff_login(boris_user)
    page = boris.get(f"/staff/requests/{reference}").get_data(as_text=True)
    assert f"/staff/requests/{reference}/note" in page
    assert ana.act(reference, "claim").status_code == 303

    assert boris.act(reference, "note", text="Done on the phone").status_code == 409
    assert boris.act(reference, "status", status="in_progress").status_code == 409
    moved = boris.act(
        reference, "transfer", confirm="yes", team="refills-north", reason="Closer to her"
    )
    assert moved.status_code == 409
    assert boris.act(reference, "claim").status_code == 409
    assert boris.act(reference, "release").status_code == 409
    assert request_state(app, reference)["assignee_id"] == ana_user.id

    # The claim's edge: a second before CLAIM_IDLE it still holds, at CLAIM_IDLE it is gone.
    clock.advance(seconds=casework.CLAIM_IDLE.total_seconds() - 1)
    boris = staff_login(boris_user)
    assert boris.act(reference, "note", text="Anyone on this?").status_code == 409
    clock.advance(seconds=1)
    assert boris.act(reference, "note", text="Picking this up").status_code == 303
