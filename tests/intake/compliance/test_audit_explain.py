"""The audit search's slow filters stay index scans on PostgreSQL with a long trail.

300,000 events over two years are generated in one INSERT ... SELECT generate_series, times in
seq order, a fifth of them queue views and searches that list references in their details.
After ANALYZE, each search the page runs (its page, and the "older" and "newer" checks) is run
under EXPLAIN ANALYZE: it must never read the whole table (no seq scan, no walk of the primary
key that filters out most of the trail) and must use the index meant for it.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from intake.audit.listings import backfill_listings
from intake.compliance.reports import (
    AuditFilter,
    audit_page,
    audit_query,
    request_events,
    resolve_window,
)
from intake.extensions import db
from intake.models import AuditEvent

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("backend", ["postgresql"], indirect=True),
]

EVENTS = 300_000
START = datetime(2025, 1, 1, tzinfo=UTC)
STEP = timedelta(minutes=3)  # 300,000 events x 3 minutes: about 625 days
REFERENCES = 30_000

GENERATE = f"""
INSERT INTO audit_events (
    seq, created_at, actor, actor_role, action, reference, outcome, details, ip_hmac,
    prev_hash, hash
)
SELECT
    g,
    TIMESTAMPTZ '{START.isoformat()}' + (g * interval '{int(STEP.total_seconds())} seconds'),
    'user:' || (1 + g % 40),
    'staff',
    CASE g % 10 WHEN 0 THEN 'phi.viewed' WHEN 1 THEN 'request.searched'
                ELSE 'request.status_changed' END,
    CASE WHEN g % 10 < 2 THEN NULL ELSE 'R-' || lpad(to_hex((g + 5) % {REFERENCES}), 9, '0') END,
    'success',
    CASE WHEN g % 10 < 2 THEN
        '{{"references":["' || 'R-' || lpad(to_hex(g % {REFERENCES}), 9, '0') || '","'
        || 'R-' || lpad(to_hex((g * 7) % {REFERENCES}), 9, '0') || '"],"rows":' || '2}}'
    ELSE '{{"status":"in_progress"}}' END,
    NULL,
    md5((g - 1)::text) || md5((g - 1)::text || 'x'),
    md5(g::text) || md5(g::text || 'x')
FROM generate_series(1, {EVENTS}) AS g
"""


def compiled(query: Any) -> str:
    return str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


def assert_reads_little(query: Any, what: str, index: str) -> None:
    """``query`` uses ``index``, has no seq scan of audit_events, and filters out few rows."""
    sql = compiled(query)
    raw = db.session.execute(sa.text("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)).scalar()
    document = raw if isinstance(raw, list) else json.loads(raw)
    nodes = plan_nodes(document[0]["Plan"])
    text = "\n".join(row[0] for row in db.session.execute(sa.text("EXPLAIN ANALYZE " + sql)).all())
    print(f"-- {what}\n{text}")
    on_events = [n for n in nodes if n.get("Relation Name") == "audit_events"]
    assert not [n for n in on_events if "Seq Scan" in n["Node Type"]], (
        f"{what}: reads the whole audit trail:\n{sql}\n{text}"
    )
    assert index in {n.get("Index Name") for n in nodes}, f"{what}: no {index}:\n{text}"
    removed = sum(n.get("Rows Removed by Filter", 0) * n.get("Actual Loops", 1) for n in on_events)
    assert removed < EVENTS // 100, f"{what}: filters out {removed} events:\n{sql}\n{text}"


@pytest.fixture
def long_trail(app):
    with app.app_context():
        started = time.monotonic()
        db.session.execute(sa.text(GENERATE))
        backfill_listings(db.session.connection())
        db.session.commit()
        db.session.execute(sa.text("ANALYZE audit_events"))
        db.session.commit()
        db.session.execute(sa.text("ANALYZE audit_listings"))
        db.session.commit()
        assert time.monotonic() - started < 60
        yield
        db.session.rollback()


def _page_queries(filt: AuditFilter) -> list[tuple[str, Any]]:
    """The page's own query and its "older" / "newer" checks, as ``audit_page`` runs them."""
    page = audit_page(db.session, filt)
    assert len(page.rows) == 100 and page.older_than is not None
    oldest, newest = page.rows[-1].seq, page.rows[0].seq
    query = audit_query(filt)
    older = query.where(AuditEvent.seq < oldest)
    return [
        ("the page", query.order_by(AuditEvent.seq.desc()).limit(100)),
        ("older?", older.limit(1)),
        (
            "next page",
            query.where(AuditEvent.seq < oldest).order_by(AuditEvent.seq.desc()).limit(100),
        ),
        ("newer? (from page 2)", query.where(AuditEvent.seq > newest - 500).limit(1)),
    ]


def test_a_time_window_in_the_middle_reads_only_the_window(long_trail):
    since = START + (EVENTS // 2) * STEP
    filt = AuditFilter(since=since, until=since + timedelta(days=2))
    for what, query in _page_queries(filt):
        assert_reads_little(query, f"since/until: {what}", "ix_audit_events_created_at_seq")


def test_a_reference_is_found_through_the_indexes_not_the_details(long_trail):
    # Named by 10 events and listed by 20 queue views and searches (out of 60,000 listings).
    reference = "R-" + format(1230, "x").rjust(9, "0")
    filt = AuditFilter(reference=reference)
    page = audit_page(db.session, filt, limit=20)
    assert len(page.rows) == 20 and page.older_than is not None
    listed = [r for r in page.rows if r.reference is None]
    assert listed and all(reference in r.detail_values["references"] for r in listed)
    assert len(listed) < 20
    query = audit_query(filt)
    for what, each in [
        ("the page", query.order_by(AuditEvent.seq.desc()).limit(20)),
        ("older?", query.where(AuditEvent.seq < page.older_than).limit(1)),
    ]:
        assert_reads_little(each, f"by reference: {what}", "pk_audit_listings")
    assert len(request_events(db.session, [reference])) == 30


def test_a_time_window_reads_its_bounds_once_per_page(long_trail):
    """The window's first and last seq are read by one statement per page, not by each of
    the page's statements (six scans of the window's index entries before), and each of the
    page's own statements walks only the window."""
    since = START + (EVENTS // 2) * STEP
    filt = AuditFilter(since=since, until=since + timedelta(days=2))
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        first = audit_page(db.session, filt)
        second = audit_page(db.session, filt, before=first.older_than)
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    assert len(first.rows) == len(second.rows) == 100
    assert first.older_than is not None and second.newer_than is not None
    window = [s for s in statements if "min(audit_events.seq +" in s or "min(audit_events_1" in s]
    assert len(window) == 2, "\n\n".join(statements)  # one per page
    resolved = resolve_window(db.session, filt)
    assert resolved.window_seqs is not None
    low, high = resolved.window_seqs
    assert [r.seq for r in first.rows] == list(range(high, high - 100, -1))
    query = audit_query(resolved)
    oldest = first.rows[-1].seq
    for what, each in [
        ("the page", query.order_by(AuditEvent.seq.desc()).limit(100)),
        ("older?", query.where(AuditEvent.seq < oldest).limit(1)),
        ("newer?", query.where(AuditEvent.seq > high).limit(1)),
        ("last page", query.where(AuditEvent.seq < low + 50).order_by(AuditEvent.seq.desc())),
    ]:
        assert_reads_little(each, f"since/until, bounds read: {what}", "pk_audit_events")
