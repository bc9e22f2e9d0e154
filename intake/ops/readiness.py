"""How ``intake serve`` knows its worker, beat and signer have started, to print the banner after
their start-up lines rather than in the middle of them (a fixed pause was too short on a busy
machine). Each child touches a file named for its role in ``INTAKE_READY_DIR`` once ready; the
variable is set by ``intake serve`` only, so elsewhere this does nothing."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

ENV = "INTAKE_READY_DIR"


def mark_ready(role: str) -> None:
    folder = os.environ.get(ENV)
    if folder:
        Path(folder, role).touch()


def fresh_folder(folder: Path) -> Path:
    """An empty folder for this start: marks of an earlier run must not count."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def wait_ready(folder: Path, roles: Iterable[str], timeout: float) -> list[str]:
    """Wait until every role has marked itself ready, or the timeout; return those missing."""
    deadline = time.monotonic() + timeout
    missing = [role for role in roles if not (folder / role).exists()]
    while missing and time.monotonic() < deadline:
        time.sleep(0.1)
        missing = [role for role in missing if not (folder / role).exists()]
    return missing
