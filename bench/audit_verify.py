"""Measure how fast ``intake audit verify`` recomputes the audit chain.

Writes N realistic events into a temporary SQLite database (and, with --postgres, a temporary
PostgreSQL database), then times ``intake.audit.chain.verify_chain`` against a baseline measured in
the same run: a bare loop that reads the same rows through the same streaming query and
computes one SHA-256 over each. The ratio (verify time / baseline time) is what to compare
between machines and versions; events per second depend on the machine.

    .venv/bin/python bench/audit_verify.py                      # 300,000 events, SQLite
    .venv/bin/python bench/audit_verify.py --postgres           # and the local PostgreSQL
    .venv/bin/python bench/audit_verify.py --events 1000000 --postgres postgresql+psycopg://...
    .venv/bin/python bench/audit_verify.py --listing-every 20   # a queue view of 25 every 20th

Verify holds ``audit_listings`` against the listing events' details in the same pass; with
``--listing-every N`` every Nth event is a queue view listing LISTED references, indexed as
record_event indexes it, so the cost of that cross-check shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from intake.audit.chain import (
    GENESIS_HASH,
    _stored_rows,  # the query verify streams, so the baseline reads exactly the same rows
    event_hash,
    verify_chain,
)
from intake.audit.listings import listed_references
from intake.models import AuditEvent, AuditListing

DEFAULT_POSTGRES = os.environ.get(
    "INTAKE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
ACTIONS = (
    ("request.submitted", "patient", None),
    ("request.routed", "system:route_request", None),
    ("notification.sent", "system:notify_team", None),
    ("phi.viewed", "staff:17", "staff"),
    ("request.claimed", "staff:17", "staff"),
    ("request.status_changed", "staff:23", "supervisor"),
    ("note.added", "staff:23", "staff"),
    ("user.login", "staff:31", "compliance"),
)
INSERT_BATCH = 5_000
LISTED = 25  # references on one queue page in the --listing-every events


def fake_events(count: int, listing_every: int = 0) -> Iterator[dict[str, Any]]:
    """Events shaped like the real trail (no PHI exists here either), hashed as the writer does."""
    prev = GENESIS_HASH
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for seq in range(1, count + 1):
        action, actor, role = ACTIONS[seq % len(ACTIONS)]
        details: dict[str, Any] = {"team": "ivig-es" if seq % 3 else "specialty"}
        queue_view = listing_every > 0 and seq % listing_every == 0
        if queue_view:
            action, actor, role = "phi.viewed", "staff:17", "staff"
            details["references"] = [
                f"R-{(seq + i) % 9000 + 1000:04d}-Q9P{i % 10}" for i in range(LISTED)
            ]
        if action == "request.status_changed":
            details |= {"from": "queued", "to": "in_progress"}
        if action == "note.added":
            details |= {"note_id": seq, "length": 240}
        event = SimpleNamespace(
            seq=seq,
            created_at=start + timedelta(milliseconds=seq * 37, microseconds=seq % 997),
            actor=actor,
            actor_role=role,
            action=action,
            reference=None
            if queue_view or actor == "staff:31"
            else f"R-{seq % 9000 + 1000:04d}-Q9P{seq % 10}",
            outcome="success",
            details=json.dumps(details, sort_keys=True, separators=(",", ":")),
            ip_hmac=hashlib.sha256(str(seq % 50).encode()).hexdigest() if role else None,
        )
        event.prev_hash = prev
        event.hash = prev = event_hash(prev, event)  # type: ignore[arg-type]
        yield vars(event)


def fill(engine: sa.Engine, count: int, listing_every: int = 0) -> None:
    table = AuditEvent.__table__
    listing_table = AuditListing.__table__
    table.create(engine)  # type: ignore[attr-defined]
    listing_table.create(engine)  # type: ignore[attr-defined]
    with engine.begin() as conn:
        batch: list[dict[str, Any]] = []
        listed: list[dict[str, Any]] = []
        for row in fake_events(count, listing_every):
            batch.append(row)
            refs = listed_references(row["action"], row["reference"], json.loads(row["details"]))
            listed.extend({"reference": r, "seq": row["seq"]} for r in refs)
            if len(batch) == INSERT_BATCH:
                conn.execute(table.insert(), batch)  # type: ignore[attr-defined]
                if listed:
                    conn.execute(listing_table.insert(), listed)  # type: ignore[attr-defined]
                batch, listed = [], []
        if batch:
            conn.execute(table.insert(), batch)  # type: ignore[attr-defined]
        if listed:
            conn.execute(listing_table.insert(), listed)  # type: ignore[attr-defined]
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE audit_events")
            conn.exec_driver_sql("ANALYZE audit_listings")


def run_verify(engine: sa.Engine) -> int:
    with Session(engine) as session:
        report = verify_chain(session, with_listings=True)
        if not report.ok:
            raise SystemExit(f"verify failed on a clean chain: {report}")
        return report.events


def run_baseline(engine: sa.Engine) -> int:
    """Read the same rows the same way and hash each once: the floor verify cannot beat."""
    count = 0
    sha256 = hashlib.sha256
    with Session(engine) as session:
        rows = _stored_rows(session, 0)
        for row in rows:
            sha256("\x1f".join(map(str, row)).encode()).hexdigest()
            count += 1
    return count


def run_read(engine: sa.Engine) -> int:
    """Only read the rows: how much of either time is the database and its driver."""
    with Session(engine) as session:
        return sum(1 for _row in _stored_rows(session, 0))


def best_of(repeat: int, work: Callable[[], int]) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        count = work()
        best = min(best, time.perf_counter() - started)
    return best, count


@contextmanager
def sqlite_engine() -> Iterator[sa.Engine]:
    with tempfile.TemporaryDirectory(prefix="intake-bench-") as folder:
        engine = sa.create_engine(f"sqlite:///{Path(folder) / 'bench.sqlite3'}")
        try:
            yield engine
        finally:
            engine.dispose()


@contextmanager
def postgres_engine(url: str) -> Iterator[sa.Engine]:
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"intake_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = sa.create_engine(sa.make_url(url).set(database=name))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def measure(
    label: str, engine: sa.Engine, count: int, repeat: int, listing_every: int = 0
) -> dict[str, Any]:
    started = time.perf_counter()
    fill(engine, count, listing_every)
    filled = time.perf_counter() - started
    run_baseline(engine)  # warm the caches for both
    verify_s, verified = best_of(repeat, lambda: run_verify(engine))
    baseline_s, hashed = best_of(repeat, lambda: run_baseline(engine))
    read_s, read = best_of(repeat, lambda: run_read(engine))
    assert verified == hashed == read == count, (verified, hashed, read, count)
    with engine.connect() as conn:
        listed = conn.scalar(sa.select(sa.func.count()).select_from(AuditListing.__table__))
    return {
        "backend": label,
        "events": count,
        "listing_every": listing_every,
        "listing_rows": listed,
        "fill_s": filled,
        "verify_s": verify_s,
        "events_per_s": count / verify_s,
        "baseline_s": baseline_s,
        "ratio": verify_s / baseline_s,
        "read_s": read_s,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    header = f"{'backend':<11}{'events':>10}{'verify s':>10}{'events/s':>11}"
    header += f"{'baseline s':>12}{'ratio':>8}{'read only s':>13}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['backend']:<11}{r['events']:>10,}{r['verify_s']:>10.3f}"
            f"{r['events_per_s']:>11,.0f}{r['baseline_s']:>12.3f}{r['ratio']:>8.2f}"
            f"{r['read_s']:>13.3f}"
        )
    shapes = {(r["listing_every"], r["listing_rows"]) for r in results}
    for every, rows in sorted(shapes):
        trail = f"one event in {every} a queue view of {LISTED}" if every else "no queue views"
        print(f"\ntrail: {trail}; {rows:,} audit_listings rows checked against the details")
    print(
        "\nbaseline: the same rows through the same query, one SHA-256 over each row's fields."
        "\nratio = verify s / baseline s. read only: the same rows, nothing done with them."
        "\nTimes are the best of the repeats."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000, help="events to generate")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best counts")
    parser.add_argument(
        "--postgres",
        nargs="?",
        const=DEFAULT_POSTGRES,
        default=None,
        metavar="URL",
        help="also measure PostgreSQL (a server URL; a temporary database is made and dropped)",
    )
    parser.add_argument(
        "--listing-every",
        type=int,
        default=0,
        metavar="N",
        help=f"make every Nth event a queue view listing {LISTED} requests (default: none)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    if args.events < 1 or args.repeat < 1:
        parser.error("--events and --repeat must be at least 1")
    results = []
    with sqlite_engine() as engine:
        results.append(measure("sqlite", engine, args.events, args.repeat, args.listing_every))
    if args.postgres:
        with postgres_engine(args.postgres) as engine:
            results.append(
                measure("postgresql", engine, args.events, args.repeat, args.listing_every)
            )
    print_table(results)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
