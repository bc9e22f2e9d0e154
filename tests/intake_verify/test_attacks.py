"""Attacks on the verifier by a malicious log, a proof file's author, and the network.

Each test is an attack that once worked (or a guarantee worth pinning down); the comment says
who attacks and what they would gain.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from intake_verify.checkpoint import Checkpoint, time_extension
from intake_verify.encoding import b64encode
from intake_verify.leaf import leaf_data, leaf_record
from intake_verify.merkle import EMPTY_ROOT, MerkleTree, leaf_hash
from intake_verify.note import (
    ALG_COSIGNATURE_V1,
    NoteError,
    Signer,
    Verifier,
    generate_key,
    open_note,
    sign_note,
)
from intake_verify.proof import make_proof, proof_event, verify_proof
from intake_verify.witness import (
    BadRequest,
    Witness,
    WitnessError,
    make_server,
    parse_add_checkpoint_body,
)

from .conftest import SIGNED_AT

ORIGIN = "intake.example/audit"
REF = "R-AAAA-BBBB"
SCRIPT = str(Path(sys.executable).with_name("intake-verify"))


def canonical(seq: int, **fields: Any) -> str:
    body = {
        "action": "phi.viewed",
        "actor": "staff:17",
        "actor_role": "pharmacist",
        "created_at": "2026-11-24T10:39:14.541465Z",
        "details": {},
        "ip_hmac": None,
        "outcome": "success",
        "reference": REF,
        "seq": seq,
        **fields,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class SmallLog:
    """A malicious log: it signs whatever leaves it likes."""

    def __init__(self) -> None:
        self.skey, self.vkey = generate_key(ORIGIN)
        self.signer = Signer.from_skey(self.skey)

    def proof(
        self,
        records: list[dict[str, Any]],
        prove: list[int],
        openings: dict[int, tuple[str, str]] | None = None,
        reference: str = REF,
        origin: str = ORIGIN,
    ) -> dict[str, Any]:
        tree = MerkleTree(leaf_hash(leaf_data(r)) for r in records)
        body = Checkpoint(origin, len(records), tree.root(), (time_extension(SIGNED_AT),)).body()
        note = sign_note(body, self.signer)
        events = [
            proof_event(records[seq - 1], tree.inclusion_proof(seq - 1), (openings or {}).get(seq))
            for seq in prove
        ]
        return make_proof(origin, reference, note, events, pending=0)


def record(seq: int, chain_hash: str | None = None, **fields: Any) -> dict[str, Any]:
    values = {
        "created_at": "2026-11-24T10:39:14.541465Z",
        "action": "phi.viewed",
        "reference": REF,
        "outcome": "success",
        "actor_role": "pharmacist",
        "team": "ivig-es",
        **fields,
    }
    return leaf_record(seq, chain_hash=chain_hash or "ab" * 32, **values)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The command's output as the terminal gets it (no newline translation hiding a CR)."""
    result = subprocess.run([SCRIPT, *args], capture_output=True, timeout=60)
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


# --- The proof file and the CLI ---------------------------------------------------------------


def test_a_failed_proof_cannot_print_a_forged_ok(tmp_path: Path) -> None:
    """A proof file's author (no key needed) puts terminal controls in a JSON key that the
    failure message repeats: the terminal erases "PROOF FAILED" and shows "Proof verified"."""
    forged = "\r\x1b[2KProof verified: 0 event(s) of R-AAAA-BBBB are in the audit log\x1b[8m"
    path = tmp_path / "proof.json"
    path.write_text(json.dumps({forged: 1}))
    result = run("proof", str(path), "--key", SmallLog().vkey)
    assert result.returncode == 1
    assert result.stdout.startswith("PROOF FAILED")
    assert "\x1b" not in result.stdout and "\r" not in result.stdout


def test_a_log_cannot_disguise_a_proven_event_on_the_terminal(tmp_path: Path) -> None:
    """A malicious log signs a leaf whose action, seen on a terminal, reads as another one, or
    that cannot be printed at all (a lone surrogate) after "Proof verified" was printed."""
    log = SmallLog()
    records = [
        record(1, action="phi.viewed\r\x1b[2K  seq 1  request.routed"),
        record(2, team="\ud800"),
    ]
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(log.proof(records, [1, 2])))
    result = run("proof", str(path), "--key", log.vkey)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert "phi.viewed" in result.stdout and "\\ud800" in result.stdout


