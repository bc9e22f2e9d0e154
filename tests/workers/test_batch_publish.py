"""A routing batch sends its team notices to a real redis-server together: one round trip for
all of them, each message under its own request's trace, and none lost when Redis refuses the
batch (the outbox sweep publishes them once it takes writes again)."""

from __future__ import annotations

import base64
import json

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import OutboxMessage
from intake.ops import tracing
from tests.workers.conftest import email_routing_file
from tests.workers.test_batch_routing import submitted

COUNT = 8


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server):
    return base_settings.replace(
        database_url=database_url,
        data_dir=tmp_path / "data",
        redis_url=redis_server.url,
        routing_file=email_routing_file(tmp_path),
    )


def queued_notices(redis) -> dict[str, str | None]:
    """The notify_team messages waiting in Redis: request id -> the trace they carry."""
    found = {}
    for raw in redis.lrange("notifications", 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == "workers.tasks.notify_team"
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        found[args[0]] = message["headers"].get(tracing.HEADER)
    return found


def reads(redis) -> int:
    """Read events the server has processed: one per round trip of its clients (and this)."""
    return int(redis.info("stats")["total_reads_processed"])


def notice_rows(app) -> dict[str, tuple[str, bool]]:
    """Each request's notify_team row: (status, published?)."""
    with app.app_context():
        rows = db.session.execute(
            sa.select(
                OutboxMessage.request_id, OutboxMessage.status, OutboxMessage.published_at
            ).where(OutboxMessage.task == "notify_team")
        ).all()
    assert len({row.request_id for row in rows}) == len(rows), "two notices for a request"
    return {row.request_id: (row.status, row.published_at is not None) for row in rows}


def test_a_batch_sends_its_notices_in_one_round_trip_each_under_its_own_trace(
    app, patient, redis_server
):
    """Before: one LPUSH, and one wait for Redis, per notice: eight round trips here."""
    from workers.tasks import route_request

    # A batch's revoke of the other routing tasks is a message of its own, sent from a
    # background thread at any moment (tests/workers/test_routing_revokes.py): none here.
    app.extensions["intake.publisher"].revokes = False
    requests = submitted(app, patient, COUNT)
    redis = redis_server.client()
    redis.delete("notifications")
    with app.app_context():
        route_request.run(requests[0][1])  # the task's producer connects (a round trip or two)
    redis.delete("notifications")
    with app.app_context():
        db.session.execute(sa.update(OutboxMessage).values(status="done"))
        db.session.commit()

    more = submitted(app, patient, COUNT)
    before = reads(redis)
    with app.app_context(), tracing.bound(more[-1][2]):  # as its message's header binds it
        route_request.run(more[-1][1])
    spent = reads(redis) - before - 1  # less the INFO that read the count

    assert queued_notices(redis) == {request_id: trace for _ref, request_id, trace in more}
    assert notice_rows(app) == {
        **{request_id: ("done", True) for _r, request_id, _t in requests},
        **{request_id: ("pending", True) for _r, request_id, _t in more},
    }
    assert spent <= 2, f"{spent} round trips to Redis for {COUNT} notices"


def test_notices_redis_refused_as_a_batch_are_published_by_the_sweep(
    app, patient, redis_server, monkeypatch
):
    """Redis out of memory takes the connection and PING but refuses every LPUSH: the batch
    fails as a whole, when it is sent. No notice is then counted as published; the sweep
    publishes them all once Redis takes writes again."""
    import workers.publish
    from workers.tasks import route_request, sweep_outbox

    monkeypatch.setattr(workers.publish, "COOL_OFF_SECONDS", 0.0)  # retry at the next sweep
    requests = submitted(app, patient, COUNT)
    redis = redis_server.client()
    redis.delete("notifications")
    redis.config_set("maxmemory-policy", "noeviction")
    redis.config_set("maxmemory", "1")
    with app.app_context(), tracing.bound(requests[-1][2]):
        route_request.run(requests[-1][1])
    assert redis.llen("notifications") == 0
    assert notice_rows(app) == {request_id: ("pending", False) for _r, request_id, _t in requests}

    redis.config_set("maxmemory", "0")
    with app.app_context():
        assert sweep_outbox.run() == COUNT
    assert queued_notices(redis) == {request_id: trace for _ref, request_id, trace in requests}
    assert notice_rows(app) == {request_id: ("pending", True) for _r, request_id, _t in requests}
