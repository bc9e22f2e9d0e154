"""The page benchmark keeps running end to end at a tiny size, and what it generates is what
Intake itself would have stored: sealed PHI that opens on the staff page, a verifiable audit
trail. The timings are for the script to report, never asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, POSTGRES_URL

SCRIPT = Path(__file__).parents[2] / "bench" / "pages.py"


def test_the_page_benchmark_generates_a_sound_database_and_times_every_page(
    postgres_template, tmp_path
):
    # postgres_template: skipped (or failed, in CI) like every PostgreSQL test when no server.
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is required in CI (scripts/test installs it)")
        pytest.skip("redis-server not installed")
    done = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--requests", "2000", "--events", "20000",
            "--small-requests", "300", "--small-events", "3000", "--samples", "5", "--check",
            "--postgres", POSTGRES_URL, "--out", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    [report_file] = tmp_path.glob("pages-*.json")
    [table] = tmp_path.glob("pages-*.md")
    report = json.loads(report_file.read_text())
    assert "| queue |" in table.read_text()
    small, large = report["results"]
    for result, requests, events in ((small, 300, 3000), (large, 2000, 20000)):
        stored, check = result["stored"], result["check"]
        # Every planned request stored, with its consents and outbox rows; the events asked for.
        assert stored["requests"] == requests
        assert stored["outbox"] == 2 * requests
        assert stored["consent_acceptances"] >= 2 * requests
        assert check["events_generated"] == events
        assert 0 < stored["open"] < requests
        # The chain is gapless: as many events as its last seq (the set-up's events first).
        assert check["events_before_web"] == check["head_before_web"] > events
        # Sampled requests open to the document generated for them, with matching blind
        # indexes, and the pharmacist's page shows the patient (and the note, when it has one).
        assert check["problems"] == []
        assert check["opened"] == check["checked"] > 0
        assert check["pages"] > 0
        # The load is vacuumed: index-only scans of the pages' queries skip the heap, as on a
        # database autovacuum has kept (the page views since then touched only the last pages).
        assert check["all_visible"]["requests"] >= 0.9, check["all_visible"]
        assert check["all_visible"]["audit_events"] >= 0.9, check["all_visible"]
        # `intake audit verify` (after a checkpoint) holds the whole trail: generated, set-up
        # and the events the page views wrote.
        assert result["verify"]["checkpoint_rc"] == 0, result["verify"]["checkpoint_output"]
        assert result["verify"]["rc"] == 0, result["verify"]
        verified = result["verify"]["report"]
        assert verified["ok"] is True and verified["problem"] is None
        assert verified["events"] > check["events_before_web"]
        # Every page answered 200 every time.
        assert set(result["pages"]) == {
            "queue", "queue, filtered", "request, open", "request, old", "audit",
            "audit by action", "audit by reference", "audit since/until",
        }  # fmt: skip
        for name, page in result["pages"].items():
            assert page["statuses"] == {"200": 5}, (name, page)
    # Nothing secret in the results file.
    assert "password" not in report_file.read_text() and "totp" not in report_file.read_text()
