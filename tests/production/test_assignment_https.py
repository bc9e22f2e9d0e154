"""Automatic assignment on the production stack: a patient's question sent over HTTPS is
routed to patient services (least loaded in the sample routing file) and lands assigned to
its one member, who sees it on their queue as theirs."""

from __future__ import annotations

import json
import re

import pytest

from tests.production.conftest import ProductionStack
from tests.production.test_patient_https import PATIENT_FIELDS, send_like_a_person
from tests.workers.conftest import wait_until

pytestmark = [pytest.mark.postgres]


def test_a_request_sent_over_https_lands_assigned_in_the_assignees_queue(
    production_stack: ProductionStack,
) -> None:
    stack = production_stack
    user = stack.create_staff("dealt-https", teams=("patient-services",))
    # Earlier tests' questions may wait in the pool; room for them all, so this one is dealt too.
    stack.intake("users", "set-cap", user.username, "500")

    patient = stack.client("127.0.31.7")
    fields = {**PATIENT_FIELDS, "topic": "question", "message": "Are you open on Saturday?"}
    reference = send_like_a_person(patient, {"/contact": fields})["/contact"]

    def assignee() -> str | None:
        rows = stack.query(
            "SELECT u.username FROM requests r JOIN users u ON u.id = r.assignee_id "
            "WHERE r.reference = :r",
            r=reference,
        )
        return rows[0][0] if rows else None

    assert wait_until(assignee, 60, 0.25, f"{reference} assigned") == user.username
    [(actor, details)] = stack.query(
        "SELECT actor, details FROM audit_events WHERE reference = :r "
        "AND action = 'request.assigned'",
        r=reference,
    )
    assert actor == "system:assign"
    assert json.loads(details)["reason"].startswith(f"assigned to {user.username}: fewest open")

    staff = stack.client("127.0.31.8")
    assert staff.log_in(user.username, user.password, user.otp()).status == 303
    # "mine" is the queue's own filter where it exists; elsewhere the argument is ignored and
    # the row still names its assignee.
    queue = staff.get("/staff/queue?mine=1")
    assert queue.status == 200
    row = re.search(rf"<tr[^>]*>(?:(?!</tr>).)*{reference}(?:(?!</tr>).)*</tr>", queue.text, re.S)
    assert row is not None, queue.text[:3000]
    assert user.username in row.group(0)
