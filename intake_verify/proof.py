"""The proof file (``intake-audit-proof/v1``): a request's audit events, provable offline.

A proof file holds a signed checkpoint (with any witnesses' cosignatures) and, for each of one
request's events that the checkpoint covers, the event's public leaf and its inclusion proof::

    {"format": "intake-audit-proof/v1", "origin": "<log origin>", "reference": "R-...",
     "checkpoint": "<the signed note text>",
     "events": [{"leaf_index": 41, "leaf": {<leaf record>}, "inclusion": ["<base64>", ...],
                 "opening": {"prev_hash": "<hex>", "canonical": "<chain JSON>"}}],
     "pending": 0}

``opening`` is optional (it discloses the full event, for an auditor entitled to it). Whoever
holds the log's public key can check the file with no database and no network: the log signed
the tree head, every leaf is in that tree, and every leaf belongs to the request. Every value
but ``pending`` is bound by a signature or a hash, so changing any bit of them makes the check
fail. ``pending``, the number of the request's events too recent for the checkpoint, is the
log's word and reported as such: nothing can prove an event that no checkpoint covers yet.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from intake_verify.checkpoint import Checkpoint, CheckpointError
from intake_verify.cosignature import verify_cosignature
from intake_verify.encoding import b64decode, b64encode
from intake_verify.leaf import check_opening, leaf_data
from intake_verify.merkle import ProofError, leaf_hash, verify_inclusion
from intake_verify.note import NoteError, Verifier, open_note

FORMAT = "intake-audit-proof/v1"
_TOP_KEYS = {"format", "origin", "reference", "checkpoint", "events", "pending"}
_EVENT_KEYS = {"leaf_index", "leaf", "inclusion"}
_OPENING_KEYS = {"prev_hash", "canonical"}


@dataclass(frozen=True)
class ProofReport:
    """What a proof file proved, or why it proved nothing (``ok`` False, ``problem`` set)."""

    ok: bool
    problem: str | None
    events: tuple[dict[str, Any], ...] = ()
    size: int = 0
    cosigned_by: tuple[str, ...] = ()
    origin: str | None = None
    reference: str | None = None
    checkpoint_time: datetime | None = None
    pending: int = 0


def proof_event(
    record: dict[str, Any], inclusion: Sequence[bytes], opening: tuple[str, str] | None = None
) -> dict[str, Any]:
    """One entry of ``events``: a leaf record, its inclusion proof, and optionally its opening."""
    event: dict[str, Any] = {
        "leaf_index": record["seq"] - 1,
        "leaf": dict(record),
        "inclusion": [b64encode(h) for h in inclusion],
    }
    if opening is not None:
        event["opening"] = {"prev_hash": opening[0], "canonical": opening[1]}
    return event


def make_proof(
    origin: str, reference: str, checkpoint: str, events: list[dict[str, Any]], pending: int
) -> dict[str, Any]:
    """A proof file's content, ready for ``json.dumps``."""
    return {
        "format": FORMAT,
        "origin": origin,
        "reference": reference,
        "checkpoint": checkpoint,
        "events": events,
        "pending": pending,
    }


def verify_proof(
    data: Mapping[str, Any] | str | bytes,
    log_vkeys: Iterable[str | Verifier],
    witness_vkeys: Iterable[str | Verifier] = (),
) -> ProofReport:
    """Check a proof file against the log's key(s) and require every given witness's cosignature.

    Several log keys may be given (an old and a new one after a rotation); any one of them
    signing the checkpoint suffices. Keys that do not parse raise NoteError: that is the
    caller's mistake, not the proof's. Everything wrong with the proof is a report with
    ``ok=False`` and the first problem found.
    """
    logs = [_verifier(key) for key in log_vkeys]
    witnesses = [_verifier(key) for key in witness_vkeys]
    if not logs:
        raise NoteError("verifying a proof needs the log's public key")
    try:
        return _verify(_load(data), logs, witnesses)
    except (ProofError, NoteError, CheckpointError) as exc:
        return ProofReport(ok=False, problem=str(exc))


