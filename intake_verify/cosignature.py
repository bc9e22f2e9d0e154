"""C2SP tlog-cosignature/v1: a witness's timestamped signature over a checkpoint it checked.

A cosignature says "as of this time, this is the largest tree I have seen for this log, and it
is consistent with everything I saw before". A reader who trusts a witness and finds its
cosignature on a checkpoint knows that the log did not show that witness a different history.
It is an ordinary note signature line (type 0x04) whose bytes are the 8-byte timestamp followed
by an Ed25519 signature of ``cosignature/v1\\ntime <t>\\n`` and the checkpoint body.
"""

from __future__ import annotations

from intake_verify.note import (
    ALG_COSIGNATURE_V1,
    NoteError,
    Signer,
    Verifier,
    cosignature_message,
    open_note,
)


def cosign(body: str, signer: Signer, timestamp: int) -> str:
    """The cosignature line of ``signer`` over the checkpoint ``body`` at POSIX ``timestamp``."""
    if signer.alg != ALG_COSIGNATURE_V1:
        raise NoteError("cosigning needs a cosignature (type 0x04) key")
    if not 0 < timestamp < 1 << 63:
        raise NoteError("a cosignature's timestamp must be a positive POSIX time")
    signature = signer.private_key.sign(cosignature_message(body, timestamp))
    return signer.signature_line(timestamp.to_bytes(8, "big") + signature)


def verify_cosignature(note: str, witness_verifier: Verifier) -> int:
    """The timestamp of the witness's valid cosignature on ``note``; NoteError if it has none."""
    if witness_verifier.alg != ALG_COSIGNATURE_V1:
        raise NoteError(f"{witness_verifier.name} is not a cosignature (type 0x04) key")
    try:
        opened = open_note(note, [witness_verifier])
    except NoteError as exc:
        raise NoteError(f"no valid cosignature from {witness_verifier.name}: {exc}") from exc
    signature = opened.verified_by(witness_verifier)
    assert signature is not None  # open_note refuses a note no given key signed
    return int.from_bytes(signature.signature[:8], "big")
