"""``intake backup`` and ``intake backup restore``, run as an operator runs them.

Real requests go in through the patient form, a checkpoint is signed, the backup is made by the
``intake`` command in a subprocess and restored into a new, empty database (PostgreSQL and
SQLite) with a new data folder that gets only the keys, as from the secret store. The restored
installation must verify (``intake audit verify``) and a supervisor must read the same requests.
A damaged backup, a non-empty target and key material in a backup are the attacks. Every
backup and every restore is an audit event (``backup.created``, ``backup.restored``) with no PHI.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from config import Settings
from intake.audit.checkpoints import write_checkpoint
from intake.crypto.phi import Keyring
from intake.extensions import db
from intake.ops import backup as backups
from tests.conftest import POSTGRES_URL, Patient, _admin_engine, _with_database
from tests.intake.crypto.test_phi_canary import REFILL_CANARIES, leaked
from tests.intake.staff.conftest import (
    FakeClock,
    StaffUser,
    create_staff_user,
    create_teams,
    install_clock,
    login,
    submit_routed,
)
from tests.key_material import signing_key_forms

INTAKE = str(Path(sys.executable).parent / "intake")
SECRET_FILES = ("keyring.json", "secret_key")  # what the secret store gives a new machine


@dataclass
class Installation:
    """One Intake installation: a data folder and a database, driven by the `intake` command."""

    root: Path
    database_url: str

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def settings(self) -> Settings:
        return Settings(
            data_dir=self.data_dir,
            database_url=self.database_url,
            min_fill_seconds=0,
            submit_rate_limit="10000/minute",
            login_rate_limit="10000/minute",
        )

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
        env |= {
            "INTAKE_DATA_DIR": str(self.data_dir),
            "INTAKE_DATABASE_URL": self.database_url,
            "INTAKE_LOG_LEVEL": "WARNING",
        }
        return env

    def intake(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [INTAKE, *map(str, args)],
            env=self.env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done


@pytest.fixture
def installations(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Installation]]:
    """Make installations on ``backend``: migrated (a copy of the template) or an empty database."""
    created: list[str] = []

    def make(name: str, *, migrated: bool = True) -> Installation:
        root = tmp_path / name
        (root / "data").mkdir(parents=True)
        if backend == "sqlite":
            path = root / "data" / "intake.sqlite3"
            if migrated:
                shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
            return Installation(root, f"sqlite:///{path}")
        template = request.getfixturevalue("postgres_template")
        database = f"intake_backup_{uuid.uuid4().hex[:12]}"
        engine = _admin_engine()
        with engine.connect() as conn:
            source = f' TEMPLATE "{template}"' if migrated else ""
            conn.execute(sa.text(f'CREATE DATABASE "{database}"{source}'))
        engine.dispose()
        created.append(database)
        return Installation(root, _with_database(POSTGRES_URL, database))

    yield make
    if created:
        engine = _admin_engine()
        with engine.connect() as conn:
            for database in created:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        engine.dispose()


def open_app(make_app: Callable[[Settings], Flask], installation: Installation) -> Flask:
    app = make_app(installation.settings)
    app.config["TESTING"] = True
    return app


def tables_in(url: str) -> list[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return sorted(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def give_keys(source: Installation, target: Installation) -> None:
    """What the secret store hands a new machine: the keyring and the Flask secret."""
    for name in SECRET_FILES:
        shutil.copy2(source.data_dir / name, target.data_dir / name)


@dataclass
class Populated:
    app: Flask
    clock: FakeClock
    supervisor: StaffUser
    references: dict[str, tuple[str, ...]]  # reference -> what its page must show


def populate(app: Flask) -> Populated:
    """Requests through the patient form, routed; a supervisor who opens one of them."""
    clock = install_clock(app)
    create_teams(app)
    supervisor = create_staff_user(app, "backup-sup", "supervisor")
    patient = Patient(app.test_client())
    references = {
        submit_routed(app, patient, at=clock()): ("Maria", "1234567", "7654321"),
        submit_routed(app, patient, "contact", at=clock()): ("John", "I need help paying"),
        submit_routed(app, patient, at=clock(), first_name="Lucía", rx_numbers="7777777"): (
            "Lucía",
            "7777777",
        ),
    }
    staff = app.test_client()
    login(staff, supervisor, clock)
    first = next(iter(references))
    page = staff.get(f"/staff/requests/{first}")
    assert page.status_code == 200 and "Maria" in page.get_data(as_text=True)  # phi.viewed
    return Populated(app, clock, supervisor, references)


def audit_events(url: str, action: str) -> list[dict[str, Any]]:
    """The events of ``action`` in the database at ``url``, as an auditor reads them."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT seq, actor, outcome, reference, details FROM audit_events "
                    "WHERE action = :action ORDER BY seq"
                ),
                {"action": action},
            ).mappings()
            return [{**row, "details": json.loads(row["details"])} for row in rows]
    finally:
        engine.dispose()


