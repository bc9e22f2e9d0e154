"""The queue stays an index scan on PostgreSQL with a realistic amount of history.

200,000 requests are generated in one INSERT ... SELECT generate_series: most are completed or
cancelled, the open ones are mostly from the last week, teams differ in size and priorities
are mostly normal. After ANALYZE, the SQL that ``intake.requests.casework.queue_query`` builds is
EXPLAINed for a staff member's default queue, its second page (keyset) and a supervisor's
queue: each must walk a queue index and never read the whole table.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from intake.extensions import db
from intake.requests.casework import Actor, queue_query

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("backend", ["postgresql"], indirect=True),
]

ROWS = 200_000
QUEUE_INDEXES = {"ix_requests_open_queue", "ix_requests_team_queue"}
TEAMS = [
    "refills-main",
    "refills-north",
    "patient-services",
    "benefits",
    "infusion",
    "clinical",
    "bilingual",
    "ivig",
]

GENERATE = f"""
INSERT INTO requests (
    id, reference, kind, topic, location, language, status, priority, priority_rank, team,
    created_at, updated_at, routed_at, sla_due_at, phi_encrypted
)
SELECT
    gen_random_uuid()::text,
    'R-' || lpad(to_hex(g), 9, '0'),
    CASE WHEN g % 3 = 0 THEN 'contact' ELSE 'refill' END,
    CASE WHEN g % 3 = 0 THEN 'question' END,
    CASE WHEN g % 3 = 0 THEN NULL ELSE 'main' END,
    CASE WHEN g % 5 = 0 THEN 'es' ELSE 'en' END,
    status,
    (ARRAY['urgent', 'high', 'normal', 'low'])[rank + 1],
    rank,
    -- a few large teams and several small ones
    (ARRAY{TEAMS!r})[1 + floor(power(team_draw, 2) * 8)::int],
    created,
    created + interval '2 hours',
    created + interval '1 minute',
    created + CASE rank WHEN 0 THEN interval '1 hour' WHEN 1 THEN interval '8 hours'
                        ELSE interval '1 day' END,
    '\\x00'::bytea
FROM (
    SELECT
        g,
        team_draw,
        created,
        CASE WHEN p < 0.05 THEN 0 WHEN p < 0.20 THEN 1 WHEN p < 0.92 THEN 2 ELSE 3 END AS rank,
        -- the last week's requests are mostly open; older ones mostly closed
        CASE
            WHEN s < open_share * 0.55 THEN 'queued'
            WHEN s < open_share * 0.80 THEN 'in_progress'
            WHEN s < open_share * 0.90 THEN 'waiting_on_patient'
            WHEN s < open_share THEN 'waiting_on_prescriber'
            WHEN s < open_share + (1 - open_share) * 0.06 THEN 'cancelled'
            ELSE 'completed'
        END AS status
    FROM (
        SELECT
            g,
            random() AS p,
            random() AS s,
            random() AS team_draw,
            now() - make_interval(mins => {ROWS} - g) AS created,
            CASE WHEN g > {ROWS} - 10080 THEN 0.6 ELSE 0.01 END AS open_share
        FROM generate_series(1, {ROWS}) AS g
    ) AS draws
) AS shaped
"""


def compiled(query: Any) -> str:
    return str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


def explain(sql: str) -> tuple[list[dict[str, Any]], str]:
    raw = db.session.execute(sa.text("EXPLAIN (FORMAT JSON) " + sql)).scalar()
    document = raw if isinstance(raw, list) else json.loads(raw)
    text = "\n".join(row[0] for row in db.session.execute(sa.text("EXPLAIN " + sql)).all())
    return plan_nodes(document[0]["Plan"]), text


def assert_queue_plan(sql: str, what: str, indexes: set[str] = QUEUE_INDEXES) -> None:
    nodes, text = explain(sql)
    print(f"-- {what}\n{text}")
    used = {n.get("Index Name") for n in nodes} & indexes
    assert used, f"{what}: the queue does not use {sorted(indexes)}:\n{sql}\n{text}"
    seq_scans = [
        n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "requests"
    ]
    assert not seq_scans, f"{what}: the queue reads the whole requests table:\n{sql}\n{text}"


def test_the_queue_is_an_index_scan_over_a_realistic_history(app):
    with app.app_context():
        started = time.monotonic()
        db.session.execute(sa.text(GENERATE))
        db.session.commit()
        db.session.execute(sa.text("ANALYZE requests"))
        db.session.commit()
        generated = time.monotonic() - started
        counts = dict(
            db.session.execute(
                sa.text("SELECT status, count(*) FROM requests GROUP BY status")
            ).all()
        )
        assert sum(counts.values()) == ROWS
        open_rows = ROWS - counts["completed"] - counts["cancelled"]
        assert 0.02 * ROWS < open_rows < 0.08 * ROWS, counts  # a realistic backlog
        assert generated < 60, f"generating the data took {generated:.1f} s"

        staff = Actor(1, "ana", "staff", ("refills-main", "infusion"))
        supervisor = Actor(2, "sofia", "supervisor", ())

        first_page = db.session.execute(queue_query(staff)).scalars().all()
        assert len(first_page) == 50
        assert [r.priority_rank for r in first_page] == sorted(r.priority_rank for r in first_page)
        cursor = (
            f"{first_page[-1].priority_rank}|{first_page[-1].sla_due_at.isoformat()}|"
            f"{first_page[-1].id}"
        )
        second_page = db.session.execute(queue_query(staff, after=cursor)).scalars().all()
        assert second_page and not {r.id for r in first_page} & {r.id for r in second_page}

        assert_queue_plan(compiled(queue_query(staff)), "a staff member's queue")
        assert_queue_plan(compiled(queue_query(staff, after=cursor)), "page 2 (keyset)")
        assert_queue_plan(compiled(queue_query(supervisor)), "a supervisor's queue")
        assert_queue_plan(compiled(queue_query(supervisor, after=cursor)), "a supervisor's page 2")
        # A narrow filter may pick any index (a few hundred rows sort in no time); never all rows.
        assert_queue_plan(
            compiled(queue_query(staff, team="infusion", kind="refill")),
            "a filtered queue",
            QUEUE_INDEXES | {"ix_requests_status_team"},
        )
        db.session.rollback()
