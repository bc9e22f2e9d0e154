"""Key rotation: a new primary KEK, and data keys rewrapped under it in the background.

Why: a key-encryption key that may have leaked (a departed operator, a backup gone astray)
must stop protecting data. Rotation adds a new primary KEK; new requests use it at once, and
``rewrap_data_keys`` re-encrypts each existing 32-byte data key under it, in small batches,
without touching the sealed documents. An old KEK can be removed from the keyring once
``key_usage`` shows no row uses it.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from intake.audit.chain import record_event
from intake.crypto import phi
from intake.extensions import DbSession
from intake.models import Request, User


def key_usage(session: DbSession) -> Counter[str]:
    """How many rows each KEK id protects (requests and staff TOTP secrets)."""
    usage: Counter[str] = Counter()
    for model in (Request, User):
        for kek_id, count in session.execute(
            select(model.kek_id, func.count())
            .where(model.kek_id.is_not(None))
            .group_by(model.kek_id)
        ):
            if kek_id:
                usage[kek_id] += count
    return usage


def write_keyring_file(path: Path, keyring: phi.Keyring) -> None:
    """Replace the keyring file atomically, keeping mode 0600."""
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(keyring.to_json())
    os.replace(temporary, path)


def record_rotation(session: DbSession, old: phi.Keyring, new: phi.Keyring, actor: str) -> None:
    record_event(
        session,
        actor=actor,
        action="key.rotated",
        details={"old_primary": old.primary, "new_primary": new.primary, "keys": sorted(new.keks)},
    )


def rewrap_data_keys(session: DbSession, keyring: phi.Keyring, batch: int = 500) -> int:
    """Rewrap up to ``batch`` data keys not under the primary KEK; returns how many."""
    done = 0
    rows = (
        session.execute(
            select(Request)
            .where(Request.kek_id.is_not(None), Request.kek_id != keyring.primary)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    for request in rows:
        assert request.kek_id is not None and request.wrapped_key is not None
        data_key = phi.unwrap_data_key(
            keyring, request.id, phi.WrappedKey(request.kek_id, request.wrapped_key)
        )
        wrapped = phi.wrap_data_key(keyring, request.id, data_key)
        request.kek_id, request.wrapped_key = wrapped.kek_id, wrapped.blob
        done += 1
    users = (
        session.execute(select(User).where(User.kek_id != keyring.primary).limit(batch))
        .scalars()
        .all()
    )
    for user in users:
        row_id = f"user:{user.id}"
        data_key = phi.unwrap_data_key(
            keyring, row_id, phi.WrappedKey(user.kek_id, user.wrapped_key)
        )
        wrapped = phi.wrap_data_key(keyring, row_id, data_key)
        user.kek_id, user.wrapped_key = wrapped.kek_id, wrapped.blob
        done += 1
    session.commit()
    return done
