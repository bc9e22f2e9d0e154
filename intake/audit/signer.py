"""``intake audit signer``: the one process that holds the checkpoint signing key.

Why: whoever holds the private key can sign any history, so it is kept away from everything
that faces patients, staff or the network. Web, workers and beat verify with public keys and
refuse to start in production with the private key set (intake.audit.keys); this loop is the
only thing given it. It signs a checkpoint on start and then every
``INTAKE_AUDIT_CHECKPOINT_SECONDS``, each time first holding the chain against the anchor: a
mismatch is refused, logged (``audit_anchor_mismatch``) and retried at the next tick, so the
alert repeats until someone runs ``intake audit verify``.

Each tick checks only what is new since the last checkpoint. On start, and every
``FULL_CHECK_TICKS`` ticks, the signer also holds the whole trail (every event, every
checkpoint and its root, the whole anchor) as ``verify`` does: damage to older history cannot
make a new checkpoint lie (its root grows from the last signed one), but it must not go
unannounced until a compliance officer happens to run verify. While the trail is damaged the
signer refuses every tick and checks the whole trail again each time.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import structlog
from flask import Flask

from intake.audit import keys
from intake.audit.checkpoints import (
    AnchorCursor,
    CheckpointError,
    verify_trail,
    write_checkpoint,
)
from intake.extensions import db
from intake.ops import readiness

log = structlog.get_logger(__name__)

SIGNER_ACTOR = "system:signer"
# The whole trail is checked on start and every this many ticks (hourly at the default 300 s).
FULL_CHECK_TICKS = 12


def check_whole_trail(app: Flask) -> None:
    """Hold the whole trail as ``intake audit verify`` does; raise CheckpointError if damaged.

    Freshness is left out: a signer that was down finds old unsigned events, which is what it
    is about to fix, not a reason to refuse.
    """
    with app.app_context():
        try:
            report = verify_trail(
                db.session, app.extensions["intake.settings"], with_freshness=False
            ).chain
        finally:
            db.session.remove()
    if not report.ok:
        log.error(
            "audit_trail_broken", first_bad_seq=report.first_bad_seq, problem=report.problem
        )
        raise CheckpointError(
            f"refusing to sign: the audit trail is damaged at seq {report.first_bad_seq}: "
            f"{report.problem}; run `intake audit verify`"
        )


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
    tick, damaged = 0, False
    while True:
        try:
            if damaged or tick % FULL_CHECK_TICKS == 0:
                damaged = True
                check_whole_trail(app)
                damaged = False
            sign_once(app, cursor)
            if tick == 0:
                readiness.mark_ready("signer")
        except CheckpointError as error:
            # Already logged as audit_chain_broken / audit_anchor_mismatch; keep refusing.
            log.error("audit_checkpoint_refused", problem=str(error))
            if once:
                raise
        tick += 1
        if once or stop.wait(settings.audit_checkpoint_seconds):
            break
    log.info("audit_signer_stopped")
