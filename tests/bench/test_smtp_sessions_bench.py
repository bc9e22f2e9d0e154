"""The SMTP sessions benchmark keeps running end to end, and its checks hold: every variant's
messages reach a real aiosmtpd server, over the sessions each variant should open (the
figures are for the script to report, never asserted as speeds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "bench" / "smtp_sessions.py"
MESSAGES = 20


def test_the_smtp_sessions_benchmark_delivers_every_message(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--messages", str(MESSAGES), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [report] = [json.loads(path.read_text()) for path in tmp_path.glob("smtp-sessions-*.json")]
    assert report["problems"] == []
    sessions = {(row["scheme"], row["variant"]): row["sessions"] for row in report["rows"]}
    assert sessions == {
        (scheme, variant): MESSAGES if variant == "per message" else 1
        for scheme in ("smtp", "smtp+starttls")
        for variant in ("bare", "per message", "kept")
    }
    assert all(row["messages"] == MESSAGES for row in report["rows"])
    [table] = [path.read_text() for path in tmp_path.glob("smtp-sessions-*.md")]
    assert "| smtp+starttls | kept | 1 |" in table
