"""Audit the locked production dependencies for known vulnerabilities with pip-audit.

Run by scripts/test. An advisory against a locked version fails the run (exit 1): upgrade it
with ``scripts/lock --upgrade-package NAME``, or, when it cannot affect Intake, list its id in
requirements/audit-ignore.txt with the reason. When the advisory data cannot be reached (an
outage, or a machine without access to it), the run goes on with a loud warning instead, so an
advisory server's downtime never blocks a merge; set INTAKE_REQUIRE_AUDIT=1 (e.g. when building
a release) to fail in that case too. A skipped package is never reported as clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "production.txt"
IGNORE = ROOT / "requirements" / "audit-ignore.txt"
TIMEOUT = 180


def ignored_ids(text: str) -> set[str]:
    """Advisory ids from the ignore file: one per line, then ``#`` and the reason."""
    return {line.split("#", 1)[0].strip() for line in text.splitlines()} - {""}


def verdict(report: dict[str, Any], ignored: set[str]) -> tuple[bool, bool, list[str]]:
    """(vulnerable, incomplete, lines to print) for a pip-audit JSON report."""
    dependencies = report.get("dependencies", [])
    findings, skipped = [], []
    for dependency in dependencies:
        if "skip_reason" in dependency:
            skipped.append(dependency["name"])
            continue
        for vuln in dependency.get("vulns", []):
            if {vuln["id"], *vuln.get("aliases", [])} & ignored:
                continue
            fixed = ", ".join(vuln.get("fix_versions") or []) or "no fixed release yet"
            findings.append(
                f"  {dependency['name']} {dependency['version']}: {vuln['id']} (fixed in {fixed})"
            )
    lines = []
    if findings:
        lines += ["known vulnerabilities in requirements/production.txt:", *findings]
    if skipped:
        lines.append(
            f"WARNING: {len(skipped)} of {len(dependencies)} locked dependencies could not be"
            " audited (advisory data unreachable?): " + ", ".join(skipped[:8])
            + (", ..." if len(skipped) > 8 else "")
        )
    if not findings and not skipped:
        lines.append(f"no known vulnerabilities in {len(dependencies)} locked dependencies")
    return bool(findings), bool(skipped), lines


def main() -> int:
    ignored = ignored_ids(IGNORE.read_text()) if IGNORE.exists() else set()
    argv = [sys.executable, "-m", "pip_audit", "-r", str(LOCK), "--disable-pip"]
    argv += ["--progress-spinner", "off", "--format", "json", "--timeout", "15"]
    for advisory in sorted(ignored):
        argv += ["--ignore-vuln", advisory]
    required = os.environ.get("INTAKE_REQUIRE_AUDIT") == "1"
    try:
        # A hanging advisory service must not hold the test run for long either.
        run = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)  # noqa: S603
        report = json.loads(run.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as error:
        if isinstance(error, subprocess.TimeoutExpired):
            why = f"no answer within {TIMEOUT} s"
        else:
            why = (run.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"WARNING: pip-audit could not audit the lock file: {why}")
        return 1 if required else 0
    vulnerable, incomplete, lines = verdict(report, ignored)
    print("\n".join(lines))
    if vulnerable or (incomplete and required):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
