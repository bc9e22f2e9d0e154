"""A C2SP witness (c2sp.org/tlog-witness): it cosigns a checkpoint only if it extends the last.

Run by someone other than the log's operator (an outside auditor), a witness keeps, for each log
it follows, the last checkpoint it cosigned. It cosigns a new one only when the log proves, with
a consistency proof, that the new tree extends that one. A log that rewrote history (a tree of
the same size with another root, or one the proof cannot connect) is refused and the attempt is
kept as evidence. Readers who require the witness's cosignature can then no longer be shown a
history the witness did not see.

What it assumes: the state file is the witness's own (the log cannot write it), and one witness
process serves one state file (a lock serializes requests inside the process).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from intake_verify.checkpoint import Checkpoint, CheckpointError
from intake_verify.cosignature import cosign
from intake_verify.encoding import b64decode, b64encode
from intake_verify.merkle import EMPTY_ROOT, ProofError, verify_consistency
from intake_verify.note import (
    ALG_COSIGNATURE_V1,
    NoteError,
    Signer,
    Verifier,
    open_note,
    split_note,
)

MAX_PROOF_LINES = 63  # what the protocol allows a client to send
MAX_BODY = 64 * 1024
SIZE_CONTENT_TYPE = "text/x.tlog.size"


class WitnessError(Exception):
    """A refusal, with the HTTP status the witness protocol gives it."""

    status = 400


class BadRequest(WitnessError):
    status = 400


class Forbidden(WitnessError):
    status = 403


class UnknownLog(WitnessError):
    status = 404


class Conflict(WitnessError):
    """The client's old size is not the one the witness holds; ``size`` is the one it holds."""

    status = 409

    def __init__(self, size: int) -> None:
        super().__init__(f"the witness holds size {size}")
        self.size = size


class Fork(WitnessError):
    """The checkpoint does not extend the one the witness holds: refused, evidence kept."""

    status = 422


class Witness:
    """The witness's checks and its state; ``add_checkpoint`` is the protocol's one write."""

    def __init__(
        self,
        state_path: str | os.PathLike[str],
        signer: Signer,
        log_verifiers: Sequence[Verifier],
        clock: Callable[[], float] = time.time,
    ) -> None:
        if signer.alg != ALG_COSIGNATURE_V1:
            raise NoteError("a witness signs with a cosignature (type 0x04) key")
        self.state_path = Path(state_path)
        self.evidence_path = self.state_path.with_name(self.state_path.name + ".evidence.jsonl")
        self.signer = signer
        self._logs: dict[str, list[Verifier]] = {}
        for verifier in log_verifiers:
            # A log's key name is its origin (c2sp.org/tlog-checkpoint recommends it).
            self._logs.setdefault(verifier.name, []).append(verifier)
        self._clock = clock
        self._lock = threading.Lock()

    def held(self, origin: str) -> dict[str, Any] | None:
        """The last checkpoint cosigned for ``origin``: size, root (base64) and the note."""
        state = self._read_state()
        entry: dict[str, Any] | None = state["logs"].get(origin)
        return entry

    def cosigned_note(self, origin_hash: str) -> str | None:
        """The last cosigned note of the log whose origin has SHA-256 hex ``origin_hash``."""
        for origin in self._logs:
            if hashlib.sha256(origin.encode()).hexdigest() == origin_hash:
                held = self.held(origin)
                return str(held["note"]) if held else None
        return None

    def add_checkpoint(self, old_size: int, consistency_proof: Sequence[bytes], note: str) -> str:
        """Cosign ``note`` if it extends the checkpoint held; return the cosignature line."""
        try:
            text, _ = split_note(note)
            checkpoint = Checkpoint.parse(text)
        except (NoteError, CheckpointError) as exc:
            raise BadRequest(f"not a checkpoint: {exc}") from exc
        verifiers = self._logs.get(checkpoint.origin)
        if not verifiers:
            raise UnknownLog(f"unknown log {checkpoint.origin!r}")
        try:
            open_note(note, verifiers)
        except NoteError as exc:
            raise Forbidden(str(exc)) from exc
        if not 0 <= old_size <= checkpoint.size:
            raise BadRequest(f"old size {old_size} is not within the checkpoint's size")
        if len(consistency_proof) > MAX_PROOF_LINES:
            raise BadRequest("too many consistency proof lines")
        with self._lock:
            state = self._read_state()
            held = state["logs"].get(checkpoint.origin)
            held_size = held["size"] if held else 0
            if old_size != held_size:
                raise Conflict(held_size)
            problem = self._inconsistency(held, checkpoint, consistency_proof)
            if problem:
                self._record_evidence(held, old_size, consistency_proof, note, problem)
                raise Fork(problem)
            timestamp = int(self._clock())
            line = cosign(checkpoint.body(), self.signer, timestamp)
            state["logs"][checkpoint.origin] = {
                "size": checkpoint.size,
                "root": b64encode(checkpoint.root),
                "note": note + line,
            }
            self._write_state(state)  # persisted before the cosignature leaves
        return line

    def _inconsistency(
        self, held: dict[str, Any] | None, checkpoint: Checkpoint, proof: Sequence[bytes]
    ) -> str | None:
        if checkpoint.size == 0 and checkpoint.root != EMPTY_ROOT:
            return "a tree of size 0 has the empty root"
        if held is None:
            return "a first checkpoint needs no consistency proof" if proof else None
        held_root = b64decode(held["root"])
        if checkpoint.size == held["size"] and checkpoint.root != held_root:
            return f"fork: size {checkpoint.size} was cosigned with another root"
        try:
            verify_consistency(held["size"], checkpoint.size, held_root, checkpoint.root, proof)
        except ProofError as exc:
            return f"not an extension of size {held['size']}: {exc}"
        return None

    def _read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {"v": 1, "logs": {}}
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        """Replace the state file atomically: a crash leaves the old state or the new, whole."""
        directory = self.state_path.parent
        fd, temp = tempfile.mkstemp(dir=directory, prefix=self.state_path.name + ".")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(state, file, sort_keys=True, indent=1)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.state_path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _record_evidence(
        self,
        held: dict[str, Any] | None,
        old_size: int,
        proof: Sequence[bytes],
        note: str,
        problem: str,
    ) -> None:
        """Keep a refused, validly signed checkpoint: it proves the log showed two histories."""
        entry = {
            "time": datetime.now(UTC).isoformat(),
            "problem": problem,
            "held": held,
            "offered": {"old_size": old_size, "proof": [b64encode(p) for p in proof], "note": note},
        }
        with self.evidence_path.open("a") as file:
            file.write(json.dumps(entry, sort_keys=True) + "\n")
            file.flush()
            os.fsync(file.fileno())


