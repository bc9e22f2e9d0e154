"""Attacks on ``intake backup`` and its restore, on PostgreSQL and SQLite.

A database-only attacker hides a backup (its backup.created event); someone with the backup
folder swaps or links a file in it; an operator points --out at the wrong place, makes two
backups in the same second, backs up an unreachable database or restores a backup a newer
Intake made. Each is refused clearly and changes nothing; a PHI canary appears in no event,
log line, manifest, output or (in clear) dump.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from config import Settings
from intake.ops import backup as backups
from tests.conftest import Patient
from tests.intake.crypto.test_phi_canary import REFILL_CANARIES, leaked
from tests.intake.ops.test_backup import (
    INTAKE,
    Installation,
    audit_events,
    backed_up,  # noqa: F401 - a fixture
    give_keys,
    installations,  # noqa: F401 - a fixture
    make_backup,
    open_app,
    populate,
    tables_in,
)
from tests.intake.staff.conftest import submit_routed
from tests.workers.conftest import free_port

Made = Callable[..., Installation]


def execute(url: str, *statements: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def untouched(target: Installation) -> None:
    """A refused restore wrote nothing: no table, no audit file."""
    assert tables_in(target.database_url) == []
    assert [p.name for p in target.data_dir.iterdir() if p.name.startswith("audit")] == []


def run_intake(
    installation: Installation, *args: str | Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """``intake`` in ``installation`` with more environment: Installation.intake cannot."""
    return subprocess.run(
        [INTAKE, *map(str, args)],
        env=installation.env() | env,
        cwd=installation.root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# -- the backup's own audit event ----------------------------------------------------------------


DROP_TRIGGERS = {
    "sqlite": (
        "DROP TRIGGER audit_events_no_update",
        "DROP TRIGGER audit_events_no_delete",
    ),
    "postgresql": ("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete",),
}


@pytest.mark.parametrize("tamper", ["edit", "delete"])
def test_a_hidden_backup_event_is_named_by_verify(
    backed_up: tuple[Installation, Path],  # noqa: F811
    backend: str,
    tamper: str,
) -> None:
    """A backup someone made and wants unknown: the newest event, which only the anchor holds."""
    source, _folder = backed_up
    [created] = audit_events(source.database_url, "backup.created")
    change = {
        "edit": f"UPDATE audit_events SET details = '{{}}' WHERE seq = {created['seq']}",
        "delete": f"DELETE FROM audit_events WHERE seq = {created['seq']}",
    }[tamper]
    with pytest.raises(sa.exc.DatabaseError):
        execute(source.database_url, change)
    assert audit_events(source.database_url, "backup.created") == [created]

    # With the owner's rights the triggers go, and the event with them: verify names it.
    execute(source.database_url, *DROP_TRIGGERS[backend], change)
    assert audit_events(source.database_url, "backup.created") != [created]
    done = source.intake("audit", "verify", "--json", check=False)
    verified = json.loads(done.stdout)
    assert done.returncode == 1 and verified["ok"] is False, verified
    assert verified["first_bad_seq"] == created["seq"], verified


# -- a backup folder changed after it was made ---------------------------------------------------


def _resum(folder: Path, name: str) -> None:
    """Write the manifest's sha256 of ``name`` as it now is: what an attacker also does."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _swap_dump(folder: Path, source: Installation, other: Path) -> str:
    dump = next(p.name for p in folder.iterdir() if p.name.startswith("database."))
    shutil.copyfile(other / dump, folder / dump)  # a real dump, of another moment
    return "does not match the sha256"


def _swap_anchor(folder: Path, source: Installation, other: Path) -> str:
    anchor = folder / "audit-anchor.log"
    anchor.write_bytes(b"".join(anchor.read_bytes().splitlines(keepends=True)[:-2]))
    return "does not match the sha256"


def _link_to_the_keyring(folder: Path, source: Installation, other: Path) -> str:
    (folder / "audit-verify-keys").unlink()
    (folder / "audit-verify-keys").symlink_to(source.data_dir / "keyring.json")
    _resum(folder, "audit-verify-keys")
    return "is a symbolic link"


