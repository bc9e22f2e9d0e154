"""``intake backup``: a consistent copy of the database and the audit files, and its restore.

Why: the database alone is not the installation. The audit trail is checked against two files
outside it (the signed checkpoints and the anchor, intake.audit), so a backup without them, or
with copies taken at another moment than the database, restores a trail that no longer
verifies. A backup is therefore one folder, ``intake-backup-<UTC time>/``, holding:

- the database: ``database.pgdump`` (``pg_dump --format=custom`` run inside a snapshot exported
  by this command, so the audit head it reads is the dump's own) or ``database.sqlite3`` (the
  SQLite online backup API, safe while the app writes);
- ``audit-checkpoints.jsonl`` and ``audit-anchor.log``, read *after* the database snapshot and cut
  back to the snapshot's audit head: both files are append-only, so what they held at the
  snapshot is what they hold now minus the entries for later events (which the restored
  database will not have, and which verify would otherwise report as deleted events);
- ``audit-verify-keys``, the signer's public keys, when the installation keeps them in a file;
- ``manifest.json``: when, what, the alembic revision, the audit head and the sha256 of each file.

Keys are never in a backup (the keyring, the Flask secret, the audit signing key, any file of
config.settings.GENERATED_SECRET_FILES): whoever holds a backup and the keyring holds every
patient's PHI, so the two are stored apart and the keys come back from the secret store.

A restore checks every sha256 first and refuses a damaged backup; it writes only into an empty
database and refuses to replace audit files unless told to (and then keeps the old ones).

Both are audited: ``backup.created`` once the copy is complete (so it is not in that copy: it
names the audit head the copy ends at) and ``backup.restored`` appended to the restored trail,
through the anchor the restore just put in place, so the restored installation still verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa
import structlog
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from config import Settings
from config.settings import GENERATED_SECRET_FILES
from intake.audit import keys
from intake.audit.anchor import SINK_KEY, anchor_for, anchor_path
from intake.audit.chain import record_event
from intake.audit.checkpoints import checkpoints_path
from intake.audit.commands import cli_actor
from intake.crypto import phi
from intake.crypto.phi import Keyring

log = structlog.get_logger(__name__)

BACKUP_FORMAT = "intake-backup/1"
MANIFEST = "manifest.json"
POSTGRES_DUMP = "database.pgdump"
SQLITE_COPY = "database.sqlite3"
CHECKPOINTS = "audit-checkpoints.jsonl"
ANCHOR = "audit-anchor.log"
VERIFY_KEYS = "audit-verify-keys"
DATABASE_FILES = {"postgresql": POSTGRES_DUMP, "sqlite": SQLITE_COPY}
# The only names a manifest may list: a restore never writes a path a backup chose.
KNOWN_FILES = (POSTGRES_DUMP, SQLITE_COPY, CHECKPOINTS, ANCHOR, VERIFY_KEYS)
FOLDER_PREFIX = "intake-backup-"
KEYS_NOT_INCLUDED = (
    "Keys are not in this backup: not the keyring (INTAKE_KEYRING), not the Flask secret "
    "(INTAKE_SECRET_KEY), not the audit signing key (INTAKE_AUDIT_SIGNING_KEY), not the "
    f"data folder's secret files ({', '.join(GENERATED_SECRET_FILES)}). Restore them from the "
    "secret store: without the keyring the database's PHI cannot be opened."
)
PG_CLIENT_TIMEOUT = 6 * 3600  # seconds; a dump or restore that hangs longer is stuck
CHUNK = 1 << 20

NOT_EMPTY = (
    "the target database {where} is not empty ({count} tables or other objects); a restore "
    "goes into an empty database only: create a new one (createdb NAME) and give its URL"
)
DAMAGED = (
    "damaged backup: {name} does not match the sha256 in its manifest (expected {expected}, "
    "found {found}); nothing was restored"
)
NOT_RECORDED = "the {action} audit event could not be written ({error})"
SAME_MOMENT = (
    "{final} already exists or is being made by another backup; wait a second or choose "
    "another --out"
)
BESIDE_THE_KEYS = (
    "--out {out} is inside the data folder {data_dir}, beside the keyring: a backup must be "
    "kept apart from the keys (whoever holds both reads every patient's PHI); choose a folder "
    "outside it"
)
SYMLINK = (
    "damaged backup: {name} is a symbolic link, not a file of the backup; nothing was restored"
)
NEWER_SCHEMA = (
    "the backup's database is at revision {revision}, which this version of Intake does not "
    "know (a newer Intake made it); upgrade Intake to that version or newer, then restore; "
    "nothing was restored"
)


class BackupError(RuntimeError):
    """A backup cannot be made or restored; the message says why and what to do."""


# -- databases --------------------------------------------------------------------------------


def database_kind(url: str) -> str:
    """``postgresql`` or ``sqlite`` for a SQLAlchemy URL; BackupError for anything else."""
    try:
        backend = sa.make_url(url).get_backend_name()
    except sa.exc.ArgumentError:
        raise BackupError("the database URL is not a SQLAlchemy URL") from None
    if backend not in DATABASE_FILES:
        raise BackupError(f"cannot back up a {backend} database (PostgreSQL or SQLite only)")
    return backend


def safe_url(url: str) -> str:
    """The URL for messages and logs: never its password."""
    return sa.make_url(url).render_as_string(hide_password=True)


def libpq_url(url: str) -> tuple[str, dict[str, str]]:
    """``postgresql+psycopg://u:p@h/db`` as a libpq URL without the password, and the env with it.

    The password goes to the client in ``PGPASSWORD``, never on its command line (which any
    user of the machine can read in ``ps``).
    """
    parsed = sa.make_url(url)
    env = {"PGPASSWORD": parsed.password} if parsed.password else {}
    plain = parsed.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), env


def _sqlite_file(url: str) -> Path:
    database = sa.make_url(url).database
    if not database or database == ":memory:":
        raise BackupError("an in-memory SQLite database cannot be backed up or restored")
    return Path(database)


@dataclass(frozen=True)
class DatabaseFacts:
    """What a backup says about its database, read in the same snapshot as the copy."""

    alembic_revision: str | None
    audit_head_seq: int
    audit_events: int


def _facts(connection: sa.Connection) -> DatabaseFacts:
    inspector = sa.inspect(connection)
    revision = None
    if inspector.has_table("alembic_version"):
        revision = connection.scalar(sa.text("SELECT version_num FROM alembic_version"))
    head, count = 0, 0
    if inspector.has_table("audit_events"):
        row = connection.execute(sa.text("SELECT max(seq), count(*) FROM audit_events")).one()
        head, count = int(row[0] or 0), int(row[1] or 0)
    return DatabaseFacts(revision, head, count)


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=NullPool)


@contextmanager
def _connected(url: str) -> Iterator[sa.Connection]:
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            yield connection
    except sa.exc.OperationalError as error:
        first = str(error.orig or error).strip().splitlines()[0]
        raise BackupError(f"cannot reach the database {safe_url(url)}: {first}") from None
    finally:
        engine.dispose()


def record_backup_event(
    settings: Settings, url: str, actor: str, action: str, details: Mapping[str, Any]
) -> int:
    """Append ``action`` to the trail of the database at ``url``, anchored where settings say.

    Why its own session: a restore writes into ``--database-url``, which need not be the
    app's database, and its event must go to the anchor the restore just put in place, which
    is the one the settings name. Returns the event's seq; BackupError if it cannot be written.
    """
    engine = _engine(url)
    try:
        with Session(engine) as session:
            session.info[SINK_KEY] = anchor_for(settings)
            event = record_event(session, actor=actor, action=action, details=details)
            session.commit()
            return event.seq
    except (sa.exc.SQLAlchemyError, OSError) as error:
        first = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise BackupError(NOT_RECORDED.format(action=action, error=first)) from None
    finally:
        engine.dispose()


def _run_client(command: list[str], env: Mapping[str, str], what: str) -> None:
    """Run pg_dump or pg_restore; BackupError with the end of its message if it fails."""
    program = shutil.which(command[0])
    if program is None:
        raise BackupError(
            f"{command[0]} is not installed; install the PostgreSQL client "
            "(apt-get install postgresql-client), the same major version as the server or newer"
        )
    try:
        done = subprocess.run(  # noqa: S603 - fixed program, arguments built here
            [program, *command[1:]],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=PG_CLIENT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BackupError(f"{what} did not finish within {PG_CLIENT_TIMEOUT} s") from None
    if done.returncode != 0:
        # Shown to the operator, never logged: a failed COPY may quote a row.
        tail = "\n".join(done.stderr.strip().splitlines()[-12:])
        log.error("backup_client_failed", client=command[0], returncode=done.returncode)
        raise BackupError(f"{what} failed (exit {done.returncode}):\n{tail}")


def _dump_postgres(url: str, target: Path) -> DatabaseFacts:
    """pg_dump inside a snapshot this connection exports, so the facts are the dump's own."""
    dsn, env = libpq_url(url)
    with _connected(url) as connection:
        connection = connection.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            snapshot = connection.scalar(sa.text("SELECT pg_export_snapshot()"))
            facts = _facts(connection)
            _run_client(
                [
                    "pg_dump",
                    "--format=custom",
                    f"--snapshot={snapshot}",
                    "--no-password",
                    f"--file={target}",
                    f"--dbname={dsn}",
                ],
                env,
                "pg_dump",
            )
    return facts


