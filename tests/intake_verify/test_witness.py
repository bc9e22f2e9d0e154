"""The witness over real HTTP: it cosigns extensions and refuses forks, keeping the evidence."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from intake_verify.checkpoint import Checkpoint
from intake_verify.cosignature import verify_cosignature
from intake_verify.merkle import EMPTY_ROOT, MerkleTree, leaf_hash
from intake_verify.note import ALG_COSIGNATURE_V1, Signer, Verifier, generate_key, sign_note
from intake_verify.witness import (
    BadRequest,
    Conflict,
    Forbidden,
    Fork,
    UnknownLog,
    Witness,
    add_checkpoint_body,
    make_server,
    request_cosignature,
)

ORIGIN = "intake.example/audit"


class Log:
    """A log under test: a tree, a key, and the checkpoints it signs."""

    def __init__(self, skey: str, leaves: list[bytes]) -> None:
        self.signer = Signer.from_skey(skey)
        self.tree = MerkleTree(leaf_hash(data) for data in leaves)

    def checkpoint(self, size: int, root: bytes | None = None) -> str:
        body = Checkpoint(ORIGIN, size, self.tree.root(size) if root is None else root).body()
        return sign_note(body, self.signer)


@pytest.fixture
def keys() -> dict[str, str]:
    log_skey, log_vkey = generate_key(ORIGIN)
    witness_skey, witness_vkey = generate_key("witness.example/w1", ALG_COSIGNATURE_V1)
    return {"log_skey": log_skey, "log_vkey": log_vkey, "skey": witness_skey, "vkey": witness_vkey}


@pytest.fixture
def witness_url(tmp_path: Path, keys: dict[str, str]) -> Iterator[str]:
    witness = Witness(
        tmp_path / "witness.json",
        Signer.from_skey(keys["skey"]),
        [Verifier.from_vkey(keys["log_vkey"])],
        clock=lambda: 1_790_000_000.0,
    )
    server = make_server(witness, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def leaves(n: int, prefix: bytes = b"event") -> list[bytes]:
    return [prefix + i.to_bytes(4, "big") for i in range(n)]


def test_it_cosigns_a_first_checkpoint_and_then_extensions(
    witness_url: str, keys: dict[str, str], tmp_path: Path
) -> None:
    log = Log(keys["log_skey"], leaves(5000))
    witness = Verifier.from_vkey(keys["vkey"])
    note = log.checkpoint(1000)
    line = request_cosignature(witness_url, 0, [], note)
    assert verify_cosignature(note + line, witness) == 1_790_000_000
    for old, new in [(1000, 1000), (1000, 1001), (1001, 4096), (4096, 5000)]:
        note = log.checkpoint(new)
        line = request_cosignature(witness_url, old, log.tree.consistency_proof(old, new), note)
        assert verify_cosignature(note + line, witness)
    state = json.loads((tmp_path / "witness.json").read_text())
    assert state["logs"][ORIGIN]["size"] == 5000
    # The monitoring endpoint serves the last cosigned checkpoint.
    origin_hash = hashlib.sha256(ORIGIN.encode()).hexdigest()
    with urllib.request.urlopen(f"{witness_url}/{origin_hash}/checkpoint") as response:
        assert verify_cosignature(response.read().decode(), witness)


def test_a_wrong_old_size_gets_the_size_it_holds(witness_url: str, keys: dict[str, str]) -> None:
    log = Log(keys["log_skey"], leaves(300))
    request_cosignature(witness_url, 0, [], log.checkpoint(200))
    with pytest.raises(Conflict) as conflict:
        request_cosignature(
            witness_url, 100, log.tree.consistency_proof(100, 300), log.checkpoint(300)
        )
    assert conflict.value.size == 200
    # Raw HTTP: 409 with the size as text/x.tlog.size.
    body = add_checkpoint_body(0, [], log.checkpoint(300))
    request = urllib.request.Request(f"{witness_url}/add-checkpoint", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request)
    assert error.value.code == 409
    assert error.value.headers["Content-Type"] == "text/x.tlog.size"
    assert error.value.read() == b"200\n"


def test_a_fork_is_refused_and_kept_as_evidence(
    witness_url: str, keys: dict[str, str], tmp_path: Path
) -> None:
    honest = Log(keys["log_skey"], leaves(2000))
    request_cosignature(witness_url, 0, [], honest.checkpoint(1000))
    # The same size with another root: the log signed two trees of 1000 events.
    rewritten = leaves(2000)
    rewritten[17] = b"rewritten"
    forked = Log(keys["log_skey"], rewritten)
    with pytest.raises(Fork, match="another root"):
        request_cosignature(witness_url, 1000, [], forked.checkpoint(1000))
    # A longer tree of a different history: its consistency proof cannot connect.
    with pytest.raises(Fork, match="not an extension"):
        request_cosignature(
            witness_url, 1000, forked.tree.consistency_proof(1000, 2000), forked.checkpoint(2000)
        )
    # Or the honest proof for the forked tree.
    with pytest.raises(Fork):
        request_cosignature(
            witness_url, 1000, honest.tree.consistency_proof(1000, 2000), forked.checkpoint(2000)
        )
    evidence = [
        json.loads(line)
        for line in (tmp_path / "witness.json.evidence.jsonl").read_text().splitlines()
    ]
    assert len(evidence) == 3
    assert evidence[0]["held"]["size"] == 1000 and "another root" in evidence[0]["problem"]
    # The witness still holds the honest tree, and cosigns its honest extension.
    line = request_cosignature(
        witness_url, 1000, honest.tree.consistency_proof(1000, 2000), honest.checkpoint(2000)
    )
    assert verify_cosignature(honest.checkpoint(2000) + line, Verifier.from_vkey(keys["vkey"]))


def test_unsigned_unknown_and_malformed_checkpoints_are_refused(
    witness_url: str, keys: dict[str, str]
) -> None:
    stranger_skey, _ = generate_key(ORIGIN)
    with pytest.raises(Forbidden):
        request_cosignature(witness_url, 0, [], Log(stranger_skey, leaves(10)).checkpoint(10))
    other_skey, _ = generate_key("other.example/log")
    other = Signer.from_skey(other_skey)
    other_note = sign_note(Checkpoint("other.example/log", 0, EMPTY_ROOT).body(), other)
    with pytest.raises(UnknownLog):
        request_cosignature(witness_url, 0, [], other_note)
    log = Log(keys["log_skey"], leaves(10))
    with pytest.raises(BadRequest):
        request_cosignature(witness_url, 11, [], log.checkpoint(10))  # old size beyond the new
    with pytest.raises(Fork):
        request_cosignature(witness_url, 0, [], log.checkpoint(0, root=bytes(32)))
    with pytest.raises(Fork):
        request_cosignature(witness_url, 0, [bytes(32)], log.checkpoint(10))  # a first needs none
    request = urllib.request.Request(
        f"{witness_url}/add-checkpoint", data=b"old 01\n\n" + log.checkpoint(10).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request)
    assert error.value.code == 400


def test_the_state_survives_a_restart(tmp_path: Path, keys: dict[str, str]) -> None:
    log = Log(keys["log_skey"], leaves(64))
    signer, logs = Signer.from_skey(keys["skey"]), [Verifier.from_vkey(keys["log_vkey"])]
    Witness(tmp_path / "w.json", signer, logs).add_checkpoint(0, [], log.checkpoint(32))
    again = Witness(tmp_path / "w.json", signer, logs)
    with pytest.raises(Conflict):
        again.add_checkpoint(0, [], log.checkpoint(64))
    again.add_checkpoint(32, log.tree.consistency_proof(32, 64), log.checkpoint(64))
    assert [p.name for p in tmp_path.iterdir()] == ["w.json"]  # no temporary files left
