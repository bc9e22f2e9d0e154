"""The routing drain benchmark keeps running end to end, and its exactness checks hold: every
request stored is routed exactly once and its team notice is left on the notifications queue
(the figures are for the script to report, never asserted as speeds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, POSTGRES_URL

SCRIPT = Path(__file__).parents[2] / "bench" / "routing_drain.py"
TASKS = 200
PROFILED = 40


def test_the_routing_drain_benchmark_routes_every_request_once(postgres_template, tmp_path):
    # postgres_template: skipped (or failed, in CI) like every PostgreSQL test when no server.
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is required in CI (scripts/test installs it)")
        pytest.skip("redis-server not installed")
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--tasks",
            str(TASKS),
            "--sqlite",
            "--profile",
            str(PROFILED),
            "--postgres",
            POSTGRES_URL,
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    [report_file] = tmp_path.glob("routing-drain-*Z.json")
    report = json.loads(report_file.read_text())
    assert report["versions"]["celery"] and report["machine"]["cpus"]
    results = {r["target"]: r for r in report["results"]}
    assert set(results) == {"baseline", "postgresql", "sqlite"}
    # The baseline worker ran each trivial task once.
    assert results["baseline"]["succeeded"] == TASKS
    for target in ("postgresql", "sqlite"):
        result = results[target]
        # Each request queued, one request.routed event each, its routing outbox row done.
        assert result["routed_once"] is True, (target, result)
        assert result["statuses"] == {"queued": TASKS}
        assert result["routed_events"] == result["routed_references"] == TASKS
        assert result["outbox"] == {"route_request:done": TASKS, "notify_team:pending": TASKS}
        # Every notice went to the notifications queue, which nobody consumed in this run.
        assert result["notifications_queued"] == TASKS and result["routing_queued"] == 0
        assert result["worker_cpu_ms_per_task"] > 0 and len(result["worker_rss_mib"]) == 2
        # The profiled solo worker took every message; it ran the real task for some, and
        # dropped unrun those a batch had revoked (workers.tasks._revoke_routed).
        spots = {row["what"]: row for row in result["profile"]["breakdown"]}
        assert spots["acks (kombu Message.ack)"]["calls"] == PROFILED
        assert 1 <= spots["workers.tasks.route_request"]["calls"] <= PROFILED
        assert Path(result["profile"]["stats"]).is_file()
    for target in ("baseline", "postgresql", "sqlite"):
        assert results[target]["tasks"] == TASKS and results[target]["tasks_per_s"] > 0
    assert set(report["ratios"]) == {"postgresql", "sqlite"}
    [table] = tmp_path.glob("routing-drain-*Z.md")
    text = table.read_text()
    assert "| tasks drained/s |" in text and "bare Celery noop" in text
    assert "Intake, PostgreSQL" in text and "Intake, SQLite" in text


def test_the_routing_drain_benchmark_refuses_no_tasks():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tasks", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "--tasks" in done.stderr
