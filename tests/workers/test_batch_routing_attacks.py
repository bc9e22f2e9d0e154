"""Attacks on batch routing (intake.requests.routing.route_received): concurrent batches, a
staff action beside a batch, forged outbox traces, a failure after the batch's commit, a
backlog larger than a batch, and the audit chain and anchor after it all."""

from __future__ import annotations

import ast
import contextlib
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from intake.clock import utcnow
from intake.extensions import db
from intake.models import OutboxMessage, Request
from intake.ops import metrics, tracing
from intake.requests import casework, outbox, routing
from tests.conftest import reference_from
from tests.intake.compliance.conftest import Staff
from tests.intake.crypto.test_phi_canary import CONTACT_CANARIES, leaked
from tests.workers.conftest import (
    email_routing_file,
    free_port,
    pipeline_settings,
    wait_until,
)
from tests.workers.test_batch_routing import outbox_rows, routed_events, submitted

# Tests that run real worker processes over a throwaway redis-server and SMTP server; the
# others run the routing tasks here by hand, with no broker (as tests/workers/test_batch_routing).
PIPELINE_TESTS = {"test_a_worker_killed_mid_batch_routes_every_request_once"}


@pytest.fixture
def settings(request, base_settings, database_url, tmp_path):
    if request.function.__name__ in PIPELINE_TESTS:
        redis = request.getfixturevalue("redis_server")
        smtp_url, _mailbox = request.getfixturevalue("smtp_server")
        return pipeline_settings(base_settings, database_url, tmp_path, redis.url, smtp_url)
    return base_settings.replace(
        database_url=database_url,
        data_dir=tmp_path / "data",
        smtp_url=f"smtp://127.0.0.1:{free_port()}",
        routing_file=email_routing_file(tmp_path),
    )


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
            # The batch alone waits, on that row.
            wait_until(lambda: _waiters(engine) == 1, 20, message="the batch to wait")
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


def broker_queue(app) -> Path:
    """The embedded broker's queue folder (kombu's filesystem transport: a file a message)."""
    return Path(app.extensions["intake.settings"].data_dir) / "broker" / "queue"


def queued_messages(app) -> list[dict[str, Any]]:
    """The headers of the tasks waiting in the embedded broker."""
    return [json.loads(path.read_text())["headers"] for path in broker_queue(app).glob("*.msg")]


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
    # The sweep republishing the routing rows publishes each under the trace its row holds:
    # the forged ones under none. (The messages the submissions published are dropped first.)
    for path in broker_queue(app).glob("*.msg"):
        path.unlink()
    with app.app_context(), logs_with_context() as logs:
        assert outbox.sweep(db.session, republish_after=0) == len(requests)
    republished = {
        ast.literal_eval(message["argsrepr"])[0]: message.get(tracing.HEADER)
        for message in queued_messages(app)
    }
    assert republished == {**{request_id: None for request_id in forged}, leader: leader_trace}
    with app.app_context(), tracing.bound(leader_trace), logs_with_context() as more:
        route_request.run(leader)
    logs += more
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


def test_workers_routing_overlapping_batches_route_each_request_once(app, patient):
    """Four workers take the routing tasks of 36 waiting requests at once, each its own batch
    over the same oldest rows, and every task is delivered twice (acks_late redelivery): each
    request is still routed once, with one event, one notice and one routed line, and the
    chain and its anchor agree afterwards."""
    from workers.tasks import route_request

    requests = submitted(app, patient, 36)
    ids = [request_id for _reference, request_id, _trace in requests]
    deliveries = [ids[i::4][::-1] * 2 for i in range(4)]  # newest first: batches overlap
    counted = {team: _routed_count(team) for team in app.extensions["intake.routing"].teams}
    results: dict[str, Any] = {}
    start = threading.Barrier(4)

    def work(mine: list[str]):
        def run() -> int:
            start.wait()
            for request_id in mine:
                route_request.run(request_id)
            return len(mine)

        return run

    with capture_logs() as logs:
        threads = [
            _in_thread(app, results, f"worker{n}", work(mine)) for n, mine in enumerate(deliveries)
        ]
        for thread in threads:
            thread.join(120)
    assert all(results[f"worker{n}"] == 18 for n in range(4)), results
    assert routed_events(app) == Counter({reference: 1 for reference, _i, _t in requests})
    lines = Counter(line["reference"] for line in logs if line["event"] == "request_routed")
    assert lines == Counter({reference: 1 for reference, _i, _t in requests})
    assert not [line for line in logs if line["event"] == "routing_batch_failed"]
    assert len(outbox_rows(app, routing.NOTIFY_TASK)) == 36
    assert {status for status, _t in outbox_rows(app, routing.ROUTE_TASK).values()} == {"done"}
    with app.app_context():
        teams = Counter(db.session.execute(sa.select(Request.team)).scalars())
    assert {team: _routed_count(team) - counted[team] for team in teams} == dict(teams)
    assert_trail_intact(app)