def _copy_sqlite(url: str, target: Path) -> DatabaseFacts:
    """Copy with SQLite's online backup API: a consistent copy while the app keeps writing."""
    source_path = _sqlite_file(url)
    if not source_path.is_file():
        raise BackupError(f"no SQLite database at {source_path}")
    source = sqlite3.connect(source_path, timeout=30)
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
            # One self-contained file: no -wal beside it to forget.
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
    finally:
        source.close()
    with _connected(f"sqlite:///{target}") as connection:
        return _facts(connection)


def _objects_in(connection: sa.Connection) -> int:
    """How many tables, views, sequences... the database holds outside the system schemas."""
    if connection.dialect.name == "sqlite":
        query = "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
    else:
        query = (
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'"
        )
    return int(connection.scalar(sa.text(query)) or 0)


def _check_empty(url: str, kind: str) -> None:
    if kind == "sqlite":
        path = _sqlite_file(url)
        if not path.exists() or path.stat().st_size == 0:
            return
    with _connected(url) as connection:
        count = _objects_in(connection)
    if count:
        raise BackupError(NOT_EMPTY.format(where=safe_url(url), count=count))


def _restore_postgres(url: str, dump: Path) -> None:
    dsn, env = libpq_url(url)
    # One transaction: a restore that fails half-way leaves the target as empty as it was.
    # No owners or grants: the restoring role owns the tables (run `intake db grant-app` after).
    _run_client(
        [
            "pg_restore",
            "--single-transaction",
            "--exit-on-error",
            "--no-owner",
            "--no-acl",
            "--no-password",
            f"--dbname={dsn}",
            str(dump),
        ],
        env,
        "pg_restore",
    )


