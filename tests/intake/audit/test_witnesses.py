"""Witnesses: the signer gets a real witness's cosignature over HTTP (tlog-witness), verify says
who cosigned, an unreachable witness delays nothing, and a witness refuses a forked history."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from intake.audit import checkpoints, tree, witnesses
from intake.audit.chain import record_event
from intake.audit.checkpoints import verify_trail, write_checkpoint
from intake.extensions import db
from intake_verify import checkpoint as tlog
from intake_verify import merkle, note
from intake_verify.witness import Fork, Witness, make_server, request_cosignature

WITNESS_NAME = "auditor.example/witness"


def settings():
    from flask import current_app

    return current_app.extensions["intake.settings"]


def write_events(count: int) -> None:
    for index in range(count):
        record_event(db.session, actor="system:test", action="request.routed", details={"n": index})
    db.session.commit()


def log_vkey() -> str:
    checkpoints.load_signer(settings())  # the embedded signer makes and publishes its key
    return checkpoints.trusted_verifiers(settings())[0].vkey


class RunningWitness:
    def __init__(self, state: Path, logs: list[str]) -> None:
        self.skey, self.vkey = note.generate_key(WITNESS_NAME, note.ALG_COSIGNATURE_V1)
        self.witness = Witness(
            state, note.Signer.from_skey(self.skey), [note.Verifier.from_vkey(v) for v in logs]
        )
        self.server = make_server(self.witness, "127.0.0.1", 0)  # a free port
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def entry(self) -> str:
        return f"{self.url} {self.vkey}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def running_witness(app, tmp_path) -> Iterator[RunningWitness]:
    with app.app_context():
        logs = [log_vkey()]
    running = RunningWitness(tmp_path / "witness-state.json", logs)
    yield running
    running.stop()


def with_witnesses(app, *entries: str):
    configured = app.extensions["intake.settings"].replace(audit_witnesses=entries)
    app.extensions["intake.settings"] = configured
    return configured


def test_the_signer_collects_a_witness_cosignature_over_http_and_verify_reports_it(
    app, runner, running_witness
):
    with app.app_context():
        write_events(3)
        # A checkpoint from before the witness was configured: it sees this log first at the
        # next one, which needs no consistency proof.
        assert write_checkpoint(db.session, settings(), actor="system:test") is not None
        write_events(2)
        configured = with_witnesses(app, running_witness.entry)
        first = write_checkpoint(db.session, configured, actor="system:test")
        assert f"\u2014 {WITNESS_NAME} " in first.note
        write_events(4)
        second = write_checkpoint(db.session, configured, actor="system:test")
        assert f"\u2014 {WITNESS_NAME} " in second.note
        assert running_witness.witness.held(first.note.split("\n")[0])["size"] == second.seq
        report = verify_trail(db.session, configured)
        assert report.chain.ok and report.cosigned_by == (WITNESS_NAME,)
        db.session.rollback()
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert f"cosigned by {WITNESS_NAME}" in result.output
    as_json = json.loads(runner.invoke(args=["audit", "verify", "--json"]).output)
    assert as_json["checkpoints"]["cosigned_by"] == [WITNESS_NAME]


def test_a_witness_that_missed_checkpoints_gets_a_proof_from_the_size_it_reports(
    app, running_witness
):
    with app.app_context():
        write_events(3)
        configured = with_witnesses(app, running_witness.entry)
        assert WITNESS_NAME in write_checkpoint(db.session, configured, actor="t").note
        origin = checkpoints.latest_signed_head(configured).origin
        held = running_witness.witness.held(origin)["size"]
        write_events(2)
        assert write_checkpoint(db.session, configured.replace(audit_witnesses=()), actor="t")
        write_events(2)
        # The log's guess (0: the last checkpoint has no cosignature of it) draws a 409 with
        # the size it holds; the second try proves consistency from there.
        third = write_checkpoint(db.session, configured, actor="t")
        assert f"\u2014 {WITNESS_NAME} " in third.note
        assert held < third.seq == running_witness.witness.held(origin)["size"]


def test_an_unreachable_witness_delays_nothing_and_is_logged(app, tmp_path, caplog):
    with app.app_context():
        write_events(3)
        _skey, vkey = note.generate_key(WITNESS_NAME, note.ALG_COSIGNATURE_V1)
        configured = with_witnesses(app, f"http://127.0.0.1:9 {vkey}")  # nothing listens
        signed = write_checkpoint(db.session, configured, actor="t")
        assert signed is not None and WITNESS_NAME not in signed.note
        assert verify_trail(db.session, configured).cosigned_by == ()
        db.session.rollback()
    assert "audit_witness_failed" in caplog.text and "Connection refused" in caplog.text


def test_a_witness_refuses_a_forked_history(app, running_witness):
    with app.app_context():
        write_events(6)
        configured = with_witnesses(app, running_witness.entry)
        genuine = write_checkpoint(db.session, configured, actor="t")
        assert WITNESS_NAME in genuine.note
        rows = list(tree._stored_rows(db.session, 0))
        db.session.rollback()
        # The key holder shows another history: event 3 changed, then more events.
        leaves = [tree.row_leaf_hash(row) for row in rows]
        forked = merkle.MerkleTree([*leaves[:2], b"\x13" * 32, *leaves[3:], b"\x42" * 32])
        signer = checkpoints.load_signer(configured).note_signer()
        size = len(forked)
        body = tlog.Checkpoint(signer.name, size, forked.root(), ("time 2026-12-01T00:00:00Z",))
        forged = note.sign_note(body.body(), signer)
        with pytest.raises(Fork):
            request_cosignature(
                running_witness.url, genuine.seq, forked.consistency_proof(genuine.seq), forged
            )
        # The same fork through the signer's own path gets no cosignature either.
        assert (
            witnesses.collect_cosignatures(
                configured,
                forged,
                size,
                lambda old: forked.consistency_proof(old),
                previous=(genuine.note, genuine.seq),
            )
            == forged
        )
        # And a same-size checkpoint with another root is a fork too.
        other = merkle.MerkleTree([b"\x01" * 32] * genuine.seq)
        same = tlog.Checkpoint(signer.name, genuine.seq, other.root(), ())
        with pytest.raises(Fork):
            request_cosignature(
                running_witness.url, genuine.seq, [], note.sign_note(same.body(), signer)
            )
    evidence = Path(str(running_witness.witness.evidence_path)).read_text().splitlines()
    assert len(evidence) == 3


def test_intake_audit_witness_runs_the_standalone_witness(app, tmp_path):
    with app.app_context():
        logs = log_vkey()
    skey, _vkey = note.generate_key(WITNESS_NAME, note.ALG_COSIGNATURE_V1)
    key_file = tmp_path / "witness.skey"
    key_file.write_text(skey + "\n")
    intake = Path(sys.executable).parent / "intake"
    command = [str(intake), "audit", "witness", "serve", "--listen", "127.0.0.1:0"]
    command += ["--state", str(tmp_path / "state.json"), "--key", str(key_file), "--log", logs]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=_env(tmp_path))
    try:
        line = process.stdout.readline()
        assert line.startswith(f"Witness {WITNESS_NAME} listening on 127.0.0.1:"), line
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    return {**os.environ, "INTAKE_DATA_DIR": str(tmp_path / "witness-data")}