def _link_to_passwd(folder: Path, source: Installation, other: Path) -> str:
    dump = next(p for p in folder.iterdir() if p.name.startswith("database."))
    dump.unlink()
    dump.symlink_to("/etc/passwd")
    _resum(folder, dump.name)
    return "is a symbolic link"


def _traversal_name(folder: Path, source: Installation, other: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../keyring.json"] = manifest["files"]["audit-anchor.log"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return "unknown file '../../keyring.json'"


def _a_keyring_beside(folder: Path, source: Installation, other: Path) -> str:
    shutil.copyfile(source.data_dir / "keyring.json", folder / "keyring.json")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["keyring.json"] = {"sha256": backups.sha256_of(folder / "keyring.json")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return "unknown file 'keyring.json'"


TAMPERS = {
    "swapped dump": _swap_dump,
    "swapped anchor": _swap_anchor,
    "verify keys linked to the keyring": _link_to_the_keyring,
    "dump linked to /etc/passwd": _link_to_passwd,
    "path traversal in the manifest": _traversal_name,
    "an extra keyring in the manifest": _a_keyring_beside,
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_tampered_backup_is_refused_before_anything_is_written(
    installations: Made,  # noqa: F811
    backed_up: tuple[Installation, Path],  # noqa: F811
    tmp_path: Path,
    tamper: str,
) -> None:
    source, folder = backed_up
    other, _ = make_backup(source, tmp_path / "later")
    tampered = tmp_path / "tampered" / folder.name
    shutil.copytree(folder, tampered, symlinks=True)
    expected = TAMPERS[tamper](tampered, source, other)
    target = installations("restored", migrated=False)
    give_keys(source, target)

    checked = target.intake("backup", "check", tampered, check=False)
    assert checked.returncode == 1 and expected in checked.stderr, checked.stderr
    refused = target.intake(
        "backup", "restore", tampered, "--database-url", target.database_url, check=False
    )
    assert refused.returncode == 1, refused.stdout
    assert "damaged backup" in refused.stderr and expected in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout
    untouched(target)


# -- where a backup goes, and when -------------------------------------------------------------


def test_out_must_be_a_folder_apart_from_the_keys(
    installations: Made,  # noqa: F811
    tmp_path: Path,
) -> None:
    source = installations("source")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    refused = source.intake("backup", "--out", a_file, check=False)
    assert refused.returncode == 2 and "is a file" in refused.stderr, refused.stderr
    assert a_file.read_text() == "mine\n"

    data_before = sorted(p.name for p in source.data_dir.iterdir())
    for out in (source.data_dir, source.data_dir / "backups", source.data_dir / ".." / "data"):
        refused = source.intake("backup", "--out", out, check=False)
        assert refused.returncode == 1, refused.stdout
        assert "beside the keyring" in refused.stderr and "Traceback" not in refused.stderr
        assert sorted(p.name for p in source.data_dir.iterdir()) == data_before
    assert audit_events(source.database_url, "backup.created") == []


def test_two_backups_in_the_same_second_never_share_a_folder(
    installations: Made,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Another backup of this second still being made: leave its folder alone, write no event."""
    source = installations("source")
    moment = datetime(2026, 12, 6, 21, 0, 0, tzinfo=UTC)
    out = tmp_path / "backups"
    in_progress = out / f".{backups.FOLDER_PREFIX}20261206T210000Z.partial"
    in_progress.mkdir(parents=True)
    (in_progress / "database.pgdump").write_bytes(b"the other backup's dump, half written")

    def backup_now() -> backups.BackupResult:
        return backups.create_backup(
            source.settings, out, actor="system:test", clock=lambda: moment
        )

    with pytest.raises(backups.BackupError, match="being made by another backup"):
        backup_now()
    assert (in_progress / "database.pgdump").read_bytes().startswith(b"the other backup's")
    assert audit_events(source.database_url, "backup.created") == []

    shutil.rmtree(in_progress)  # the other backup is done (or gave up)
    first = backup_now()
    with pytest.raises(backups.BackupError, match="already exists"):
        backup_now()
    assert [p.name for p in out.iterdir()] == [first.path.name]
    assert [e["seq"] for e in audit_events(source.database_url, "backup.created")] == [
        first.event_seq
    ]


def test_a_backup_of_an_unreachable_database_fails_and_leaves_nothing(
    installations: Made,  # noqa: F811
    backend: str,
    tmp_path: Path,
) -> None:
    source = installations("source")
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'gone' / 'intake.sqlite3'}"
    else:
        url = f"postgresql+psycopg://intake:Sekrit-pw-42@127.0.0.1:{free_port()}/intake"
    out = tmp_path / "backups"
    done = run_intake(source, "backup", "--out", out, INTAKE_DATABASE_URL=url)
    assert done.returncode == 1, done.stdout
    reason = "no SQLite database" if backend == "sqlite" else "cannot reach the database"
    assert reason in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "Sekrit-pw-42" not in done.stdout + done.stderr
    assert not out.exists() or list(out.iterdir()) == []
    assert audit_events(source.database_url, "backup.created") == []


def test_a_backup_made_by_a_newer_intake_is_refused(
    installations: Made,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Restored, it would give a database this code cannot migrate or run on."""
    source = installations("source")
    execute(source.database_url, "UPDATE alembic_version SET version_num = '9999'")
    folder, result = make_backup(source, tmp_path / "backups")
    assert result["alembic_revision"] == "9999"
    target = installations("restored", migrated=False)
    give_keys(source, target)
    refused = target.intake(
        "backup", "restore", folder, "--database-url", target.database_url, check=False
    )
    assert refused.returncode == 1, refused.stdout
    assert "revision 9999" in refused.stderr and "newer Intake" in refused.stderr
    assert "Traceback" not in refused.stderr
    untouched(target)


# -- PHI ---------------------------------------------------------------------------------------


def _logged(installation: Installation, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``intake`` with its INFO log lines on stderr, as cron's log file gets them."""
    done = run_intake(installation, *args, INTAKE_LOG_LEVEL="INFO")
    assert done.returncode == 0, done.stderr
    return done


def _dump_in_clear(backend: str, dump: Path) -> bytes:
    """The database file as text an attacker reads: SQLite as is, pg_dump's archive as SQL."""
    if backend == "sqlite":
        return dump.read_bytes()
    pg_restore = shutil.which("pg_restore")
    if pg_restore is None:
        if os.environ.get("CI") == "true":
            pytest.fail("pg_restore is required in CI")
        pytest.skip("pg_restore is not installed")
    return subprocess.run(
        [pg_restore, "--file=-", str(dump)], capture_output=True, check=True, timeout=120
    ).stdout


def test_a_phi_canary_is_nowhere_in_a_backup_but_its_ciphertext(
    installations: Made,  # noqa: F811
    make_app: Callable[[Settings], Flask],
    backend: str,
    tmp_path: Path,
) -> None:
    source = installations("source")
    made = populate(open_app(make_app, source))
    canary = submit_routed(
        made.app, Patient(made.app.test_client()), at=made.clock(), **REFILL_CANARIES
    )
    done = _logged(source, "backup", "--out", tmp_path / "backups", "--json")
    folder = Path(json.loads(done.stdout)["path"])
    assert "backup_created" in done.stderr  # the log lines were captured
    assert leaked(done.stdout + done.stderr) == []
    assert leaked((folder / "manifest.json").read_bytes()) == []
    assert leaked(json.dumps(audit_events(source.database_url, "backup.created"))) == []
    dump = folder / ("database.sqlite3" if backend == "sqlite" else "database.pgdump")
    clear = _dump_in_clear(backend, dump)
    assert canary.encode() in clear  # the request is in it, sealed
    assert leaked(clear) == []
    for name in ("audit-anchor.log", "audit-checkpoints.jsonl"):
        if (folder / name).exists():
            assert leaked((folder / name).read_bytes()) == [], name

    target = installations("restored", migrated=False)
    give_keys(source, target)
    restored = _logged(target, "backup", "restore", folder, "--database-url", target.database_url)
    assert "backup_restored" in restored.stderr
    assert leaked(restored.stdout + restored.stderr) == []
    assert leaked(json.dumps(audit_events(target.database_url, "backup.restored"))) == []