def _restore_sqlite(url: str, copy: Path) -> None:
    target = _sqlite_file(url)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = target.with_name(f".{target.name}.restoring")
    _copy_private(copy, temporary)
    for stale in (Path(f"{target}-wal"), Path(f"{target}-shm")):
        stale.unlink(missing_ok=True)  # of the empty database being replaced
    os.replace(temporary, target)


# -- files ------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _copy_private(source: Path, target: Path) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out, source.open("rb") as handle:
        shutil.copyfileobj(handle, out, CHUNK)
        out.flush()
        os.fsync(out.fileno())


def _whole_lines(data: bytes) -> list[bytes]:
    """The file's complete lines: a last line without its newline is still being written."""
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: empty, or a line not finished yet
    return [line + b"\n" for line in lines]


def _checkpoint_seq(line: bytes) -> int | None:
    try:
        seq = json.loads(line).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if type(seq) is int else None


def _anchor_seq(line: bytes) -> int | None:
    parts = line.split()
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def cut_to_head(data: bytes, head: int, seq_of: Callable[[bytes], int | None]) -> tuple[bytes, int]:
    """Keep the lines about events up to ``head`` (and any line without a seq); (kept, dropped).

    Lines that cannot be read are kept as they are: verify judges them as it would the original.
    """
    kept, dropped = [], 0
    for line in _whole_lines(data):
        seq = seq_of(line)
        if seq is not None and seq > head:
            dropped += 1
        else:
            kept.append(line)
    return b"".join(kept), dropped


