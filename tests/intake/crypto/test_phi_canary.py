"""PHI canaries: distinctive values in every PHI field must appear nowhere outside the sealed
columns: not in the raw database, not in any log line, not on the thanks page."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from intake.extensions import db
from tests.conftest import reference_from

REFILL_CANARIES = {
    "first_name": "Quetzalcanaryfirst",
    "last_name": "Zyxcanarylast",
    "date_of_birth": "1931-07-29",
    "phone": "(415) 555-0186",
    "email": "canary.mailbox.qz@example.org",
    "rx_numbers": "8675309\n31337-42",
    "medication": "Canarymedicationzz",
    "address": "77 Canaryaddress Boulevard",
    "notes": "Canarynotes about my dog",
}
CONTACT_CANARIES = {
    "first_name": "Wolfgangcanary",
    "last_name": "Jubileecanary",
    "date_of_birth": "1944-11-03",
    "phone": "(646) 555-0199",
    "email": "contact.canary.qz@example.net",
    "message": "Canarymessage about my infusion",
    "callback_time": "Canarycallback mornings",
}
# What the stored, normalized values look like, and distinctive pieces of each.
NEEDLES = [
    "Quetzalcanaryfirst",
    "Zyxcanarylast",
    "1931-07-29",
    "+14155550186",
    "4155550186",
    "canary.mailbox.qz",
    "8675309",
    "31337-42",
    "Canarymedicationzz",
    "Canaryaddress",
    "Canarynotes",
    "Wolfgangcanary",
    "Jubileecanary",
    "1944-11-03",
    "+16465550199",
    "6465550199",
    "contact.canary.qz",
    "Canarymessage",
    "Canarycallback",
]


def leaked(blob: bytes | str) -> list[str]:
    haystack = blob if isinstance(blob, bytes) else blob.encode("utf-8", "replace")
    lowered = haystack.lower()
    return [n for n in NEEDLES if n.lower().encode() in lowered]


def all_table_values(app) -> list[bytes | str]:
    values: list[bytes | str] = []
    with app.app_context():
        inspector = sa.inspect(db.engine)
        with db.engine.connect() as conn:
            for table in inspector.get_table_names():
                for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                    for value in row:
                        if isinstance(value, bytes | memoryview):
                            values.append(bytes(value))
                        elif value is not None:
                            values.append(str(value))
    return values


def test_no_canary_escapes(app, patient, client, settings, caplog, backend):
    refill = patient.refill(fulfillment="ship", **REFILL_CANARIES)
    contact = patient.contact(topic="side_effect", **CONTACT_CANARIES)
    pages = [client.get(refill.headers["Location"]), client.get(contact.headers["Location"])]
    reference_from(refill), reference_from(contact)
    # A failed attempt must not echo values into logs either.
    patient.refill(**{**REFILL_CANARIES, "phone": "not a phone"})

    for page in pages:
        assert page.status_code == 200
        assert leaked(page.get_data()) == []

    for value in all_table_values(app):
        assert leaked(value) == [], "PHI in a database column"

    if backend == "sqlite":
        path = Path(sa.make_url(settings.database_url).database)
        raw = path.read_bytes()
        wal = path.with_name(path.name + "-wal")
        if wal.exists():
            raw += wal.read_bytes()
        assert len(raw) > 0 and leaked(raw) == [], "PHI in the raw SQLite file"

    log_file = Path(settings.data_dir) / "logs" / "intake.log"
    assert log_file.exists() and log_file.stat().st_size > 0
    assert leaked(log_file.read_bytes()) == [], "PHI in the log file"
    for record in caplog.records:
        assert leaked(record.getMessage()) == [], "PHI in a log record"


def test_the_canaries_are_really_stored_sealed(app, patient):
    """The scan above is only meaningful if the values were accepted and can be opened."""
    from intake.crypto.phi import SealedPHI, WrappedKey, open_phi
    from intake.models import Request

    reference = reference_from(patient.refill(fulfillment="ship", **REFILL_CANARIES))
    with app.app_context():
        row = db.session.execute(
            sa.select(Request).where(Request.reference == reference)
        ).scalar_one()
        document = open_phi(
            app.extensions["intake.keyring"],
            row.id,
            SealedPHI(WrappedKey(row.kek_id, row.wrapped_key), row.phi),
        )
    assert set(leaked(repr(document))) >= {
        "Quetzalcanaryfirst",
        "+14155550186",
        "8675309",
        "Canaryaddress",
        "Canarynotes",
    }
