"""Routing in batches: one routing task routes the requests waiting beside its own, each once,
each with its own audit event, notice and trace, and the tasks of the others then stop."""

from __future__ import annotations

import sqlite3
from collections import Counter

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from intake.clock import utcnow
from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request
from intake.ops import tracing
from intake.requests import routing
from tests.conftest import reference_from
from tests.workers.test_tasks import settings

__all__ = ["settings"]  # no broker (the tasks are run here by hand), e-mail routing rules


def submitted(app, patient, count: int) -> list[tuple[str, str, str]]:
    """``count`` contact requests, oldest first: (reference, request id, submission trace)."""
    found = []
    for _ in range(count):
        response = patient.contact(topic="copay")
        reference = reference_from(response)
        with app.app_context():
            request_id = db.session.execute(
                sa.select(Request.id).where(Request.reference == reference)
            ).scalar_one()
        found.append((reference, request_id, response.headers[tracing.RESPONSE_HEADER]))
    return found


def routed_events(app) -> Counter[str]:
    with app.app_context():
        return Counter(
            db.session.execute(
                sa.select(AuditEvent.reference).where(AuditEvent.action == "request.routed")
            ).scalars()
        )


def outbox_rows(app, task: str) -> dict[str, tuple[str, str | None]]:
    with app.app_context():
        rows = db.session.execute(
            sa.select(OutboxMessage.request_id, OutboxMessage.status, OutboxMessage.trace_id).where(
                OutboxMessage.task == task
            )
        ).all()
    assert len({row.request_id for row in rows}) == len(rows), f"two {task} rows for a request"
    return {row.request_id: (row.status, row.trace_id) for row in rows}


def traces_of(rows: dict[str, tuple[str, str | None]]) -> dict[str, str | None]:
    return {request_id: trace for request_id, (_status, trace) in rows.items()}


def test_one_task_routes_the_waiting_requests_and_the_others_then_stop(app, patient):
    from workers.tasks import route_request

    requests = submitted(app, patient, 5)
    last_reference, last_id, _trace = requests[-1]
    with app.app_context(), capture_logs() as logs:
        route_request.run(last_id)
    # The newest request's task routed all five: its own, then the oldest waiting.
    assert routed_events(app) == Counter({reference: 1 for reference, _id, _t in requests})
    with app.app_context():
        statuses = dict(db.session.execute(sa.select(Request.reference, Request.status)).all())
    assert set(statuses.values()) == {"queued"}
    lines = [line for line in logs if line["event"] == "request_routed"]
    assert [line["reference"] for line in lines] == [last_reference] + [
        reference for reference, _id, _t in requests[:-1]
    ]
    assert [bool(line.get("batched")) for line in lines] == [False, True, True, True, True]
    # Every routing row is done, every request has its one team notice waiting.
    assert {status for status, _trace in outbox_rows(app, "route_request").values()} == {"done"}
    assert set(outbox_rows(app, "notify_team")) == {request_id for _r, request_id, _t in requests}

    # The other four tasks, delivered afterwards, find their requests routed and change nothing.
    with app.app_context(), capture_logs() as logs:
        for _reference, request_id, _trace in requests[:-1]:
            route_request.run(request_id)
    assert [(line["event"], line["log_level"]) for line in logs] == [("route_skipped", "debug")] * 4
    assert routed_events(app) == Counter({reference: 1 for reference, _id, _t in requests})
    assert len(outbox_rows(app, "notify_team")) == 5


def test_a_batch_takes_the_oldest_waiting_up_to_its_size(app, patient):
    requests = submitted(app, patient, 6)
    ids = [request_id for _reference, request_id, _trace in requests]
    table = app.extensions["intake.routing"]
    with app.app_context():
        batch = routing.route_received(db.session, table, ids[4], utcnow(), batch=3)
    assert [routed.request_id for routed in batch] == [ids[4], ids[0], ids[1]]
    with app.app_context():
        waiting = set(
            db.session.execute(sa.select(Request.id).where(Request.status == "received")).scalars()
        )
    assert waiting == {ids[2], ids[3], ids[5]}
    # A routing row is closed only for a request that was routed.
    rows = outbox_rows(app, "route_request")
    assert {request_id for request_id, (status, _t) in rows.items() if status == "done"} == set(
        ids[:2] + [ids[4]]
    )


def test_each_request_of_a_batch_keeps_its_own_trace(app, patient):
    from workers.tasks import route_request

    requests = submitted(app, patient, 3)
    traces = {request_id: trace for _reference, request_id, trace in requests}
    assert len(set(traces.values())) == 3
    # The routing rows remember the trace each submission was made under.
    assert {
        request_id: trace
        for request_id, (_status, trace) in outbox_rows(app, "route_request").items()
    } == traces

    leader = requests[0][1]
    with app.app_context(), tracing.bound(traces[leader]):
        route_request.run(leader)
    # Each team notice is written, and so published, under its own request's trace, not under
    # the trace of the task that happened to route it.
    assert {
        request_id: trace
        for request_id, (_status, trace) in outbox_rows(app, "notify_team").items()
    } == traces