@dataclass(frozen=True)
class AuditFile:
    """One of the audit files a backup carries, and where this installation keeps it."""

    name: str
    path: Path
    seq_of: Callable[[bytes], int | None] | None = None


def audit_files(settings: Settings) -> list[AuditFile]:
    files = [
        AuditFile(CHECKPOINTS, checkpoints_path(settings), _checkpoint_seq),
        AuditFile(ANCHOR, anchor_path(settings), _anchor_seq),
    ]
    if not settings.audit_verify_keys:
        # Public keys only (the embedded signer publishes them next to the checkpoints).
        files.append(AuditFile(VERIFY_KEYS, keys.public_keys_path(settings)))
    return files


# -- making a backup --------------------------------------------------------------------------


def intake_version() -> str:
    try:
        return metadata.version("intake")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class BackupResult:
    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    elapsed_seconds: float
    notes: list[str] = field(default_factory=list)
    event_seq: int | None = None


def create_backup(
    settings: Settings,
    out_dir: Path,
    *,
    actor: str,
    clock: Callable[[], datetime] | None = None,
) -> BackupResult:
    """Write ``out_dir/intake-backup-<UTC time>/``: database first, then the audit files.

    The ``backup.created`` event is committed before the folder gets its final name: no
    backup without its event. It names the folder (not ``out_dir``, a path the operator chose
    that may say anything) and the manifest's sha256, which covers every file's.
    """
    started = time.monotonic()
    url = settings.effective_database_url
    kind = database_kind(url)
    moment = (clock or (lambda: datetime.now(UTC)))()
    _check_out_dir(settings, Path(out_dir))
    final = Path(out_dir) / f"{FOLDER_PREFIX}{moment.strftime('%Y%m%dT%H%M%SZ')}"
    if final.exists():
        raise BackupError(SAME_MOMENT.format(final=final))
    Path(out_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = final.with_name(f".{final.name}.partial")
    # Exclusive: a .partial that exists is another backup of this second being made (never
    # remove it), and once ours is made, checking ``final`` again sees one that finished
    # meanwhile. So two backups never share a folder, nor an event for one folder.
    try:
        partial.mkdir(mode=0o700)
    except FileExistsError:
        raise BackupError(SAME_MOMENT.format(final=final)) from None
    if final.exists():
        partial.rmdir()
        raise BackupError(SAME_MOMENT.format(final=final))
    try:
        result = _fill(settings, partial, kind, url, moment)
        total = sum(f["bytes"] for f in result.manifest["files"].values())
        result.event_seq = record_backup_event(
            settings,
            url,
            actor,
            "backup.created",
            {
                "backup": final.name,
                "manifest_sha256": result.manifest_sha256,
                "database": kind,
                "audit_head_seq": result.manifest["audit_head_seq"],
                "audit_events": result.manifest["audit_events"],
                "bytes": total,
            },
        )
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    result.path = final
    result.elapsed_seconds = round(time.monotonic() - started, 3)
    log.info(
        "backup_created",
        path=str(final),
        database=kind,
        audit_head_seq=result.manifest["audit_head_seq"],
        bytes=total,
        elapsed_seconds=result.elapsed_seconds,
        event_seq=result.event_seq,
    )
    return result


def _check_out_dir(settings: Settings, out_dir: Path) -> None:
    """Refuse an --out in the data folder, where the keyring and the other secrets live."""
    data_dir = Path(settings.data_dir).resolve()
    out = out_dir.resolve()
    if out == data_dir or data_dir in out.parents:
        raise BackupError(BESIDE_THE_KEYS.format(out=out_dir, data_dir=settings.data_dir))


def _fill(settings: Settings, folder: Path, kind: str, url: str, moment: datetime) -> BackupResult:
    database_file = DATABASE_FILES[kind]
    # 1. The database snapshot, and the audit head as that snapshot has it.
    if kind == "postgresql":
        facts = _dump_postgres(url, folder / database_file)
    else:
        facts = _copy_sqlite(url, folder / database_file)
    os.chmod(folder / database_file, 0o600)
    # 2. Then the audit files. They only grow, so read now they hold everything up to the
    # snapshot's head; lines about later events are cut off.
    notes: list[str] = []
    written = [(database_file, "database")]
    for audit_file in audit_files(settings):
        if not audit_file.path.is_file():
            if audit_file.name != VERIFY_KEYS and facts.audit_events:
                notes.append(f"no {audit_file.name} at {audit_file.path}: not in the backup")
            continue
        data = audit_file.path.read_bytes()
        if audit_file.seq_of is not None:
            data, dropped = cut_to_head(data, facts.audit_head_seq, audit_file.seq_of)
            if dropped:
                notes.append(
                    f"{audit_file.name}: left out {dropped} lines about events after seq "
                    f"{facts.audit_head_seq}, written while the backup ran"
                )
        elif b"PRIVATE+KEY" in data:
            raise BackupError(f"{audit_file.path} holds a private key; it is not backed up")
        _write_private(folder / audit_file.name, data)
        written.append((audit_file.name, audit_file.name.removeprefix("audit-")))
    files = {
        name: {
            "sha256": sha256_of(folder / name),
            "bytes": (folder / name).stat().st_size,
            "restores": what,
        }
        for name, what in written
    }
    manifest = {
        "format": BACKUP_FORMAT,
        "created_at": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "intake_version": intake_version(),
        "profile": settings.profile,
        "database": {"kind": kind, "source": safe_url(url), "file": database_file},
        "alembic_revision": facts.alembic_revision,
        "audit_head_seq": facts.audit_head_seq,
        "audit_events": facts.audit_events,
        "audit_verify_keys": _public_keys(settings),
        "files": files,
        "keys_included": False,
        "keys": KEYS_NOT_INCLUDED,
    }
    text = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    _write_private(folder / MANIFEST, text)
    _sync_folder(folder)
    return BackupResult(folder, manifest, hashlib.sha256(text).hexdigest(), 0.0, notes)


def _public_keys(settings: Settings) -> list[str]:
    """The checkpoints' public keys (public; so an auditor can check them against their copy)."""
    try:
        return [verifier.vkey for verifier in keys.load_verifiers(settings)]
    except keys.AuditKeyError:
        return []


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- checking and restoring -------------------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a backup folder, after every file's sha256 matched it."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise BackupError(f"{folder} is not an Intake backup: it has no {MANIFEST}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise BackupError(f"damaged backup: {folder / MANIFEST} is not readable JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BACKUP_FORMAT:
        raise BackupError(f"{folder} is not a backup this version reads ({BACKUP_FORMAT})")
    files = manifest.get("files")
    database = manifest.get("database")
    if (
        not isinstance(files, dict)
        or not isinstance(database, dict)
        or database.get("kind") not in DATABASE_FILES
        or DATABASE_FILES[database["kind"]] not in files
        or not isinstance(manifest.get("audit_head_seq"), int)
    ):
        raise BackupError(f"damaged backup: {folder / MANIFEST} lacks its database or files")
    for name, entry in files.items():
        if name not in KNOWN_FILES or not isinstance(entry, dict):
            raise BackupError(f"damaged backup: the manifest lists an unknown file {name!r}")
        path = folder / name
        if path.is_symlink():
            # Its sha256 is the target's: a link to the keyring or /etc/passwd would be restored.
            raise BackupError(SYMLINK.format(name=name))
        if not path.is_file():
            raise BackupError(f"damaged backup: {name} is missing; nothing was restored")
        found = sha256_of(path)
        if found != entry.get("sha256"):
            raise BackupError(DAMAGED.format(name=name, expected=entry.get("sha256"), found=found))
    return manifest


@dataclass
class RestoreResult:
    database: str
    files: dict[str, Path]
    replaced: dict[str, Path]
    manifest: dict[str, Any]
    facts: DatabaseFacts
    elapsed_seconds: float
    missing_key_ids: list[str]
    notes: list[str] = field(default_factory=list)
    event_seq: int | None = None


def known_revisions() -> set[str]:
    """The alembic revisions of this version's migrations."""
    from alembic.script import ScriptDirectory

    migrations = Path(__file__).resolve().parents[1] / "migrations"
    return {script.revision for script in ScriptDirectory(str(migrations)).walk_revisions()}


def _check_revision_known(revision: object) -> None:
    """Refuse a backup whose schema is newer than this code: the app could not run on it."""
    if revision is not None and revision not in known_revisions():
        raise BackupError(NEWER_SCHEMA.format(revision=revision))


def restore_backup(
    settings: Settings,
    folder: Path,
    database_url: str,
    *,
    force: bool = False,
    keyring: Keyring | None = None,
    actor: str,
) -> RestoreResult:
    """Check the backup, then restore its database into an empty one and its audit files.

    Then ``backup.restored`` is appended to the restored trail and to the restored anchor (the
    one at the place the settings name, which verify holds the restored chain against): the
    restored anchor is the backup's copy plus this event's lines. A failure to write it is a
    note (exit 1), not a reason to undo a restore that is complete.
    """
    started = time.monotonic()
    folder = Path(folder)
    manifest = read_manifest(folder)  # before anything is touched
    _check_revision_known(manifest.get("alembic_revision"))
    kind = database_kind(database_url)
    if kind != manifest["database"]["kind"]:
        raise BackupError(
            f"the backup holds a {manifest['database']['kind']} database; "
            f"the target {safe_url(database_url)} is {kind}"
        )
    places = {f.name: f.path for f in audit_files(settings) if f.name in manifest["files"]}
    present = [path for path in places.values() if path.exists()]
    if present and not force:
        raise BackupError(
            "audit files already exist: "
            + ", ".join(map(str, present))
            + "; restoring would replace them. Move them away, or give --force (they are then "
            "kept as <name>.before-restore-<time>)"
        )
    _check_empty(database_url, kind)
    database_file = folder / manifest["database"]["file"]
    log.info(
        "backup_restore_started", backup=str(folder), database=kind, target=safe_url(database_url)
    )
    if kind == "postgresql":
        _restore_postgres(database_url, database_file)
    else:
        _restore_sqlite(database_url, database_file)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    replaced: dict[str, Path] = {}
    for name, target in places.items():
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if target.exists():
            kept = target.with_name(f"{target.name}.before-restore-{stamp}")
            os.replace(target, kept)
            replaced[name] = kept
        temporary = target.with_name(f".{target.name}.restoring")
        _copy_private(folder / name, temporary)
        os.replace(temporary, target)
    with _connected(database_url) as connection:
        facts = _facts(connection)
        missing = _keys_that_fail(connection, keyring)
    notes = []
    if (facts.alembic_revision, facts.audit_head_seq) != (
        manifest.get("alembic_revision"),
        manifest["audit_head_seq"],
    ):
        notes.append(
            f"the restored database is at revision {facts.alembic_revision}, audit seq "
            f"{facts.audit_head_seq}; the manifest says {manifest.get('alembic_revision')}, "
            f"seq {manifest['audit_head_seq']}"
        )
    event_seq = None
    try:
        event_seq = record_backup_event(
            settings,
            database_url,
            actor,
            "backup.restored",
            {
                "backup": folder.name,
                "manifest_sha256": sha256_of(folder / MANIFEST),
                "backup_created_at": manifest.get("created_at"),
                "database": kind,
                "audit_head_seq": facts.audit_head_seq,
                "replaced": sorted(replaced),
                "missing_key_ids": missing,
            },
        )
    except BackupError as error:
        notes.append(f"{error}: record this restore by hand, as an incident")
    elapsed = round(time.monotonic() - started, 3)
    log.info(
        "backup_restored",
        backup=str(folder),
        database=kind,
        audit_head_seq=facts.audit_head_seq,
        files=sorted(places),
        replaced=sorted(replaced),
        missing_key_ids=missing,
        elapsed_seconds=elapsed,
        event_seq=event_seq,
    )
    return RestoreResult(
        safe_url(database_url),
        places,
        replaced,
        manifest,
        facts,
        elapsed,
        missing,
        notes,
        event_seq,
    )


def _keys_that_fail(connection: sa.Connection, keyring: Keyring | None) -> list[str]:
    """The KEK ids of restored rows that the keyring in use cannot open (one row tried per id).

    Why by trying: a keyring the embedded profile just generated on a new machine has the
    same key id (k1) as the lost one; only unwrapping a real data key tells them apart.
    """
    inspector = sa.inspect(connection)
    queries = {
        "requests": "SELECT id, kek_id, wrapped_key_encrypted FROM requests "
        "WHERE kek_id = :kek LIMIT 1",
        "users": "SELECT id, kek_id, wrapped_key_encrypted FROM users WHERE kek_id = :kek LIMIT 1",
    }
    failing: set[str] = set()
    for table, query in queries.items():
        if not inspector.has_table(table):
            continue
        used = connection.scalars(
            sa.text(f"SELECT DISTINCT kek_id FROM {table} WHERE kek_id IS NOT NULL")  # noqa: S608
        )
        for kek_id in list(used):
            row = connection.execute(sa.text(query), {"kek": kek_id}).one()
            row_id = str(row[0]) if table == "requests" else f"user:{row[0]}"
            try:
                if keyring is None:
                    raise phi.UnknownKeyError(kek_id)
                phi.unwrap_data_key(keyring, row_id, phi.WrappedKey(kek_id, bytes(row[2])))
            except (phi.UnknownKeyError, phi.TamperedError):
                failing.add(str(kek_id))
    return sorted(failing)


# -- the commands -----------------------------------------------------------------------------


def _size(count: int) -> str:
    amount = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns


def _settings() -> Settings:
    return current_app.extensions["intake.settings"]  # type: ignore[no-any-return]


@click.group("backup", invoke_without_command=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The folder to write intake-backup-<UTC time>/ into.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@with_appcontext
@click.pass_context
def backup(ctx: click.Context, out: Path | None, as_json: bool) -> None:
    """Back up the database and the audit files (never the keys) into --out DIR.

    `intake backup restore BACKUP` puts one back; `intake backup check BACKUP` checks its sums.
    """
    if ctx.invoked_subcommand is not None:
        if out is not None or as_json:
            raise click.UsageError("--out and --json belong to `intake backup` itself")
        return
    if out is None:
        raise click.UsageError("give --out DIR, the folder to write the backup into")
    try:
        result = create_backup(_settings(), out, actor=cli_actor())
    except BackupError as error:
        log.warning("backup_failed", reason=str(error).splitlines()[0])
        raise click.ClickException(str(error)) from None
    manifest = result.manifest
    if as_json:
        click.echo(
            json.dumps(
                {
                    "path": str(result.path),
                    "elapsed_seconds": result.elapsed_seconds,
                    "manifest_sha256": result.manifest_sha256,
                    "database": manifest["database"]["kind"],
                    "alembic_revision": manifest["alembic_revision"],
                    "audit_head_seq": manifest["audit_head_seq"],
                    "event_seq": result.event_seq,
                    "files": manifest["files"],
                    "keys_included": False,
                    "notes": result.notes,
                }
            )
        )
        return
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    click.echo(
        f"Backed up the {manifest['database']['kind']} database (revision "
        f"{manifest['alembic_revision']}, audit head seq {manifest['audit_head_seq']}) to "
        f"{result.path} in {result.elapsed_seconds:.2f} s, {_size(total)}:"
    )
    for name, entry in sorted(manifest["files"].items()):
        click.echo(f"  {name:<26} {_size(entry['bytes']):>10}  sha256 {entry['sha256']}")
    click.echo(f"  {MANIFEST:<26} sha256 {result.manifest_sha256} (write it down elsewhere)")
    click.echo(f"Recorded as audit event {result.event_seq} (backup.created).")
    for note in result.notes:
        click.echo(f"Note: {note}")
    click.echo(KEYS_NOT_INCLUDED)


@backup.command("check")
@click.argument("folder", type=click.Path(file_okay=False, exists=True, path_type=Path))
def backup_check(folder: Path) -> None:
    """Check that every file of the backup FOLDER matches its manifest's sha256."""
    try:
        manifest = read_manifest(folder)
    except BackupError as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"{folder}: intact, {len(manifest['files'])} files; {manifest['database']['kind']} "
        f"database at audit seq {manifest['audit_head_seq']}, made {manifest['created_at']}."
    )


@backup.command("restore")
@click.argument("folder", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--database-url",
    default=None,
    help="The EMPTY database to restore into (default: INTAKE_DATABASE_URL).",
)
@click.option(
    "--force", is_flag=True, help="Replace existing audit files (the old ones are kept aside)."
)
@click.option("--json", "as_json", is_flag=True, help="Print what was restored as JSON.")
@with_appcontext
def backup_restore(folder: Path, database_url: str | None, force: bool, as_json: bool) -> None:
    """Restore the backup FOLDER: its database into an empty one, its audit files into place.

    The checkpoints, anchor and public keys go where INTAKE_AUDIT_CHECKPOINTS,
    INTAKE_AUDIT_ANCHOR and INTAKE_DATA_DIR say. Stop web, worker, beat and the signer first.
    """
    settings = _settings()
    target = database_url or settings.effective_database_url
    keyring = current_app.extensions["intake.keyring"]
    try:
        result = restore_backup(
            settings, folder, target, force=force, keyring=keyring, actor=cli_actor()
        )
    except BackupError as error:
        log.warning("backup_restore_refused", backup=str(folder), reason=str(error).splitlines()[0])
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "database": result.database,
                    "audit_head_seq": result.facts.audit_head_seq,
                    "alembic_revision": result.facts.alembic_revision,
                    "files": {name: str(path) for name, path in result.files.items()},
                    "replaced": {name: str(path) for name, path in result.replaced.items()},
                    "elapsed_seconds": result.elapsed_seconds,
                    "missing_key_ids": result.missing_key_ids,
                    "event_seq": result.event_seq,
                    "notes": result.notes,
                }
            )
        )
    else:
        click.echo(
            f"Restored {folder} (made {result.manifest['created_at']}) into {result.database} "
            f"in {result.elapsed_seconds:.2f} s: revision {result.facts.alembic_revision}, "
            f"{result.facts.audit_events} audit events up to seq {result.facts.audit_head_seq}."
        )
        for name, path in sorted(result.files.items()):
            size = _size(path.stat().st_size)
            click.echo(f"  {name:<26} {size:>10}  -> {path}")
        for name, path in sorted(result.replaced.items()):
            click.echo(f"  the previous {name} is kept as {path}")
        if result.event_seq is not None:
            click.echo(f"Recorded as audit event {result.event_seq} (backup.restored).")
        for note in result.notes:
            click.echo(f"Note: {note}")
        if result.missing_key_ids:
            click.echo(
                "WARNING: the keyring in use cannot open the restored data sealed under "
                f"{', '.join(result.missing_key_ids)}: it is not the installation's keyring. Put "
                "the keyring from the secret store in place (INTAKE_KEYRING, or keyring.json in "
                "the data folder, replacing one generated on this machine) before starting.",
                err=True,
            )
        click.echo(
            "Next: `intake retention purge` (shreds again what was shredded after the backup), "
            "`intake audit checkpoint` (with the signing key), `intake audit verify`, then "
            "start web, worker, beat and the signer. See docs/backup.md."
        )
    if result.missing_key_ids or result.notes:
        click.get_current_context().exit(1)