def test_a_proof_of_no_event_does_not_say_verified(tmp_path: Path) -> None:
    """Anyone can take a public checkpoint and write a proof with no events for any reference:
    "Proof verified: 0 event(s) of R-..." would read as "nobody looked at my request"."""
    log = SmallLog()
    proof = log.proof([record(1)], [], reference="R-ANY-ONE")
    assert verify_proof(proof, [log.vkey]).events == ()
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(proof))
    result = run("proof", str(path), "--key", log.vkey)
    assert result.returncode == 1
    assert "Proof verified" not in result.stdout and "no event" in result.stdout


def test_a_proof_without_required_witness_says_so(tmp_path: Path) -> None:
    """Without --witness the log alone vouches for the tree: it could be a view it showed only
    this reader (a fork). The output must not let that pass unsaid."""
    log = SmallLog()
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(log.proof([record(1)], [1])))
    result = run("proof", str(path), "--key", log.vkey)
    assert result.returncode == 0
    assert "no witness" in result.stdout.lower()


def test_a_huge_tree_size_is_a_failed_proof_not_a_crash() -> None:
    """A malicious log signs a checkpoint whose size has 5000 digits: int() raises a plain
    ValueError (Python's digit limit) that escaped verify_proof as a traceback."""
    log = SmallLog()
    proof = log.proof([record(1)], [1])
    body = f"{ORIGIN}\n{'9' * 5000}\n{'A' * 43}=\n"
    proof["checkpoint"] = sign_note(body, log.signer)
    report = verify_proof(proof, [log.vkey])
    assert not report.ok and "size" in str(report.problem)
    # C2SP tree sizes are uint64.
    body = f"{ORIGIN}\n{2**64}\n{'A' * 43}=\n"
    assert not verify_proof({**proof, "checkpoint": sign_note(body, log.signer)}, [log.vkey]).ok


def test_an_opening_that_is_not_text_a_hash_can_cover_is_a_report() -> None:
    """A proof's author puts a lone surrogate in the opening: encoding it raised."""
    log = SmallLog()
    proof = log.proof([record(1)], [1], {1: ("00" * 32, canonical(1))})
    proof["events"][0]["opening"]["canonical"] = "\ud800"
    report = verify_proof(proof, [log.vkey])
    assert not report.ok and "opening" in str(report.problem)


def test_an_opening_must_be_the_canonical_text() -> None:
    """A malicious log hashes a non-canonical event with a repeated key: Python's json keeps the
    last value (which agrees with the leaf), other parsers the first (another actor, another
    action). The chain's canonical form has one spelling, so anything else is refused."""
    log = SmallLog()
    prev = "00" * 32
    text = '{"action":"request.routed","actor":"staff:99",' + canonical(1)[1:]
    assert json.loads(text)["action"] == "phi.viewed"  # what the verifier compares
    chain_hash = hashlib.sha256(f"{prev}\n{text}".encode()).hexdigest()
    proof = log.proof([record(1, chain_hash)], [1], {1: (prev, text)})
    report = verify_proof(proof, [log.vkey])
    assert not report.ok and "canonical" in str(report.problem)
    # Spaces or another key order are refused too; the canonical text itself verifies.
    for other in (canonical(1).replace(",", ", "), json.dumps(json.loads(canonical(1)))):
        chain_hash = hashlib.sha256(f"{prev}\n{other}".encode()).hexdigest()
        proof = log.proof([record(1, chain_hash)], [1], {1: (prev, other)})
        assert not verify_proof(proof, [log.vkey]).ok
    good = canonical(1)
    chain_hash = hashlib.sha256(f"{prev}\n{good}".encode()).hexdigest()
    assert verify_proof(log.proof([record(1, chain_hash)], [1], {1: (prev, good)}), [log.vkey]).ok


