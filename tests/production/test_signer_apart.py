"""Only the signer holds the audit signing key: not gunicorn, not Celery, not their files.

Reads what each running process of the production stack was given (/proc/<pid>/environ, for the
gunicorn master and its workers, the Celery worker and its pool, beat) and every file and folder
their settings name, and looks for the private key in any of the forms it could take. Then
checks that ``intake audit verify`` works with the public key alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.key_material import signing_key_forms
from tests.production.conftest import SIGNER_SECONDS, ProductionStack
from tests.workers.conftest import wait_until


def _group(leader: int) -> list[int]:
    """Every live process in ``leader``'s process group (a Service starts one of its own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == leader:  # pgrp
            members.append(int(entry.name))
    return members


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _named_files(environ: dict[str, str]) -> list[Path]:
    """Every file an INTAKE_* setting points at, directly or inside a folder it names."""
    found: list[Path] = []
    for name, value in environ.items():
        if not name.startswith("INTAKE_") or not value.startswith("/"):
            continue
        path = Path(value)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file()]
        if name in ("INTAKE_AUDIT_ANCHOR", "INTAKE_AUDIT_CHECKPOINTS"):
            found += [p for p in path.parent.rglob("*") if p.is_file()]
    return found


def test_web_and_workers_hold_no_private_key_and_verify_needs_only_the_public_one(
    production_stack: ProductionStack,
):
    stack = production_stack
    # An event, then the signer's next checkpoint over it; verify with the public key alone.
    team = "anchor-check-" + os.urandom(3).hex()
    stack.intake("teams", "create", team)
    # That event's seq, not the chain's head: the signer may sign it at once, and its own
    # checkpoint event, the new head, is never signed by itself (an idle tick signs nothing).
    [(head,)] = stack.query(
        "SELECT seq FROM audit_events WHERE action = 'team.created' AND details LIKE :team",
        team=f"%{team}%",
    )
    checkpoints = Path(stack.env["INTAKE_AUDIT_CHECKPOINTS"])

    def signed_head() -> int:
        if not checkpoints.exists():
            return 0
        return int(json.loads(checkpoints.read_text().splitlines()[-1])["seq"])

    wait_until(lambda: signed_head() >= head, 10 * SIGNER_SECONDS, 0.5, "a checkpoint")
    forms = signing_key_forms(stack.signing_key)
    checked: dict[str, int] = {}
    files: set[Path] = set()
    for name in ("web", "worker", "notifier", "beat"):
        pids = _group(stack.services[name].process.pid)
        assert pids, name
        for pid in pids:
            environ = _environ(pid)
            assert "INTAKE_AUDIT_SIGNING_KEY" not in environ, (name, pid)
            raw = Path(f"/proc/{pid}/environ").read_bytes()
            assert not any(form in raw for form in forms), (name, pid)
            assert b"PRIVATE+KEY" not in raw, (name, pid)
            files.update(_named_files(environ))
        checked[name] = len(pids)
    assert checked["web"] >= 2 and checked["worker"] >= 2  # the masters and their children
    assert any(p.name == "audit-anchor.log" for p in files), sorted(map(str, files))
    for path in files:
        content = path.read_bytes()
        assert not any(form in content for form in forms), path
        assert b"PRIVATE+KEY" not in content, path
    # The search does find the key where it is: in the signer's environment.
    signer_pid = stack.services["signer"].process.pid
    assert _environ(signer_pid)["INTAKE_AUDIT_SIGNING_KEY"] == stack.signing_key

    assert "INTAKE_AUDIT_SIGNING_KEY" not in stack.env
    out = json.loads(stack.intake("audit", "verify", "--json"))
    assert out["ok"] is True and out["problem"] is None, out
    assert out["checkpoints"]["verified"] >= 1
