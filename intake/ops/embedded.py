"""Secrets for the embedded profile, generated once into the data folder.

Production reads every secret from its environment and never generates one (see
config.settings). On a single machine with nothing configured, Intake creates the Flask secret,
the keyring and the audit signing key in ``INTAKE_DATA_DIR`` with mode 0600 and logs that it
did, so the operator knows which files to back up: losing the keyring loses every request.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import structlog

from config.settings import read_secret_setting

__all__ = ["ensure_secret_file", "generate_secret_key", "read_secret_setting"]

log = structlog.get_logger(__name__)


def ensure_secret_file(path: Path, generate: Callable[[], str], what: str) -> str:
    """Return the secret in ``path``, creating it (mode 0600) if it does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(generate())
    log.warning(
        "secret_generated",
        secret=what,
        path=str(path),
        mode="0600",
        advice="back this file up; production reads it from the environment",
    )
    return path.read_text(encoding="utf-8").strip()


def generate_secret_key() -> str:
    return secrets.token_urlsafe(48)
