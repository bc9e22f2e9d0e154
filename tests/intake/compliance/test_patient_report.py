"""The patient-level access report: found through the blind indexes, recorded without the terms."""

from __future__ import annotations

import csv
import io
import json

from sqlalchemy import select

from intake.extensions import db
from intake.models import AuditEvent
from tests.conftest import Patient, hidden_fields
from tests.intake.compliance.conftest import submit_routed
from tests.intake.compliance.test_access_report import table_rows

MARIA = {"first_name": "Maria", "last_name": "Núñez-Ortiz", "date_of_birth": "1980-03-15"}


def find(client, **fields):
    form = client.get("/compliance/patients")
    assert form.status_code == 200
    return client.post(
        "/compliance/patients", data={**hidden_fields(form.get_data(as_text=True)), **fields}
    )


def test_finds_all_of_one_patients_requests_and_none_of_anothers(app, client, officer_client):
    patient = Patient(client)
    mine = [
        submit_routed(app, patient, **MARIA, phone="(202) 555-0143")[0],
        submit_routed(app, patient, **MARIA, phone="(202) 555-0143")[0],
        # The same patient with another phone: found by name and date of birth, not by phone.
        submit_routed(app, patient, **MARIA, phone="(202) 555-0177")[0],
    ]
    # Same name, another date of birth; and another patient on the same first name.
    namesake = submit_routed(
        app, patient, **{**MARIA, "date_of_birth": "1980-03-16"}, phone="(202) 555-0188"
    )[0]
    other = submit_routed(
        app,
        patient,
        first_name="Maria",
        last_name="Smith",
        date_of_birth="1980-03-15",
        phone="(202) 555-0199",
    )[0]

    response = find(officer_client, last_name="nunez ortiz", date_of_birth="1980-03-15")
    assert response.status_code == 303
    report = officer_client.get(response.headers["Location"])
    html = report.get_data(as_text=True)
    assert report.status_code == 200 and "Access report for one patient" in html
    for reference in mine:
        assert f'href="/compliance/access/{reference}"' in html
    assert namesake not in html and other not in html
    events = table_rows(html, "access-events")
    named = {ref for row in events for ref in row[2].split(", ") if ref}
    assert named == set(mine), "every event names one of her requests, nobody else's"
    submitted = [row for row in events if row[5].startswith("Submitted by the patient")]
    assert len(submitted) == 3
    # No PHI on the page: the terms typed are not echoed.
    assert "1980-03-15" not in html and "Núñez" not in html and "555-0143" not in html

    by_phone = find(officer_client, phone="202 555 0143")
    phone_html = officer_client.get(by_phone.headers["Location"]).get_data(as_text=True)
    assert all(r in phone_html for r in mine[:2]) and mine[2] not in phone_html

    # The searches are recorded with the references found, never the terms.
    with app.app_context():
        searches = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "request.searched")
        ).all()
        assert len(searches) == 2
        first, second = (json.loads(e.details) for e in searches)
        assert first["by"] == "name_dob" and first["purpose"] == "patient_report"
        assert first["references"] == mine and first["results"] == 3
        assert second["by"] == "phone" and second["references"] == mine[:2]
        for event in searches:
            text = event.details.lower()
            for term in ("nunez", "núñez", "ortiz", "1980", "555", "0143", "+1202"):
                assert term not in text
            assert event.reference is None

    # Printable and exportable: the CSV holds the same events as the page, oldest first (now
    # with the phone search, which found the same requests).
    html = officer_client.get(response.headers["Location"]).get_data(as_text=True)
    events = table_rows(html, "access-events")
    export = officer_client.get(response.headers["Location"] + ".csv")
    assert export.status_code == 200
    seq = response.headers["Location"].rsplit("/", 1)[1]
    assert export.headers["Content-Disposition"] == (
        f'attachment; filename="access-patient-{seq}.csv"'
    )
    rows = list(csv.reader(io.StringIO(export.get_data(as_text=True))))[1:]
    assert [row[0] for row in rows] == [row[0] for row in events]
    assert 'class="muted print-only"' in html
    with app.app_context():
        exported = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "audit.exported")
        ).one()
        assert json.loads(exported.details)["search_seq"] == int(seq)


def test_a_search_needs_phone_or_name_and_birth_date_and_reports_only_patient_searches(
    app, patient, officer_client
):
    assert find(officer_client, last_name="Núñez-Ortiz").status_code == 400
    assert find(officer_client, date_of_birth="15/03/1980", last_name="X").status_code == 400
    assert find(officer_client, phone="12").status_code == 400
    no_token = officer_client.post("/compliance/patients", data={"phone": "202-555-0143"})
    assert no_token.status_code == 400
    with app.app_context():
        assert not db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "request.searched")
        ).all()
    reference, _team = submit_routed(app, patient)
    with app.app_context():
        submitted = db.session.scalar(
            select(AuditEvent.seq).where(AuditEvent.reference == reference)
        )
    # Only a recorded patient search addresses a report, not any event number.
    assert officer_client.get(f"/compliance/patients/{submitted}").status_code == 404
    assert officer_client.get("/compliance/patients/999999").status_code == 404
    nobody = find(officer_client, phone="202-555-0100")
    page = officer_client.get(nobody.headers["Location"]).get_data(as_text=True)
    assert 'id="no-requests"' in page
