"""The staff timeline: one line per action in words, repeated views folded, from audit events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from flask_babel import force_locale

from intake.requests.timeline import FOLD_WINDOW, build_timeline

T0 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
TEAMS = {"ivig": "IVIG clinical team", "refills-main": "Refills: Main Street"}


@dataclass
class Event:
    """What the timeline reads of an ``AuditEvent`` row."""

    created_at: datetime
    actor: str
    action: str
    details: str | None
    outcome: str = "success"


class Trail:
    """Audit events in the order the chain holds them, a test's clock moving forward."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.at = T0

    def add(self, actor: str, action: str, after: float = 1, outcome: str = "success", **details):
        self.at += timedelta(minutes=after)
        username = {"user:1": "pharm2", "user:2": "boris"}.get(actor)
        if username:
            details = {"username": username, **details}
        self.events.append(Event(self.at, actor, action, json.dumps(details), outcome))

    def texts(self) -> list[str]:
        return [line.text for line in build_timeline(self.events, TEAMS)]


def received_and_routed() -> Trail:
    trail = Trail()
    trail.add("patient", "request.submitted", kind="refill")
    trail.add("system:route_request", "request.routed", team="refills-main", priority="normal")
    trail.add("system:notify_team", "notification.sent", team="refills-main", reason="new")
    return trail


def test_four_actions_and_their_reloads_make_one_line_each_and_one_viewed_line():
    trail = received_and_routed()
    me = "user:1"
    trail.add(me, "phi.viewed", team="refills-main")
    trail.add(me, "request.claimed", previous_assignee=None)
    trail.add(me, "phi.viewed")
    trail.add(me, "request.status_changed", old="queued", new="in_progress")
    trail.add(me, "phi.viewed")
    trail.add(me, "request.status_changed", old="in_progress", new="waiting_on_prescriber")
    trail.add(me, "phi.viewed")
    trail.add(me, "note.added", note_id=3, length=40)
    trail.add(me, "phi.viewed")
    trail.add(
        me, "request.transferred", from_team="refills-main", to_team="ivig", reason="IVIG dose"
    )

    assert trail.texts() == [
        "Received from the patient",
        "Routed to Refills: Main Street, normal priority",
        "Refills: Main Street notified",
        "Viewed by pharm2, 5 times",
        "Claimed by pharm2",
        "Status: in progress, by pharm2 (was queued)",
        "Status: waiting on prescriber, by pharm2 (was in progress)",
        "Note added by pharm2",
        "Transferred to IVIG clinical team by pharm2 (from Refills: Main Street): IVIG dose",
    ]
    viewed = build_timeline(trail.events, TEAMS)[3]
    assert viewed.times == 5 and viewed.at == T0 + timedelta(minutes=4)
    assert viewed.last_at == T0 + timedelta(minutes=12)


def test_a_view_after_a_longer_gap_starts_a_new_line_and_people_fold_apart():
    trail = received_and_routed()
    trail.add("user:1", "phi.viewed")
    trail.add("user:2", "phi.viewed")
    trail.add("user:1", "phi.viewed")  # one minute later: folds into pharm2's line
    trail.add("user:1", "phi.viewed", after=FOLD_WINDOW.total_seconds() / 60 + 1)

    assert trail.texts()[3:] == [
        "Viewed by pharm2, 2 times",
        "Viewed by boris",
        "Viewed by pharm2",
    ]


def test_usernames_not_user_ids_and_no_compliance_business():
    trail = received_and_routed()
    trail.add("user:2", "phi.break_glass", reason="covering the night shift", review="pending")
    trail.add("user:2", "phi.viewed", break_glass=True)
    trail.add("user:2", "request.status_changed", outcome="refused", refused="claimed_by_other")
    trail.add("user:9", "phi.viewed")  # a user deleted since: no username in the event
    trail.add("user:1", "audit.exported")

    texts = trail.texts()
    assert texts[3:] == ["Viewed by a former user"]
    joined = " ".join(texts)
    for leaked in ("user:", "night shift", "boris", "{", "break"):
        assert leaked not in joined, leaked


def test_system_events_in_words():
    trail = Trail()
    trail.add("patient", "request.submitted")
    trail.add("system:route_request", "request.routed", team="gone-team", priority="urgent")
    trail.add("system:notify_team", "notification.failed", team="gone-team", reason="new")
    trail.add(
        "system:escalate_overdue", "request.escalated", old_priority="normal", new_priority="high"
    )
    trail.add("system:notify_supervisors", "notification.sent", reason="overdue")
    trail.add("patient", "status.looked_up")
    trail.add("system:retention", "retention.purged")

    assert trail.texts() == [
        "Received from the patient",
        "Routed to gone-team, urgent priority",
        "Notifying gone-team failed",
        "Priority raised to high: past its due time",
        "Supervisors told it is overdue",
        "Status checked by the patient online",
        "Patient details shredded by the retention policy",
    ]


@pytest.fixture(params=["sqlite"])
def backend(request):
    return request.param


def test_the_timeline_follows_the_pages_language(app):
    trail = received_and_routed()
    for _ in range(3):
        trail.add("user:1", "phi.viewed")
    trail.add("user:1", "request.status_changed", old="in_progress", new="waiting_on_prescriber")
    with app.test_request_context(), force_locale("es"):
        texts = trail.texts()
    assert texts == [
        "Recibida del paciente",
        "Enviada a Refills: Main Street, prioridad normal",
        "Aviso enviado a Refills: Main Street",
        "Vista por pharm2, 3 veces",
        "Estado: esperando al médico, por pharm2 (antes: en curso)",
    ]


def test_outside_a_page_the_timeline_is_in_the_default_language(app):
    """A command or task opening a request has no page to pick a language from."""
    trail = received_and_routed()
    with app.app_context():
        assert trail.texts()[0] == "Received from the patient"


def test_assignments_by_a_supervisor_and_by_the_assigner_in_words():
    trail = received_and_routed()
    trail.add("system:assign", "request.left_in_pool", reason="nobody eligible: 2 at their cap")
    trail.add(
        "system:assign",
        "request.assigned",
        by="system:assign",
        assignee="lucia",
        reason="assigned to lucia: speaks Spanish, 3 of 8 open",
    )
    trail.add(
        "system:assign",
        "request.released",
        by="system:assign",
        previous_assignee=3,
        reason="claim timeout: not started within 60 minutes of being assigned, back to the pool",
    )
    trail.add("user:2", "request.claimed", assigned_to="user:1", assigned_to_username="pharm2")
    assert trail.texts()[3:] == [
        "Left unassigned (nobody eligible: 2 at their cap)",
        "Assigned to lucia automatically (assigned to lucia: speaks Spanish, 3 of 8 open)",
        "Returned to the pool (claim timeout: not started within 60 minutes of being assigned, "
        "back to the pool)",
        "Assigned to pharm2 by boris",
    ]