def test_a_checkpoint_of_another_log_signed_with_the_same_key_is_refused() -> None:
    """An operator reuses its key for a staging log: a staging checkpoint (and its events)
    passed as one of the audit log. A log's key name is its origin, as the witness requires."""
    log = SmallLog()
    staging = "intake.example/staging"
    proof = log.proof([record(1)], [1], origin=staging)
    report = verify_proof(proof, [log.vkey])
    assert not report.ok and staging in str(report.problem)


def test_a_witness_key_is_not_a_log_key(tmp_path: Path) -> None:
    """An auditor pastes a witness's key as --key: a cosignature (type 0x04) then counted as
    the log's own signature, so the log's signature was no longer required at all."""
    log = SmallLog()
    _, witness_vkey = generate_key(ORIGIN, ALG_COSIGNATURE_V1)
    with pytest.raises(NoteError, match="cosigner"):
        verify_proof(log.proof([record(1)], [1]), [witness_vkey])
    # On the command line: a usage error (exit 2), not a traceback.
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(log.proof([record(1)], [1])))
    result = run("proof", str(path), "--key", witness_vkey)
    assert result.returncode == 2, result.stderr
    assert "cosigner" in result.stderr and "Traceback" not in result.stderr


def test_signature_lines_are_split_on_newlines_only() -> None:
    """A note whose signature lines are joined by U+2028 verified here (str.splitlines splits
    on it) but not in Go's note package: two tools must not disagree on a signed note."""
    skey, vkey = generate_key(ORIGIN)
    note = sign_note(f"{ORIGIN}\n1\n{'A' * 43}=\n", Signer.from_skey(skey))
    _, other = generate_key("other.example/w")
    line = f"\u2014 other.example/w {'A' * 92}\n"
    for sep in ("\u2028", "\x85", "\u2029"):
        joined = note[:-1] + sep + line
        with pytest.raises(NoteError):
            open_note(joined, [Verifier.from_vkey(vkey)])


# --- The witness ---------------------------------------------------------------------------


@pytest.fixture
def keys() -> dict[str, str]:
    log_skey, log_vkey = generate_key(ORIGIN)
    skey, vkey = generate_key("witness.example/w1", ALG_COSIGNATURE_V1)
    return {"log_skey": log_skey, "log_vkey": log_vkey, "skey": skey, "vkey": vkey}


def tree_note(log_skey: str, size: int) -> tuple[MerkleTree, str]:
    tree = MerkleTree(leaf_hash(i.to_bytes(4, "big")) for i in range(max(size, 1)))
    root = tree.root(size)
    return tree, sign_note(Checkpoint(ORIGIN, size, root).body(), Signer.from_skey(log_skey))


def witness(path: Path, keys: dict[str, str], clock: Any = time.time) -> Witness:
    return Witness(
        path, Signer.from_skey(keys["skey"]), [Verifier.from_vkey(keys["log_vkey"])], clock
    )


