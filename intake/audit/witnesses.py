"""Ask witnesses to cosign each new checkpoint, and read back who cosigned one.

Why: a log that holds its own signing key could show one history to the pharmacy's auditor and
another to a court. A witness (``intake audit witness``, intake_verify.witness, run by someone
else) remembers the last checkpoint it cosigned and cosigns a new one only when a consistency
proof shows the new tree extends the old: two diverging histories can never both carry its
cosignature. The signer submits every checkpoint it signs to each witness in
``INTAKE_AUDIT_WITNESSES`` over the C2SP tlog-witness protocol (``POST <url>/add-checkpoint``)
and keeps the cosignatures in the note it writes to the checkpoints file.

A witness that is down, slow or refuses delays nothing: the checkpoint is written without its
cosignature and the failure is logged (``audit_witness_failed``); the next checkpoint is sent
to it again with a proof from the size it reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from config import Settings
from intake_verify import cosignature, note
from intake_verify.note import NoteError
from intake_verify.witness import Conflict, WitnessError, request_cosignature

log = structlog.get_logger(__name__)

TIMEOUT_SECONDS = 5.0
ProofSource = Callable[[int], Sequence[bytes]]


@dataclass(frozen=True)
class Witness:
    """One configured witness: where it listens and the key its cosignatures verify with."""

    url: str
    vkey: str

    @property
    def verifier(self) -> note.Verifier:
        return note.Verifier.from_vkey(self.vkey)

    @property
    def name(self) -> str:
        return self.vkey.split("+", 1)[0]

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/add-checkpoint"


def configured_witnesses(settings: Settings) -> list[Witness]:
    return [Witness(*entry.split(" ", 1)) for entry in settings.audit_witnesses]


def _cosignature_lines(answer: str, witness: Witness, signed_note: str) -> list[str]:
    """The answer's lines that are valid cosignatures of ``signed_note`` by ``witness``."""
    good = []
    for line in answer.splitlines():
        if not line.strip():
            continue
        candidate = signed_note + line + "\n"
        try:
            cosignature.verify_cosignature(candidate, witness.verifier)
        except NoteError as error:
            log.warning("audit_witness_bad_cosignature", witness=witness.url, error=str(error))
            continue
        good.append(line)
    return good


def _ask(witness: Witness, old_size: int, proof_source: ProofSource, signed_note: str) -> str:
    proof = list(proof_source(old_size)) if old_size else []
    return request_cosignature(witness.url, old_size, proof, signed_note, TIMEOUT_SECONDS)


def _last_size(witness: Witness, previous_note: str | None, previous_size: int) -> int:
    """The size the witness last cosigned, as far as the log knows: the previous checkpoint's,
    if it carries this witness's cosignature; else 0 (a 409 then says the real size)."""
    if previous_note is None:
        return 0
    try:
        cosignature.verify_cosignature(previous_note, witness.verifier)
    except NoteError:  # not cosigned by it (or unreadable): start from 0
        return 0
    return previous_size


def collect_cosignatures(
    settings: Settings,
    signed_note: str,
    size: int,
    proof_source: ProofSource,
    *,
    previous: tuple[str, int] | None = None,
) -> str:
    """``signed_note`` with the cosignatures of every configured witness that gives one.

    ``proof_source(old_size)`` returns the consistency proof from ``old_size`` to ``size``.
    ``previous`` is the last checkpoint's (note, size), from which each witness's last size
    is guessed; on a 409 the request is sent once more from the size the witness reports.
    Unreachable or refusing witnesses are logged and skipped.
    """
    lines: list[str] = []
    for witness in configured_witnesses(settings):
        old_size = _last_size(witness, *(previous or (None, 0)))
        try:
            try:
                answer = _ask(witness, old_size, proof_source, signed_note)
            except Conflict as conflict:
                if conflict.size > size:
                    raise WitnessError(
                        f"the witness holds size {conflict.size}, beyond this checkpoint ({size})"
                    ) from None
                old_size = conflict.size  # the size the witness holds: retry once from there
                answer = _ask(witness, old_size, proof_source, signed_note)
        except (WitnessError, NoteError, OSError, ValueError) as error:
            log.warning(
                "audit_witness_failed",
                witness=witness.url,
                size=size,
                old_size=old_size,
                error=str(error) or type(error).__name__,
            )
            continue
        got = _cosignature_lines(answer, witness, signed_note)
        if got:
            log.info("audit_witness_cosigned", witness=witness.url, size=size)
        lines.extend(got)
    return signed_note + "".join(line + "\n" for line in lines)


def cosigned_by(settings: Settings, signed_note: str) -> list[str]:
    """Names of the configured witnesses whose cosignature on ``signed_note`` verifies."""
    names = []
    for witness in configured_witnesses(settings):
        try:
            cosignature.verify_cosignature(signed_note, witness.verifier)
        except NoteError:
            continue  # not cosigned by it
        names.append(witness.name)
    return names