def _verifier(key: str | Verifier) -> Verifier:
    return key if isinstance(key, Verifier) else Verifier.from_vkey(key)


def _load(data: Mapping[str, Any] | str | bytes) -> Mapping[str, Any]:
    if isinstance(data, Mapping):
        return data
    try:
        loaded = json.loads(data, object_pairs_hook=_no_repeated_keys, parse_constant=_no_nan)
    except ValueError as exc:
        raise ProofError(f"the proof file is not JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ProofError("the proof file is not a JSON object")
    return loaded


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key is repeated")
    return dict(pairs)


def _no_nan(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _verify(
    data: Mapping[str, Any], logs: list[Verifier], witnesses: list[Verifier]
) -> ProofReport:
    if set(data) != _TOP_KEYS:
        raise ProofError("the proof file has keys " + ", ".join(sorted(map(str, data))))
    if data["format"] != FORMAT:
        raise ProofError(f"not an {FORMAT} proof file")
    origin = _typed(data, "origin", str)
    reference = _typed(data, "reference", str)
    note = _typed(data, "checkpoint", str)
    pending = _typed(data, "pending", int)
    if pending < 0:
        raise ProofError("pending is a count")
    events = _typed(data, "events", list)

    opened = open_note(note, logs)
    checkpoint = Checkpoint.parse(opened.text)
    if checkpoint.origin != origin:
        raise ProofError(f"the checkpoint is from {checkpoint.origin!r}, not {origin!r}")
    cosigned_by = []
    for witness in witnesses:
        verify_cosignature(note, witness)
        cosigned_by.append(witness.name)

    proven = []
    last_index = -1
    for n, event in enumerate(events, start=1):
        record = _check_event(n, event, checkpoint, reference)
        if event["leaf_index"] <= last_index:
            raise ProofError(f"event {n}: leaf indexes must increase")
        last_index = event["leaf_index"]
        proven.append(record)
    return ProofReport(
        ok=True,
        problem=None,
        events=tuple(proven),
        size=checkpoint.size,
        cosigned_by=tuple(cosigned_by),
        origin=origin,
        reference=reference,
        checkpoint_time=checkpoint.time,
        pending=pending,
    )


def _check_event(n: int, event: object, checkpoint: Checkpoint, reference: str) -> dict[str, Any]:
    if not isinstance(event, dict) or not _EVENT_KEYS <= set(event) <= _EVENT_KEYS | {"opening"}:
        raise ProofError(f"event {n}: it has the keys leaf_index, leaf, inclusion (and opening)")
    index = _typed(event, "leaf_index", int)
    record = _typed(event, "leaf", dict)
    data = leaf_data(record)
    if record["seq"] != index + 1:
        raise ProofError(f"event {n}: leaf index {index} does not hold seq {record['seq']}")
    if record["reference"] != reference:
        raise ProofError(f"event {n} (seq {record['seq']}) is not an event of {reference}")
    inclusion = []
    for item in _typed(event, "inclusion", list):
        if not isinstance(item, str):
            raise ProofError(f"event {n}: the inclusion proof is a list of base64 hashes")
        try:
            inclusion.append(b64decode(item))
        except ValueError as exc:
            raise ProofError(f"event {n}: an inclusion proof hash is {exc}") from exc
    try:
        verify_inclusion(index, checkpoint.size, leaf_hash(data), inclusion, checkpoint.root)
    except ProofError as exc:
        raise ProofError(f"event {n} (seq {record['seq']}): {exc}") from exc
    if "opening" in event:
        opening = _typed(event, "opening", dict)
        if set(opening) != _OPENING_KEYS:
            raise ProofError(f"event {n}: an opening has the keys prev_hash and canonical")
        check_opening(record, opening["prev_hash"], opening["canonical"])
    return record


def _typed(mapping: Mapping[str, Any], key: str, kind: type) -> Any:
    value = mapping[key]
    # bool is an int to Python, but true is not a count or an index.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProofError(f"{key} must be of type {kind.__name__}")
    return value
