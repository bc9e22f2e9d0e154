"""``intake audit signer``: the one process that holds the checkpoint signing key.

Why: whoever holds the private key can sign any history, so it is kept away from everything
that faces patients, staff or the network. Web, workers and beat verify with public keys and
refuse to start in production with the private key set (intake.audit.keys); this loop is the
only thing given it. It signs a checkpoint on start and then every
``INTAKE_AUDIT_CHECKPOINT_SECONDS``, each time first holding the chain against the anchor: a
mismatch is refused, logged (``audit_anchor_mismatch``) and retried at the next tick, so the
alert repeats until someone runs ``intake audit verify``.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import structlog
from flask import Flask

from intake.audit import keys
from intake.audit.checkpoints import AnchorCursor, CheckpointError, write_checkpoint
from intake.extensions import db

log = structlog.get_logger(__name__)

SIGNER_ACTOR = "system:signer"


def sign_once(app: Flask, cursor: AnchorCursor) -> int | None:
    """Sign a checkpoint unless nothing happened since the last; return its seq (None: idle)."""
    with app.app_context():
        try:
            signed = write_checkpoint(
                db.session,
                app.extensions["intake.settings"],
                actor=SIGNER_ACTOR,
                skip_idle=True,
                cursor=cursor,
            )
        finally:
            db.session.remove()
    return signed.seq if signed else None


def run_signer(app: Flask, stop: threading.Event | None = None, *, once: bool = False) -> None:
    """Sign on start, then every INTAKE_AUDIT_CHECKPOINT_SECONDS until ``stop`` (or SIGTERM)."""
    settings = app.extensions["intake.settings"]
    signer = keys.load_signer(settings)  # fail at start, not at the first tick
    if signer.verifier.raw not in {v.raw for v in keys.load_verifiers(settings)}:
        raise keys.AuditKeyError(
            "the signing key's public key is not in INTAKE_AUDIT_VERIFY_KEYS, so nobody could "
            f"check its checkpoints; add {signer.verifier.vkey}"
        )
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info(
        "audit_signer_started",
        key_id=signer.verifier.key_id,
        vkey=signer.verifier.vkey,
        every_seconds=settings.audit_checkpoint_seconds,
    )
    cursor = AnchorCursor()
    while True:
        try:
            sign_once(app, cursor)
        except CheckpointError as error:
            # Already logged as audit_chain_broken / audit_anchor_mismatch; keep refusing.
            log.error("audit_checkpoint_refused", problem=str(error))
            if once:
                raise
        if once or stop.wait(settings.audit_checkpoint_seconds):
            break
    log.info("audit_signer_stopped")