def make_backup(installation: Installation, out: Path) -> tuple[Path, dict[str, Any]]:
    done = installation.intake("backup", "--out", out, "--json")
    result = json.loads(done.stdout)
    return Path(result["path"]), result


def test_backup_restores_into_an_empty_database_that_verifies_and_opens(
    installations: Callable[..., Installation],
    make_app: Callable[[Settings], Flask],
    backend: str,
    tmp_path: Path,
) -> None:
    source = installations("source")
    made = populate(open_app(make_app, source))
    signed = source.intake("audit", "checkpoint")
    assert "Signed checkpoint" in signed.stdout, signed.stdout
    # One more request after the checkpoint: the restored trail has an unsigned tail too.
    # It carries the PHI canaries, which no audit event may repeat.
    late = submit_routed(
        made.app, Patient(made.app.test_client()), at=made.clock(), **REFILL_CANARIES
    )
    made.references[late] = ("Quetzalcanaryfirst",)

    # The operator's folder may be named anything, even after a patient: not in the trail.
    out = tmp_path / "backups-Quetzalcanaryfirst"
    folder, result = make_backup(source, out)
    assert folder.name.startswith("intake-backup-") and folder.parent == out
    database_file = "database.pgdump" if backend == "postgresql" else "database.sqlite3"
    names = {database_file, "audit-checkpoints.jsonl", "audit-anchor.log", "audit-verify-keys"}
    assert set(result["files"]) == names
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "manifest.json"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["database"]["kind"] == backend and manifest["profile"] == "embedded"
    assert manifest["keys_included"] is False and "secret store" in manifest["keys"]
    assert manifest["alembic_revision"] and manifest["intake_version"]
    assert manifest["audit_head_seq"] == result["audit_head_seq"] > 0
    assert {(folder / name).stat().st_mode & 0o777 for name in names} == {0o600}

    # The backup is in the trail, written after the copy: the next seq after its head.
    [created] = audit_events(source.database_url, "backup.created")
    assert created["seq"] == result["event_seq"] == manifest["audit_head_seq"] + 1
    assert created["actor"].startswith("system:cli") and created["outcome"] == "success"
    assert created["details"] == {
        "backup": folder.name,
        "manifest_sha256": result["manifest_sha256"],
        "database": backend,
        "audit_head_seq": manifest["audit_head_seq"],
        "audit_events": manifest["audit_events"],
        "bytes": sum(entry["bytes"] for entry in result["files"].values()),
    }
    assert leaked(json.dumps(created)) == [] and str(out) not in json.dumps(created)
    human = source.intake("backup", "--out", tmp_path / "again")
    assert "Keys are not in this backup" in human.stdout and " s, " in human.stdout
    assert "(backup.created)" in human.stdout
    assert len(audit_events(source.database_url, "backup.created")) == 2

    target = installations("restored", migrated=False)
    assert tables_in(target.database_url) == []
    give_keys(source, target)
    started = time.monotonic()
    restored = target.intake(
        "backup", "restore", folder, "--database-url", target.database_url, "--json"
    )
    wall = time.monotonic() - started
    report = json.loads(restored.stdout)
    print(
        f"\n[{backend}] restore of {result['audit_head_seq']} audit events: "
        f"{report['elapsed_seconds']:.3f} s in the command, {wall:.2f} s with process start"
    )
    assert report["audit_head_seq"] == manifest["audit_head_seq"]
    assert report["missing_key_ids"] == [] and report["notes"] == []
    for name in ("audit-checkpoints.jsonl", "audit-verify-keys"):
        placed = target.data_dir / name
        assert placed.read_bytes() == (folder / name).read_bytes(), name
        assert placed.stat().st_mode & 0o777 == 0o600
    # The restore is the restored trail's next event; the backup's own event (written after
    # its copy) is not in it. The anchor is the backup's copy plus the restore's event.
    assert audit_events(target.database_url, "backup.created") == []
    [restored_event] = audit_events(target.database_url, "backup.restored")
    head = manifest["audit_head_seq"]
    assert restored_event["seq"] == report["event_seq"] == head + 1
    assert restored_event["actor"].startswith("system:cli")
    assert restored_event["details"] == {
        "backup": folder.name,
        "manifest_sha256": result["manifest_sha256"],
        "backup_created_at": manifest["created_at"],
        "database": backend,
        "audit_head_seq": head,
        "replaced": [],
        "missing_key_ids": [],
    }
    assert leaked(json.dumps(restored_event)) == []
    anchor = (target.data_dir / "audit-anchor.log").read_bytes()
    copied = (folder / "audit-anchor.log").read_bytes()
    assert anchor.startswith(copied)
    assert [line.split()[:2] for line in anchor[len(copied) :].splitlines()] == [
        [b"p", str(head + 1).encode()],
        [b"c", str(head + 1).encode()],
    ]
    assert (target.data_dir / "audit-anchor.log").stat().st_mode & 0o777 == 0o600

    verified = json.loads(target.intake("audit", "verify", "--json").stdout)
    assert verified["ok"] is True, verified
    assert verified["events"] >= manifest["audit_head_seq"]
    assert verified["checkpoints"]["verified"] >= 1, verified

    # The database still refuses to change its audit trail (the triggers came back too).
    engine = sa.create_engine(target.database_url, poolclass=sa.pool.NullPool)
    with pytest.raises(sa.exc.DatabaseError), engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_events SET actor = 'nobody' WHERE seq = 1"))
    engine.dispose()

    # A supervisor logs in to the restored installation and reads the same requests.
    restored_app = open_app(make_app, target)
    clock = install_clock(restored_app, made.clock())
    staff = restored_app.test_client()
    login(staff, made.supervisor, clock)
    for reference, shown in made.references.items():
        page = staff.get(f"/staff/requests/{reference}")
        assert page.status_code == 200, reference
        html = page.get_data(as_text=True)
        assert reference in html and all(value in html for value in shown), reference


