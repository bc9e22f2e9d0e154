"""``intake-verify`` as an auditor runs it: a separate process, read by its exit status."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from intake_verify.checkpoint import Checkpoint
from intake_verify.cosignature import verify_cosignature
from intake_verify.encoding import b64encode
from intake_verify.note import Signer, Verifier, sign_note
from intake_verify.witness import add_checkpoint_body

from .conftest import ORIGIN, AuditLog

SCRIPT = str(Path(sys.executable).with_name("intake-verify"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60)


def test_proof_exit_codes(tmp_path: Path, audit_log: AuditLog) -> None:
    good = tmp_path / "proof.json"
    good.write_text(json.dumps(audit_log.proof()))
    result = run(
        "proof", str(good), "--key", audit_log.log_vkey, "--witness", audit_log.witness_vkey
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Proof verified: 3 event(s) of R-7K3M-Q9P2" in result.stdout
    assert (
        "by team ivig-es" in result.stdout and "Cosigned by: witness.example/w1." in result.stdout
    )

    tampered = audit_log.proof()
    tampered["events"][0]["leaf"]["team"] = "oncology"
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(tampered))
    result = run("proof", str(bad), "--key", audit_log.log_vkey)
    assert result.returncode == 1
    assert result.stdout.startswith("PROOF FAILED: event 1")

    assert run("proof", str(tmp_path / "missing.json"), "--key", audit_log.log_vkey).returncode == 2
    assert run("proof", str(good), "--key", "not-a-key").returncode == 2
    assert run("proof", str(good)).returncode == 2  # no key at all


def test_consistency_exit_codes(tmp_path: Path, audit_log: AuditLog) -> None:
    signer = Signer.from_skey(audit_log.log_skey)
    tree = audit_log.tree
    for size in (1000, 70000):
        note = sign_note(Checkpoint(ORIGIN, size, tree.root(size)).body(), signer)
        (tmp_path / f"{size}.note").write_text(note)
    proof = tmp_path / "proof.txt"
    proof.write_text("".join(b64encode(h) + "\n" for h in tree.consistency_proof(1000, 70000)))
    paths = [str(tmp_path / "1000.note"), str(tmp_path / "70000.note"), str(proof)]
    result = run("consistency", *paths, "--key", audit_log.log_vkey)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "extends size 1000" in result.stdout
    # The other way round, or with a proof for other sizes, it does not hold.
    swapped = [paths[1], paths[0], paths[2]]
    assert run("consistency", *swapped, "--key", audit_log.log_vkey).returncode == 1
    proof.write_text("".join(b64encode(h) + "\n" for h in tree.consistency_proof(999, 70000)))
    result = run("consistency", *paths, "--key", audit_log.log_vkey)
    assert result.returncode == 1 and result.stdout.startswith("NOT CONSISTENT")


def test_keygen_and_witness_serve(tmp_path: Path, audit_log: AuditLog) -> None:
    result = run("keygen", "witness.example/w9", "--witness")
    assert result.returncode == 0
    skey, vkey = result.stdout.split()
    assert Signer.from_skey(skey).verifier().vkey() == vkey
    assert run("keygen", "bad name").returncode == 2
    key_file = tmp_path / "witness.skey"
    key_file.write_text(skey + "\n")
    server = subprocess.Popen(
        [SCRIPT, "witness", "serve", "--listen", "127.0.0.1:0", "--state",
         str(tmp_path / "state.json"), "--key", str(key_file), "--log", audit_log.log_vkey],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert banner.startswith("Witness witness.example/w9 listening on 127.0.0.1:")
        port = banner.rsplit(":", 1)[1].strip()
        note = audit_log.checkpoint.split("\n\n")[0] + "\n\n"
        note += audit_log.checkpoint.split("\n\n")[1].splitlines(keepends=True)[0]  # log sig only
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/add-checkpoint", data=add_checkpoint_body(0, [], note)
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            line = response.read().decode()
        assert verify_cosignature(note + line, Verifier.from_vkey(vkey))
    finally:
        server.terminate()
        server.wait(timeout=10)
        if server.stdout is not None:
            server.stdout.close()