def test_a_cancelled_request_is_not_routed_by_a_batch(app, patient):
    requests = submitted(app, patient, 3)
    cancelled = requests[1][1]
    with app.app_context():
        db.session.execute(
            sa.update(Request).where(Request.id == cancelled).values(status="cancelled")
        )
        db.session.commit()
        batch = routing.route_received(
            db.session, app.extensions["intake.routing"], requests[0][1], utcnow()
        )
    assert [routed.request_id for routed in batch] == [requests[0][1], requests[2][1]]
    with app.app_context():
        assert db.session.get(Request, cancelled).status == "cancelled"
    assert outbox_rows(app, "route_request")[cancelled][0] == "pending"
    # Its own task closes its routing row, so the sweep stops publishing it; nothing else.
    from workers.tasks import route_request

    with app.app_context():
        route_request.run(cancelled)
        assert db.session.get(Request, cancelled).status == "cancelled"
    assert outbox_rows(app, "route_request")[cancelled][0] == "done"
    assert requests[1][0] not in routed_events(app)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_batch_skips_rows_another_transaction_holds_instead_of_waiting(
    app, patient, database_url
):
    """PostgreSQL: two workers' batches, or a worker and a staff action, never wait on each
    other's rows; what one holds, the other leaves to its own task."""
    requests = submitted(app, patient, 4)
    held = requests[1][1]
    table = app.extensions["intake.routing"]
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as other:
            other.execute(
                sa.text("SELECT id FROM requests WHERE id = :id FOR UPDATE"), {"id": held}
            )
            with app.app_context():
                # Waiting on the held row would fail this statement instead of hanging the test.
                db.session.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
                batch = routing.route_received(db.session, table, requests[0][1], utcnow())
            assert {routed.request_id for routed in batch} == {
                request_id for _r, request_id, _t in requests
            } - {held}
            other.rollback()
        with app.app_context():
            [own] = routing.route_received(db.session, table, held, utcnow())
        assert own.request_id == held
    finally:
        engine.dispose()
    assert routed_events(app) == Counter({reference: 1 for reference, _id, _t in requests})


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_task_whose_request_a_batch_routed_stops_without_the_write_lock(
    app, patient, database_url
):
    """SQLite: after a burst most routing tasks find their request routed by another task's
    batch. That read takes no write lock, so those tasks do not queue behind the submissions
    and the batches that hold it (the web and the worker processes share the one lock); before,
    each took it (``BEGIN IMMEDIATE``) just to read, and failed here after the busy timeout."""
    from workers.tasks import route_request

    requests = submitted(app, patient, 3)
    with app.app_context():
        route_request.run(requests[0][1])  # routes all three
    holder = sqlite3.connect(sa.make_url(database_url).database, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # a submission, say, holding the write lock
        with app.app_context(), capture_logs() as logs:
            for _reference, request_id, _trace in requests[1:]:
                route_request.run(request_id)
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    assert [line["event"] for line in logs if line["event"].startswith("route")] == [
        "route_skipped",
        "route_skipped",
    ]
    assert routed_events(app) == Counter({reference: 1 for reference, _id, _t in requests})
    assert {status for status, _trace in outbox_rows(app, "route_request").values()} == {"done"}


def test_a_request_that_cannot_be_routed_holds_up_no_other(app, patient, monkeypatch):
    """A bug or bad row in one request fails the batches that pick it up; each task then routes
    its own request alone, so only the bad request's own task fails."""
    from workers.tasks import route_request

    requests = submitted(app, patient, 4)
    poison = requests[0][1]  # the oldest: every batch picks it first
    route_row = routing._route_row

    def failing(session, table, row, *args):
        if row.id == poison:
            raise ValueError("this row cannot be routed")
        return route_row(session, table, row, *args)

    monkeypatch.setattr(routing, "_route_row", failing)
    with app.app_context(), capture_logs() as logs:
        for _reference, request_id, _trace in requests[1:]:
            route_request.run(request_id)
        with pytest.raises(ValueError):
            route_request.run(poison)
    assert routed_events(app) == Counter({reference: 1 for reference, _i, _t in requests[1:]})
    with app.app_context():
        assert db.session.get(Request, poison).status == "received"
    # Its routing row stays open, for the sweep to try again once the cause is fixed.
    assert outbox_rows(app, "route_request")[poison][0] == "pending"
    failed = [line for line in logs if line["event"] == "routing_batch_failed"]
    # Four batches failed (the poison's own task's too, before it failed alone), naming the
    # error by class only.
    assert len(failed) == 4 and {line["error"] for line in failed} == {"ValueError"}
