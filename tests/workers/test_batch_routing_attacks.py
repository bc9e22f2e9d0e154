"""Attacks on batch routing (intake.requests.routing.route_received): concurrent batches, a
staff action beside a batch, forged outbox traces, a failure after the batch's commit, a
backlog larger than a batch, and the audit chain and anchor after it all."""

from __future__ import annotations

import ast
import contextlib
import json
import threading
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from intake.clock import utcnow
from intake.extensions import db
from intake.models import OutboxMessage, Request
from intake.ops import metrics, tracing
from intake.requests import casework, routing
from tests.intake.compliance.conftest import Staff
from tests.workers.conftest import wait_until
from tests.workers.test_batch_routing import outbox_rows, routed_events, settings, submitted

__all__ = ["settings"]  # the fixture of test_batch_routing: no broker, e-mail routing rules

REASON = "Patient called the after-hours line about a refill that is not routed yet"


def _waiting_on_lock(engine: sa.Engine, statement: str) -> bool:
    """Whether some session of the test's database is waiting on a lock in ``statement``."""
    with engine.connect() as conn:
        return bool(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE :statement"
                ),
                {"statement": statement + "%"},
            ).scalar()
        )


def _in_thread(app, results: dict[str, Any], key: str, work) -> threading.Thread:
    """Run ``work()`` in its own app context (its own session) on a thread; keep what it
    returned, or the error it raised, in ``results[key]``."""

    def run() -> None:
        with app.app_context():
            try:
                results[key] = work()
            except Exception as error:  # noqa: BLE001 - the test asserts on it
                db.session.rollback()
                results[key] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def assert_trail_intact(app) -> None:
    """The hash chain verifies and the anchor file vouches for every event, no more, no less."""
    from intake.audit import anchor
    from intake.audit.chain import verify_chain

    with app.app_context():
        chain = verify_chain(db.session)
        assert chain.ok, chain
        anchored = anchor.compare(db.session, app.extensions["intake.audit.anchor"])
        assert anchored.ok, anchored
        assert anchored.events == chain.events


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_break_glass_beside_a_batch_neither_deadlocks_nor_fails(app, patient, database_url):
    """A compliance officer breaks the glass on a request still waiting for routing while a
    batch holds it. Her transaction takes the chain's lock (phi.break_glass), then inserts the
    supervisors' alert, an outbox row pointing at the request, which needs a key-share lock on
    the request row; the batch holds that row and then wants the chain's lock. A batch that
    locks its rows FOR UPDATE deadlocks with her: PostgreSQL kills one of the two, her page or
    the batch. Locked FOR NO KEY UPDATE, as a routing change never touches a key, both go."""
    staff = Staff(app)
    with app.app_context():
        from intake.accounts import services as accounts

        for team in app.extensions["intake.routing"].teams.values():
            accounts.create_team(db.session, team.id, team.name, team.spanish, "system:test")
        db.session.commit()
    officer = staff.create("olivia", "compliance")
    requests = submitted(app, patient, 3)
    leader, middle, opened = (request_id for _reference, request_id, _trace in requests)
    opened_reference = requests[2][0]
    table, keyring = app.extensions["intake.routing"], app.extensions["intake.keyring"]
    engine = sa.create_engine(database_url)
    results: dict[str, Any] = {}
    try:
        with engine.connect() as sweep:
            # Hold the middle request's routing row, as the sweep does for a moment while it
            # marks the row published: the batch, closing it, waits there with its request
            # rows locked and the chain's lock not yet taken.
            sweep.execute(
                sa.text(
                    "SELECT id FROM outbox WHERE request_id = :id AND task = 'route_request' "
                    "FOR UPDATE"
                ),
                {"id": middle},
            )
            batch = _in_thread(
                app,
                results,
                "batch",
                lambda: routing.route_received(db.session, table, leader, utcnow()),
            )
            wait_until(lambda: _waiting_on_lock(engine, "UPDATE outbox"), 20, message="batch")
            glass = _in_thread(
                app,
                results,
                "glass",
                lambda: casework.open_request(
                    db.session,
                    keyring,
                    opened_reference,
                    officer.actor(),
                    utcnow(),
                    break_glass_reason=REASON,
                    policy=casework.BreakGlassPolicy(),
                ),
            )
            wait_until(
                lambda: "glass" in results or _waiting_on_lock(engine, "INSERT INTO outbox"),
                20,
                message="the break-glass to finish or wait",
            )
            sweep.rollback()
        batch.join(30)
        glass.join(30)
    finally:
        engine.dispose()
    assert isinstance(results["glass"], casework.OpenedRequest), results["glass"]
    assert results["glass"].alert_outbox_id is not None
    assert {routed.request_id for routed in results["batch"]} == {leader, middle, opened}
    assert routed_events(app) == Counter({reference: 1 for reference, _i, _t in requests})
    assert_trail_intact(app)


def queued_messages(app) -> list[dict[str, Any]]:
    """The headers of the tasks waiting in the embedded broker's queue folder."""
    from pathlib import Path

    folder = Path(app.extensions["intake.settings"].data_dir) / "broker" / "queue"
    return [json.loads(path.read_text())["headers"] for path in folder.glob("*.msg")]


def queued_tasks(app) -> dict[str, list[str]]:
    """The tasks waiting in the embedded broker: name -> the first argument of each."""
    found: dict[str, list[str]] = {}
    for headers in queued_messages(app):
        name = headers["task"].rsplit(".", 1)[-1]
        found.setdefault(name, []).append(ast.literal_eval(headers["argsrepr"])[0])
    return found