def test_a_backup_made_while_requests_arrive_still_verifies(
    installations: Callable[..., Installation],
    make_app: Callable[[Settings], Flask],
    tmp_path: Path,
) -> None:
    """Audit lines written after the snapshot are left out of the copied files."""
    source = installations("source")
    app = open_app(make_app, source)
    made = populate(app)
    with app.app_context():
        assert write_checkpoint(db.session, source.settings, actor="system:test") is not None
    patient = Patient(app.test_client())
    process = subprocess.Popen(
        [INTAKE, "backup", "--out", str(tmp_path / "backups"), "--json"],
        env=source.env(),
        cwd=source.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    submitted = 0
    while process.poll() is None:
        submit_routed(app, patient, at=made.clock())
        submitted += 1
    out, err = process.communicate()
    assert process.returncode == 0, err
    assert submitted > 0
    folder = Path(json.loads(out)["path"])
    print(f"\nsubmitted while the backup ran: {submitted}; {json.loads(out)['notes']}")
    with app.app_context():
        assert write_checkpoint(db.session, source.settings, actor="system:test") is not None
    target = installations("restored", migrated=False)
    give_keys(source, target)
    target.intake("backup", "restore", folder, "--database-url", target.database_url)
    verified = json.loads(target.intake("audit", "verify", "--json").stdout)
    assert verified["ok"] is True, verified


@pytest.fixture
def backed_up(
    installations: Callable[..., Installation],
    make_app: Callable[[Settings], Flask],
    tmp_path: Path,
) -> tuple[Installation, Path]:
    source = installations("source")
    app = open_app(make_app, source)
    populate(app)
    with app.app_context():
        assert write_checkpoint(db.session, source.settings, actor="system:test") is not None
    folder, _result = make_backup(source, tmp_path / "backups")
    return source, folder


def test_a_damaged_backup_is_refused_and_changes_nothing(
    installations: Callable[..., Installation],
    backed_up: tuple[Installation, Path],
    tmp_path: Path,
) -> None:
    source, folder = backed_up
    damaged = tmp_path / "damaged" / folder.name
    shutil.copytree(folder, damaged)
    dump = next(p for p in damaged.iterdir() if p.name.startswith("database."))
    raw = bytearray(dump.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    dump.write_bytes(bytes(raw))
    target = installations("restored", migrated=False)
    give_keys(source, target)

    refused = target.intake(
        "backup", "restore", damaged, "--database-url", target.database_url, check=False
    )
    assert refused.returncode == 1
    assert "damaged backup" in refused.stderr and dump.name in refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout
    assert tables_in(target.database_url) == []
    assert sorted(p.name for p in target.data_dir.iterdir() if p.name.startswith("audit")) == []
    checked = target.intake("backup", "check", damaged, check=False)
    assert checked.returncode == 1 and "damaged backup" in checked.stderr
    # The intact original is still good.
    assert "intact" in target.intake("backup", "check", folder).stdout


def test_restoring_into_a_database_that_is_not_empty_is_refused(
    installations: Callable[..., Installation], backed_up: tuple[Installation, Path]
) -> None:
    source, folder = backed_up
    before = tables_in(source.database_url)
    target = installations("restored", migrated=False)
    give_keys(source, target)
    refused = target.intake(
        "backup", "restore", folder, "--database-url", source.database_url, check=False
    )
    assert refused.returncode == 1, refused.stdout
    assert "is not empty" in refused.stderr and "Traceback" not in refused.stderr
    assert tables_in(source.database_url) == before
    assert not (target.data_dir / "audit-anchor.log").exists()

    # Audit files already in place are not replaced without --force, even into an empty one.
    (target.data_dir / "audit-anchor.log").write_text("p 1 " + "0" * 64 + "\n")
    refused = target.intake(
        "backup", "restore", folder, "--database-url", target.database_url, check=False
    )
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert tables_in(target.database_url) == []
    forced = target.intake(
        "backup", "restore", folder, "--database-url", target.database_url, "--force", "--json"
    )
    report = json.loads(forced.stdout)
    kept = Path(report["replaced"]["audit-anchor.log"])
    assert kept.read_text() == "p 1 " + "0" * 64 + "\n"
    assert (
        (target.data_dir / "audit-anchor.log")
        .read_bytes()
        .startswith((folder / "audit-anchor.log").read_bytes())
    )
    [restored] = audit_events(target.database_url, "backup.restored")
    assert restored["details"]["replaced"] == ["audit-anchor.log"]
    # The replaced anchor is not the restored trail's: the restored one still verifies.
    verified = json.loads(target.intake("audit", "verify", "--json").stdout)
    assert verified["ok"] is True, verified


def test_a_restore_without_the_keyring_says_so(
    installations: Callable[..., Installation], backed_up: tuple[Installation, Path]
) -> None:
    """On a new machine without the keyring the embedded profile makes a new one: say so."""
    _source, folder = backed_up
    target = installations("restored", migrated=False)
    done = target.intake(
        "backup", "restore", folder, "--database-url", target.database_url, check=False
    )
    assert done.returncode == 1
    assert "cannot open the restored data sealed under k1" in done.stderr
    assert "secret store" in done.stderr
    assert "Traceback" not in done.stderr


def _keyring_forms(text: str) -> list[bytes]:
    keyring = Keyring.from_json(text)
    raw = [*keyring.keks.values(), keyring.index_key, keyring.ip_key]
    forms = [text.encode(), json.dumps(json.loads(text)).encode()]
    for key in raw:
        forms += [key, base64.b64encode(key), key.hex().encode()]
    return forms


def test_a_backup_holds_no_key_material(backed_up: tuple[Installation, Path]) -> None:
    source, folder = backed_up
    data = source.data_dir
    skey = (data / "signer" / "signing-key").read_text().strip()
    secret = (data / "secret_key").read_text().strip()
    forms = [
        *signing_key_forms(skey),
        *_keyring_forms((data / "keyring.json").read_text()),
        secret.encode(),
        b"PRIVATE+KEY",
    ]
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    assert len(files) == 5
    for path in files:
        content = path.read_bytes()
        found = [form[:12] for form in forms if form in content]
        assert not found, (path.name, found)
    for name in ("keyring.json", "secret_key", "signing-key", "audit-signing-key"):
        assert not list(folder.rglob(name))
    assert backups.KEYS_NOT_INCLUDED in json.loads((folder / "manifest.json").read_text())["keys"]