def test_a_witness_that_saw_the_empty_tree_cosigns_its_extensions(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    """A log's first checkpoint is of size 0 (a fresh install): the next one, old size 0, was
    refused as a fork (verify_consistency(0, n) proves nothing) and false evidence recorded, so
    the witness could never cosign that log again."""
    w = witness(tmp_path / "w.json", keys)
    _, empty = tree_note(keys["log_skey"], 0)
    assert Checkpoint.parse(empty.split("\n\n")[0] + "\n").root == EMPTY_ROOT
    w.add_checkpoint(0, [], empty)
    tree, note = tree_note(keys["log_skey"], 5)
    w.add_checkpoint(0, [], note)
    assert w.held(ORIGIN)["size"] == 5  # type: ignore[index]
    assert not w.evidence_path.exists()
    # From the empty tree there is nothing to prove: a proof sent anyway is refused.
    other = tmp_path / "other.json"
    w = witness(other, keys)
    w.add_checkpoint(0, [], empty)
    with pytest.raises(WitnessError):
        w.add_checkpoint(0, [bytes(32)], note)


def test_two_witness_processes_on_one_state_cannot_cosign_a_fork(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    """Two witness instances on one state file (a restart that overlaps, a second port): each
    read size 10, and one cosigned an extension to 20 while the other cosigned a different
    tree of 20, so the witness vouched for two histories."""
    release, inside = threading.Event(), threading.Event()

    def slow_clock() -> float:
        inside.set()
        release.wait(5)
        return time.time()

    first = witness(tmp_path / "w.json", keys, clock=slow_clock)
    second = witness(tmp_path / "w.json", keys)
    _, note10 = tree_note(keys["log_skey"], 10)
    second.add_checkpoint(0, [], note10)
    shared = [leaf_hash(i.to_bytes(4, "big")) for i in range(20)]
    honest = MerkleTree(shared)
    forked = MerkleTree(shared[:10] + [leaf_hash(b"rewritten" + h) for h in shared[10:]])
    signer = Signer.from_skey(keys["log_skey"])
    results: dict[str, Any] = {}

    def add(name: str, w: Witness, tree: MerkleTree) -> None:
        note = sign_note(Checkpoint(ORIGIN, 20, tree.root()).body(), signer)
        try:
            results[name] = w.add_checkpoint(10, tree.consistency_proof(10), note)
        except Exception as exc:  # noqa: BLE001 (the outcome is what the test compares)
            results[name] = exc

    a = threading.Thread(target=add, args=("honest", first, honest))
    a.start()
    assert inside.wait(5)
    b = threading.Thread(target=add, args=("forked", second, forked))
    b.start()
    b.join(1)
    release.set()
    a.join(5)
    b.join(5)
    cosigned = [name for name, result in results.items() if isinstance(result, str)]
    assert len(cosigned) == 1, results


def test_a_slow_client_cannot_hold_a_connection_forever(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    """Slow-loris: connections that send nothing (or less than Content-Length) each held a
    thread with no time limit, until the witness ran out of threads or memory."""
    server = make_server(witness(tmp_path / "w.json", keys), "127.0.0.1", 0, timeout=0.5)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        for request in (b"", b"POST /add-checkpoint HTTP/1.0\r\nContent-Length: 100\r\n\r\nold"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(request)
                started = time.monotonic()
                try:
                    while conn.recv(1024):
                        pass
                except TimeoutError:
                    pytest.fail("the witness kept a silent connection open")
                assert time.monotonic() - started < 3
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_huge_old_size_is_a_bad_request() -> None:
    """A network client sends ``old`` with 5000 digits: int() raised ValueError, the handler
    died without an answer. Sizes are uint64."""
    for size in ("9" * 5000, str(2**64)):
        with pytest.raises(BadRequest):
            parse_add_checkpoint_body(f"old {size}\n\nnote\n".encode())


def test_a_note_carrying_a_bad_line_for_the_witness_is_served_verifiable(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    """The log (or anyone on its path) adds a garbage line under the witness's own name and key
    id: the witness kept it next to its real cosignature, and the note it serves to monitors
    then failed to verify with the witness's key."""
    w = witness(tmp_path / "w.json", keys)
    _, note = tree_note(keys["log_skey"], 3)
    vw = Verifier.from_vkey(keys["vkey"])
    bogus = f"\u2014 {vw.name} {b64encode(vw.key_id.to_bytes(4, 'big') + bytes(72))}\n"
    w.add_checkpoint(0, [], note + bogus)
    served = w.cosigned_note(hashlib.sha256(ORIGIN.encode()).hexdigest())
    assert served is not None
    opened = open_note(served, [vw])
    assert opened.verified_by(vw) is not None and bogus not in served


def test_a_malformed_content_length_gets_an_answer(tmp_path: Path, keys: dict[str, str]) -> None:
    """``Content-Length: abc`` raised in the handler: the client got no answer, only a closed
    connection, and the server printed a traceback; "1_0" was read as 10."""
    server = make_server(witness(tmp_path / "w.json", keys), "127.0.0.1", 0, timeout=2)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        for length in ("abc", "1_0", "-5", "+5"):
            with socket.create_connection(("127.0.0.1", server.server_address[1]), 5) as conn:
                conn.sendall(
                    f"POST /add-checkpoint HTTP/1.0\r\nContent-Length: {length}\r\n\r\n".encode()
                )
                assert conn.recv(64).startswith(b"HTTP/1.0 400"), length
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
