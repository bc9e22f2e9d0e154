"""The pipeline benchmark keeps running end to end (a few seconds per target; the figures are
for the script to report, never asserted as speeds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, POSTGRES_URL

SCRIPT = Path(__file__).parents[2] / "bench" / "pipeline.py"


def test_the_pipeline_benchmark_measures_every_target(postgres_template, tmp_path):
    # postgres_template: skipped (or failed, in CI) like every PostgreSQL test when no server.
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            if IN_CI:
                pytest.fail(f"{tool} is required in CI (scripts/test installs it)")
            pytest.skip(f"{tool} not installed")
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
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
    [report_file] = tmp_path.glob("pipeline-*.json")
    report = json.loads(report_file.read_text())
    assert report["versions"]["gunicorn"] and report["machine"]["cpus"]
    results = {r["target"]: r for r in report["results"]}
    assert set(results) == {"bare", "postgresql", "sqlite"}
    for target, result in results.items():
        # Every form wrk sent was accepted: nothing refused, throttled or failed on the way.
        assert result["accepted"] > 0, (target, result)
        assert result["refused"] == result["throttled"] == result["errors"] == 0, (target, result)
        assert result["web_cpu_ms"] > 0
    for target in ("postgresql", "sqlite"):
        result = results[target]
        # Each answered submission stored once and routed once, and the backlog drained.
        counts = {
            k: result[k] for k in ("requests_stored", "accepted_total", "routed", "routed_twice")
        }
        assert result["routed_once"] is True, (target, counts)
        assert result["requests_stored"] >= result["accepted_total"], (target, counts)
        assert result["duplicates"] == 0
        assert result["queued_p95_ms"] is not None and result["worker_cpu_ms"] > 0
        assert len(result["web_rss_mib"]) == 2 and len(result["worker_rss_mib"]) == 2
    [table] = tmp_path.glob("pipeline-*.md")
    text = table.read_text()
    assert "| accepted submissions/s |" in text and "Intake, PostgreSQL" in text
    assert "Intake, SQLite" in text and "bare Flask-WTF" in text


def test_the_pipeline_benchmark_refuses_an_unknown_target():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--targets", "bare,mysql"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "mysql" in done.stderr