def test_a_backlog_drains_in_batches_of_at_most_the_batch_size(app, patient):
    """A task routes its own request and at most ROUTING_BATCH - 1 others, the oldest: a
    backlog of any size never makes one transaction (and one hold of the chain's lock) longer."""
    from workers.tasks import route_request

    requests = submitted(app, patient, routing.ROUTING_BATCH + 5)
    ids = [request_id for _reference, request_id, _trace in requests]
    with app.app_context():
        route_request.run(ids[-1])
        waiting = list(
            db.session.execute(
                sa.select(Request.id)
                .where(Request.status == "received")
                .order_by(Request.created_at, Request.id)
            ).scalars()
        )
    # Its own, then the 24 oldest; the five after them wait for their own tasks.
    assert waiting == ids[routing.ROUTING_BATCH - 1 : -1]
    assert sum(routed_events(app).values()) == routing.ROUTING_BATCH
    with app.app_context():
        route_request.run(waiting[0])
    assert sum(routed_events(app).values()) == len(requests)
    assert_trail_intact(app)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_worker_killed_mid_batch_routes_every_request_once(
    app, patient, database_url, celery_processes, settings, smtp_server
):
    """A worker is SIGKILLed while its batches are half written (their request rows updated,
    held on the routing rows the sweep has locked). Nothing of them commits; the redelivered
    tasks (acks_late) and the sweep then route every request exactly once, with one e-mail
    each, an audit chain and anchor that agree, and no PHI in any worker's log."""
    _url, mailbox = smtp_server
    references = [
        reference_from(patient.contact(topic="copay", **CONTACT_CANARIES)) for _ in range(6)
    ]
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as sweep:
            # Every routing row: the worker's two processes may split the requests between
            # two batches, and a batch holding none of the locked rows would commit.
            sweep.execute(sa.text("SELECT id FROM outbox WHERE task = 'route_request' FOR UPDATE"))
            first = celery_processes(settings).wait_ready()
            # Every waiter waits on the sweep, or on a batch held there.
            wait_until(lambda: _waiters(engine) >= 1, 60, message="a batch held")
            first.kill()
            sweep.rollback()
        # The killed worker's sessions end without a commit.
        wait_until(lambda: _waiters(engine) == 0, 30, message="the sessions gone")
    finally:
        engine.dispose()
    with app.app_context():
        statuses = set(db.session.execute(sa.select(Request.status)).scalars())
    assert statuses == {"received"}, "the killed batch committed"

    second = celery_processes(settings).wait_ready()
    beat = celery_processes(settings, "beat")
    wait_until(
        lambda: sum(routed_events(app).values()) >= len(references), 90, message="all routed"
    )
    wait_until(lambda: len(mailbox.messages) >= len(references), 60, message="the e-mails")
    assert routed_events(app) == Counter({reference: 1 for reference in references})
    mailed = Counter(
        next(reference for reference in references if reference in body)
        for body in mailbox.bodies()
    )
    assert mailed == Counter({reference: 1 for reference in references})
    assert_trail_intact(app)
    for process in (first, second, beat):
        assert leaked(process.log_path.read_bytes()) == []


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_request_cancelled_while_its_task_waits_for_the_lock_is_not_routed(
    app, patient, database_url
):
    """The task's unlocked read sees its request waiting; before it has the row, a supervisor's
    transaction holding it cancels it. The task must then route nothing of it, write no event,
    and close its routing row so the sweep stops publishing it."""
    requests = submitted(app, patient, 3)
    reference, cancelled, _trace = requests[1]
    table = app.extensions["intake.routing"]
    engine = sa.create_engine(database_url)
    results: dict[str, Any] = {}
    try:
        with engine.connect() as supervisor:
            supervisor.execute(
                sa.text("SELECT id FROM requests WHERE id = :id FOR UPDATE"), {"id": cancelled}
            )
            task = _in_thread(
                app,
                results,
                "task",
                lambda: routing.route_received(db.session, table, cancelled, utcnow()),
            )
            wait_until(lambda: _waiting_on_lock(engine, "SELECT"), 20, message="the task")
            supervisor.execute(
                sa.text("UPDATE requests SET status = 'cancelled' WHERE id = :id"),
                {"id": cancelled},
            )
            supervisor.commit()
        task.join(30)
    finally:
        engine.dispose()
    assert results["task"] == []
    assert reference not in routed_events(app)
    assert outbox_rows(app, routing.ROUTE_TASK)[cancelled][0] == "done"
    with app.app_context():
        assert db.session.get(Request, cancelled).status == "cancelled"
    assert_trail_intact(app)