def add_checkpoint_body(old_size: int, consistency_proof: Sequence[bytes], note: str) -> bytes:
    """The request body of ``POST /add-checkpoint``: old size, proof lines, blank line, note."""
    lines = [f"old {old_size}", *(b64encode(p) for p in consistency_proof)]
    return ("".join(line + "\n" for line in lines) + "\n" + note).encode()


def parse_add_checkpoint_body(body: bytes) -> tuple[int, list[bytes], str]:
    """Split an ``add-checkpoint`` request body; BadRequest when it is malformed."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("the body is not UTF-8") from exc
    head, blank, note = text.partition("\n\n")
    lines = head.split("\n")
    if not blank or not lines[0].startswith("old "):
        raise BadRequest("the body starts with an old size line and a blank line ends the proof")
    size = lines[0][4:]
    if not size.isdigit() or not size.isascii() or (size != "0" and size.startswith("0")):
        raise BadRequest("the old size is a decimal number")
    try:
        proof = [b64decode(line) for line in lines[1:]]
    except ValueError as exc:
        raise BadRequest(f"a consistency proof line is {exc}") from exc
    return int(size), proof, note


class _Handler(BaseHTTPRequestHandler):
    witness: Witness  # set on the subclass make_server builds

    def do_POST(self) -> None:
        if self.path != "/add-checkpoint":
            self._reply(404, "not found\n")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            self._reply(400, "a body of at most 64 KiB is required\n")
            return
        try:
            old_size, proof, note = parse_add_checkpoint_body(self.rfile.read(length))
            line = self.witness.add_checkpoint(old_size, proof, note)
        except Conflict as exc:
            self._reply(409, f"{exc.size}\n", SIZE_CONTENT_TYPE)
        except WitnessError as exc:
            self._reply(exc.status, f"{exc}\n")
        else:
            self._reply(200, line)

    def do_GET(self) -> None:
        """``GET /<sha256(origin) hex>/checkpoint``: the last cosigned checkpoint of that log."""
        parts = self.path.strip("/").split("/")
        note = None
        if len(parts) == 2 and parts[1] == "checkpoint":
            note = self.witness.cosigned_note(parts[0])
        if note is None:
            self._reply(404, "not found\n")
        else:
            self._reply(200, note)

    def _reply(
        self, status: int, text: str, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the witness's record is its state and evidence files, not stderr."""


def make_server(witness: Witness, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for ``witness`` (port 0: any free port; see ``server_address``)."""
    handler = type("WitnessHandler", (_Handler,), {"witness": witness})
    return ThreadingHTTPServer((host, port), handler)


def request_cosignature(
    url: str, old_size: int, consistency_proof: Sequence[bytes], note: str, timeout: float = 10
) -> str:
    """Ask the witness at ``url`` to cosign ``note``; the cosignature line(s) it returns.

    Raises the WitnessError subclass of the status it answers (Conflict carries its size).
    """
    request = urllib.request.Request(  # noqa: S310 (the operator configures the witness URL)
        url.rstrip("/") + "/add-checkpoint",
        data=add_checkpoint_body(old_size, consistency_proof, note),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace").strip()
        if exc.code == 409 and text.isdigit():
            raise Conflict(int(text)) from exc
        error = {400: BadRequest, 403: Forbidden, 404: UnknownLog, 422: Fork}.get(exc.code)
        if error is None:
            raise
        raise error(text) from exc
