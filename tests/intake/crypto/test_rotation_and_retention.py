"""Key rotation rewraps data keys without losing a request; retention shreds closed ones."""

from __future__ import annotations

import json
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from config import Settings
from intake.clock import utcnow
from intake.crypto import phi
from intake.crypto.rotation import key_usage, rewrap_data_keys
from intake.extensions import db
from intake.models import AuditEvent, Request
from intake.requests.casework import Actor, change_status
from intake.requests.retention import purge_expired
from intake.requests.routing import route_request
from tests.conftest import reference_from


def opened(app, reference: str) -> dict:
    with app.app_context():
        row = db.session.execute(select(Request).where(Request.reference == reference)).scalar_one()
        return phi.open_phi(
            app.extensions["intake.keyring"],
            row.id,
            phi.SealedPHI(phi.WrappedKey(row.kek_id, row.wrapped_key), row.phi),
        )


def test_rotation_then_rewrap_keeps_every_request_readable(app, patient, settings, make_app):
    references = [reference_from(patient.refill()) for _ in range(3)]
    rotated = app.extensions["intake.keyring"].with_new_primary()
    new_app = make_app(settings.replace(keyring=rotated.to_json()))
    with new_app.app_context():
        assert key_usage(db.session) == {"k1": 3}
        assert rewrap_data_keys(db.session, rotated) == 3
        assert key_usage(db.session) == {"k2": 3}
    for reference in references:
        assert opened(new_app, reference)["first_name"] == "Maria"
    # k1 is no longer needed: a keyring without it still opens everything.
    k2_only = phi.Keyring(
        primary="k2",
        keks={"k2": rotated.keks["k2"]},
        index_key=rotated.index_key,
        ip_key=rotated.ip_key,
    )
    final = make_app(settings.replace(keyring=k2_only.to_json()))
    assert opened(final, references[0])["last_name"] == "Núñez-Ortiz"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_keys_cli_rotates_the_embedded_keyring_file(tmp_path, database_url, make_app):
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    app = make_app(settings)
    runner = app.test_cli_runner()
    before = json.loads((tmp_path / "var" / "keyring.json").read_text())
    result = runner.invoke(args=["keys", "rotate"])
    assert result.exit_code == 0, result.output
    after = json.loads((tmp_path / "var" / "keyring.json").read_text())
    assert before["primary"] == "k1" and after["primary"] == "k2"
    assert after["keks"]["k1"] == before["keks"]["k1"]
    assert stat.S_IMODE((tmp_path / "var" / "keyring.json").stat().st_mode) == 0o600
    with app.app_context():
        assert db.session.execute(select(AuditEvent.action)).scalars().all() == ["key.rotated"]
    status = make_app(settings).test_cli_runner().invoke(args=["keys", "status"])
    assert "primary: k2" in status.output


def test_retention_shreds_closed_requests_and_keeps_their_trail(app, patient):
    old, fresh = reference_from(patient.refill()), reference_from(patient.refill())
    table = app.extensions["intake.routing"]
    with app.app_context():
        actor = Actor(0, "system", "supervisor", ())
        for reference in (old, fresh):
            row = db.session.execute(
                select(Request).where(Request.reference == reference)
            ).scalar_one()
            route_request(db.session, table, row.id, utcnow())
        later = utcnow() + timedelta(days=10)
        change_status(db.session, old, actor, "cancelled", utcnow())
        purged = purge_expired(db.session, later, days=5)
        assert purged == [old]
        row = db.session.execute(select(Request).where(Request.reference == old)).scalar_one()
        assert row.wrapped_key is None and row.phi == b"" and row.phone_index is None
        assert row.status == "cancelled"
        actions = (
            db.session.execute(
                select(AuditEvent.action)
                .where(AuditEvent.reference == old)
                .order_by(AuditEvent.seq)
            )
            .scalars()
            .all()
        )
        assert actions[0] == "request.submitted" and actions[-1] == "retention.purged"
        assert purge_expired(db.session, later, days=5) == []
    assert opened(app, fresh)["first_name"] == "Maria"


def test_keyring_generate_prints_a_usable_keyring(runner):
    result = runner.invoke(args=["keys", "generate"])
    ring = phi.Keyring.from_json(result.output)
    assert ring.primary == "k1" and len(ring.keks["k1"]) == 32


def test_generated_keyring_file_is_used_by_path(tmp_path, make_app):
    path = Path(tmp_path / "ring.json")
    ring = phi.Keyring.generate()
    path.write_text(ring.to_json())
    app = make_app(Settings(data_dir=tmp_path / "d", keyring=str(path), secret_key="x" * 32))
    assert app.extensions["intake.keyring"] == ring
