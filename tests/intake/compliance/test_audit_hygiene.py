"""The audit trail holds no PHI and no raw client address, whatever the staff and patients do.

A refill and a contact request carry canary values in every PHI field; staff work them over
HTTP from distinctive addresses (opening, claiming, status, a note quoting the patient, a
transfer, a search by phone, a break-glass), the patient looks up the status, the compliance
officer exports and verifies. Then every column of every audit event is scanned.
"""

from __future__ import annotations

import re

import sqlalchemy as sa

from intake.extensions import db
from tests.conftest import hidden_fields, reference_from
from tests.intake.crypto.test_phi_canary import CONTACT_CANARIES, REFILL_CANARIES, leaked

ADDRESSES = ("203.0.113.77", "198.51.100.23", "192.0.2.55", "127.0.0.1")
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def csrf(client, path):
    return hidden_fields(client.get(path).get_data(as_text=True))["csrf_token"]


def test_no_raw_ip_and_no_canary_phi_in_any_audit_event(app, patient, staff, officer_client):
    from tests.intake.compliance.conftest import submit_routed

    patient.client.environ_base["REMOTE_ADDR"] = "198.51.100.23"
    reference, team = submit_routed(app, patient, fulfillment="ship", **REFILL_CANARIES)
    contact = reference_from(patient.contact(topic="side_effect", **CONTACT_CANARIES))
    other = next(t for t in app.extensions["intake.routing"].teams if t != team)

    worker = staff.login(staff.create("wendy", "staff", (team,)), "203.0.113.77")
    outsider = staff.login(staff.create("oscar", "staff", (other,)), "192.0.2.55")
    assert worker.get("/staff/queue").status_code == 200
    page = f"/staff/requests/{reference}"
    assert "Quetzalcanaryfirst" in worker.get(page).get_data(as_text=True)
    for action, data in (
        ("claim", {}),
        ("status", {"status": "in_progress"}),
        ("note", {"text": "Spoke with Quetzalcanaryfirst Zyxcanarylast about Rx 8675309"}),
    ):
        response = worker.post(f"{page}/{action}", data={"csrf_token": csrf(worker, page), **data})
        assert response.status_code == 303, (action, response.get_data(as_text=True)[:300])
    search = worker.post(
        "/staff/search", data={"csrf_token": csrf(worker, page), "phone": "(415) 555-0186"}
    )
    assert search.status_code == 200
    # Outside oscar's teams the page is a 404 offering break-glass, with its own CSRF token.
    glass = outsider.post(
        f"{page}/break-glass",
        data={"csrf_token": csrf(outsider, page), "reason": "Covering the on-call shift tonight"},
    )
    assert glass.status_code == 200 and "Quetzalcanaryfirst" in glass.get_data(as_text=True)
    response = worker.post(
        f"{page}/transfer",
        data={
            "csrf_token": csrf(worker, page),
            "team": other,
            "reason": "Needs the IVIG nurse",
            "confirm": "yes",
        },
    )
    assert response.status_code == 303
    status_page = patient.client.get("/status")
    patient.client.post(
        "/status",
        data={
            **hidden_fields(status_page.get_data(as_text=True)),
            "reference": reference,
            "date_of_birth": REFILL_CANARIES["date_of_birth"],
        },
    )
    assert officer_client.get(f"/compliance/audit.csv?reference={reference}").status_code == 200
    assert officer_client.get(f"/compliance/access/{contact}").status_code == 200

    with app.app_context():
        rows = (
            db.session.execute(sa.text("SELECT * FROM audit_events ORDER BY seq")).mappings().all()
        )
    actions = {row["action"] for row in rows}
    assert {
        "request.submitted",
        "phi.viewed",
        "phi.break_glass",
        "note.added",
        "request.transferred",
        "request.searched",
        "status.looked_up",
        "audit.exported",
    } <= actions
    for row in rows:
        for column, value in row.items():
            text = "" if value is None else str(value)
            assert leaked(text) == [], (row["seq"], row["action"], column)
            for address in ADDRESSES:
                assert address not in text, (row["seq"], row["action"], column)
    # Client addresses are there, as pseudonyms: one per machine, the same for each of its events.
    by_user = {
        row["actor"]: row["ip_hmac"]
        for row in rows
        if row["action"] in ("phi.viewed", "phi.break_glass") and row["actor"].startswith("user:")
    }
    assert len(by_user) == 2 and all(HEX32.match(v) for v in by_user.values())
    assert len(set(by_user.values())) == 2
    submitted = [row["ip_hmac"] for row in rows if row["action"] == "request.submitted"]
    assert len(set(submitted)) == 1 and HEX32.match(submitted[0])
