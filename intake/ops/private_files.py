"""Keep what Intake writes to disk readable by its own user only.

Why: the data folder holds the embedded database (sealed PHI, but also the queue's plain
columns), its write-ahead log, the logs, the audit checkpoints and, on the embedded profile, the
generated keys. Under a default umask of 022 every other account on the machine could read the
database and logs. Every Intake process therefore starts with ``umask 077``, the data folder is
0700, and files left 0644 by an older version are narrowed to 0600 at start.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

from config import Settings

log = structlog.get_logger(__name__)

UMASK = 0o077


def protect_data_dir(data_dir: Path) -> None:
    """Set the process umask and create (or narrow) the data folder to 0700."""
    os.umask(UMASK)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _narrow(data_dir, 0o700)


def _narrow(path: Path, mode: int) -> None:
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & ~mode:
        try:
            path.chmod(current & mode)
        except PermissionError:
            log.warning("file_mode_too_open", path=str(path), mode=oct(current))


def _sqlite_path(settings: Settings) -> Path | None:
    url = settings.effective_database_url
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == prefix:
        return None
    return Path(url[len(prefix) :].split("?", 1)[0])


def protect_existing(data_dir: Path, settings: Settings) -> None:
    """Narrow the database, its WAL, the logs and the checkpoint files to 0600."""
    paths: list[Path] = []
    database = _sqlite_path(settings)
    if database is not None:
        paths += [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    paths += [p for p in data_dir.iterdir() if p.is_file()]
    logs = data_dir / "logs"
    if logs.is_dir():
        _narrow(logs, 0o700)
        paths += [p for p in logs.iterdir() if p.is_file()]
    if settings.audit_checkpoints is not None:
        paths.append(Path(settings.audit_checkpoints))
    for path in paths:
        _narrow(path, 0o600)