@contextlib.contextmanager
def logs_with_context() -> Any:
    """Like structlog's capture_logs, with the bound context (trace_id) in each entry, as the
    app's own processors put it in every line."""
    import structlog
    from structlog.testing import LogCapture

    capture = LogCapture()
    before = structlog.get_config()["processors"]
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture.entries
    finally:
        structlog.configure(processors=before)


def _routed_count(team: str) -> float:
    return metrics.ROUTED.labels(team)._value.get()  # noqa: SLF001 - the counter's own value


@pytest.mark.parametrize("backend", ["postgresql"])
def test_one_assignment_that_fails_holds_up_no_other_request_of_the_batch(
    app, patient, database_url
):
    """After the batch's commit every routed request still needs its notice published, its
    line logged, its metric counted and (an assigning team) its assignment. One assignment
    that fails (here the team's assignment lock stays taken past the database's
    lock_timeout) must not cost the other requests of the batch their notices, lines and
    metrics: the task's retry finds them routed and does none of it."""
    from intake.requests.assignment import TEAM_LOCK_SPACE, _team_key
    from workers.tasks import route_request

    team = "patient-services"  # "everything else": automatic assignment, least loaded
    for _ in range(3):
        patient.contact(topic="question")
    with app.app_context():
        references = dict(
            db.session.execute(
                sa.select(Request.id, Request.reference).order_by(Request.created_at, Request.id)
            ).all()
        )
        ids = list(references)
        database = db.engine.url.database
        db.session.remove()
        db.engine.dispose()
    engine = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    before = _routed_count(team)
    try:
        with engine.connect() as other:
            other.execute(sa.text(f"ALTER DATABASE \"{database}\" SET lock_timeout = '1s'"))
            other.execute(
                sa.text("SELECT pg_advisory_lock(:space, :key)"),
                {"space": TEAM_LOCK_SPACE, "key": _team_key(team)},
            )
            # Before, the task failed here (and was retried); what matters is what it did.
            with (
                app.app_context(),
                capture_logs() as logs,
                contextlib.suppress(sa.exc.OperationalError),
            ):
                route_request.run(ids[-1])
    finally:
        engine.dispose()
    lines = [line for line in logs if line["event"] == "request_routed"]
    assert sorted(line["reference"] for line in lines) == sorted(references.values())
    assert _routed_count(team) - before == 3
    # Each request's team notice reached the (embedded) broker now, not after the sweep's
    # republish delay.
    assert sorted(queued_tasks(app)[routing.NOTIFY_TASK]) == sorted(ids)
    assert any(line["event"] == "assignment_deferred" for line in logs)


FORGED_TRACES = (
    'abc"\n{"event":"request_routed","trace_id":"x"}',  # a forged log line
    "A" * 32,  # the right length, not the form the app writes
    "a" * 4000,  # over-long
    "0" * 31 + "\u202e",  # a control character at the end
)


def test_a_forged_outbox_trace_never_reaches_the_logs_or_a_message(app, patient, backend):
    """A database-only attacker writes trace ids of their own into the routing rows of waiting
    requests. The batch that routes them logs and publishes their notices under no trace at
    all: not the forged one, and not the trace of the task that happened to route them."""
    from workers.tasks import route_request

    requests = submitted(app, patient, len(FORGED_TRACES) + 1)
    leader_reference, leader, leader_trace = requests[-1]
    forged = {
        request_id: value
        for (_r, request_id, _t), value in zip(requests[:-1], FORGED_TRACES, strict=True)
    }
    with app.app_context():
        if backend == "postgresql":
            # The attacker owns the database: the column's length is no defence.
            db.session.execute(sa.text("ALTER TABLE outbox ALTER COLUMN trace_id TYPE text"))
        for request_id, value in forged.items():
            db.session.execute(
                sa.update(OutboxMessage)
                .where(
                    OutboxMessage.request_id == request_id,
                    OutboxMessage.task == routing.ROUTE_TASK,
                )
                .values(trace_id=value)
            )
        db.session.commit()
    with app.app_context(), tracing.bound(leader_trace), logs_with_context() as logs:
        route_request.run(leader)
    by_reference = {reference: request_id for reference, request_id, _t in requests}
    lines = [line for line in logs if line["event"] == "request_routed"]
    assert len(lines) == len(requests)
    for line in lines:
        expected = leader_trace if line["reference"] == leader_reference else None
        assert line.get(tracing.LOG_KEY) == expected, line
    # Every line logged, whatever it is, carries a trace of the form the app writes, or none.
    assert all(
        tracing._FORM.fullmatch(line[tracing.LOG_KEY])  # noqa: SLF001 - the form itself
        for line in logs
        if tracing.LOG_KEY in line
    )
    notices = outbox_rows(app, routing.NOTIFY_TASK)
    assert {request_id: trace for request_id, (_s, trace) in notices.items()} == {
        **{request_id: None for request_id in forged},
        leader: leader_trace,
    }
    headers = {
        ast.literal_eval(message["argsrepr"])[0]: message.get(tracing.HEADER)
        for message in queued_messages(app)
        if message["task"].endswith(routing.NOTIFY_TASK)
    }
    assert headers == {**{request_id: None for request_id in forged}, leader: leader_trace}
    assert set(by_reference.values()) == set(headers)