def test_an_assigning_team_gives_out_every_request_of_a_batch(app, patient):
    """Patient services assigns automatically (least loaded): the requests routed in another
    request's batch are assigned as if each had been routed alone, spread over its people."""
    from intake.models import AuditEvent
    from tests.intake.requests.test_assignment import add_user, create_teams
    from workers.tasks import route_request

    create_teams(app)
    add_user(app, "ann", ["patient-services"])
    add_user(app, "bob", ["patient-services"])
    references = [reference_from(patient.contact(topic="question")) for _ in range(4)]
    with app.app_context():
        newest = db.session.execute(
            sa.select(Request.id).where(Request.reference == references[-1])
        ).scalar_one()
        route_request.run(newest)
        assigned = {
            event.reference: json.loads(event.details)
            for event in db.session.execute(
                sa.select(AuditEvent).where(AuditEvent.action == "request.assigned")
            ).scalars()
        }
    assert set(assigned) == set(references)
    assert {details["trigger"] for details in assigned.values()} == {"routed"}
    assert Counter(details["assignee"] for details in assigned.values()) == {"ann": 2, "bob": 2}


def _waiters(engine: sa.Engine) -> int:
    """How many sessions of the test's database wait on a lock."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalar()
        )


@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_sweep_marking_rows_published_never_deadlocks_a_batch_closing_them(
    app, patient, database_url
):
    """After an outage the sweep publishes the waiting requests' routing rows and marks them
    published in one UPDATE, while a batch marks the same rows done in one UPDATE. On a large
    table each statement locks its rows in the order of its index (the sweep by id, the batch
    by request id), so two rows in opposite orders deadlock and PostgreSQL kills the batch.
    Both must lock in one order."""
    with app.app_context():
        database = db.engine.url.database
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        # What the planner does on a table of millions of rows: walk the indexes.
        for setting in ("enable_seqscan", "enable_bitmapscan"):
            conn.execute(sa.text(f'ALTER DATABASE "{database}" SET {setting} = off'))
    admin.dispose()
    # Requests until two routing rows come in opposite orders by id and by request id.
    requests = submitted(app, patient, 2)
    while True:
        with app.app_context():
            rows = db.session.execute(
                sa.select(OutboxMessage.id, OutboxMessage.request_id)
                .where(OutboxMessage.task == routing.ROUTE_TASK)
                .order_by(OutboxMessage.id)
            ).all()
        pair = next(
            (
                (x.id, y.id)
                for i, x in enumerate(rows)
                for y in rows[i + 1 :]
                if x.request_id > y.request_id and x.request_id != requests[-1][1]
            ),
            None,
        )
        if pair is not None and len(requests) >= 3:
            break
        requests += submitted(app, patient, 1)
    first, second = pair  # the sweep locks ``first`` first; the batch ``second`` first
    leader = requests[-1][1]
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    table = app.extensions["intake.routing"]
    engine = sa.create_engine(database_url)
    results: dict[str, Any] = {}
    try:
        with engine.connect() as holder:
            # Someone (the submission's own publish, a second sweep) has ``first`` a moment.
            holder.execute(
                sa.text("SELECT id FROM outbox WHERE id = :id FOR UPDATE"), {"id": first}
            )
            sweep = _in_thread(
                app, results, "sweep", lambda: outbox.publish(db.session, [first, second])
            )
            wait_until(lambda: _waiters(engine) == 1, 20, message="the sweep to wait")
            with capture_logs() as logs:
                batch = _in_thread(
                    app,
                    results,
                    "batch",
                    lambda: routing.route_received(db.session, table, leader, utcnow()),
                )
                wait_until(lambda: _waiters(engine) == 2, 20, message="the batch to wait")
                holder.rollback()
                sweep.join(30)
                batch.join(30)
    finally:
        engine.dispose()
    assert results["sweep"] == 2, results["sweep"]
    assert not [line for line in logs if line["event"] == "routing_batch_failed"], logs
    assert {routed.request_id for routed in results["batch"]} == {r for _ref, r, _t in requests}
    assert {status for status, _t in outbox_rows(app, routing.ROUTE_TASK).values()} == {"done"}
