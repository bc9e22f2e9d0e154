"""A worker rides out Redis outages: the same process routes again once Redis is back.

Real parts: a password-protected redis-server that is really stopped (SIGTERM, so it comes back
empty; or a snapshot and SIGKILL, so it comes back with its data), a real ``celery -A workers
worker`` (prefork, as compose runs it: ``-Q routing``, or a plain worker), beat and PostgreSQL.
Redis goes down twice: once while the worker is idle, once while it holds unacknowledged tasks.
For the second, the test locks the requests' rows, so their ``route_request`` runs wait on the
lock (mid-task, not yet acknowledged) until the worker has noticed that Redis is gone.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa

from tests.workers.conftest import CeleryProcess, RedisServer, pipeline_settings, wait_until
from tests.workers.test_pipeline import all_queued, routed_events, rows, submit

HELD = 3  # two run (concurrency 2) and wait on their row locks; one waits prefetched
OUTAGE_SECONDS = 5
LOST = b"Connection to broker lost"


@pytest.fixture
def redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password="outage-" + tmp_path.name[-12:])
    server.start()
    yield server
    server.stop()


def stop_redis(server: RedisServer, keep_data: bool) -> None:
    """Stop redis-server for real: SIGTERM (it forgets everything), or snapshot and SIGKILL."""
    assert server.process is not None
    if keep_data:
        with server.client() as client:
            client.save()  # dump.rdb in its folder, which the restarted server loads
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        server.process = None
    else:
        server.stop()


@contextmanager
def rows_locked(database_url: str, references: list[str]) -> Iterator[None]:
    """Hold ``SELECT ... FOR UPDATE`` on these requests until the block ends."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(
                sa.text("SELECT id FROM requests WHERE reference = ANY(:refs) FOR UPDATE"),
                {"refs": references},
            )
            yield
    finally:
        engine.dispose()


def tasks_waiting_on_locks(database_url: str) -> int:
    # A connection of its own: pg_stat_activity is a snapshot per transaction.
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            query = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            return int(conn.execute(sa.text(query)).scalar_one())
    finally:
        engine.dispose()


def alive(worker: CeleryProcess, predicate: Callable[[], Any]) -> Callable[[], Any]:
    """``predicate``, failing at once (with the worker's log) if the worker has exited."""

    def check() -> Any:
        assert worker.process.poll() is None, worker.tail(4000)
        return predicate()

    return check


def outages_seen(worker: CeleryProcess) -> int:
    return worker.log_path.read_bytes().count(LOST)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    ("queues", "keep_data"),
    [(("-Q", "routing"), False), ((), True)],
    ids=["routing-worker-redis-empty", "plain-worker-redis-kept-data"],
)
def test_a_worker_survives_redis_outages_idle_and_holding_unacked_tasks(
    app,
    patient,
    celery_processes,
    base_settings,
    database_url,
    tmp_path,
    redis,
    smtp_server,
    queues,
    keep_data,
):
    smtp_url, _mailbox = smtp_server
    # A quick republish, so a task that Redis forgot (restarted empty) is published again soon.
    settings = pipeline_settings(
        base_settings, database_url, tmp_path, redis.url, smtp_url, outbox_republish_seconds=4
    )
    worker = celery_processes(settings, "worker", *queues).wait_ready()
    celery_processes(settings, "beat")
    pid = worker.process.pid

    # 1. Redis goes while the worker is idle; patients submit meanwhile.
    stop_redis(redis, keep_data)
    down = time.monotonic()
    wait_until(alive(worker, lambda: outages_seen(worker) == 1), 20, message="outage noticed")
    held = [submit(patient, "refill", {}, "en") for _ in range(HELD)]
    assert all(rows(app)[r].status == "received" for r in held)

    with rows_locked(database_url, held):
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down)))
        redis.start()
        # Beat's sweep publishes them; the worker takes them and waits on the locks.
        wait_until(
            alive(worker, lambda: tasks_waiting_on_locks(database_url) >= 2),
            30,
            0.1,
            "the same worker, back on Redis, running the held tasks",
        )

        # 2. Redis goes while the worker holds them, unacknowledged.
        stop_redis(redis, keep_data)
        down = time.monotonic()
        wait_until(alive(worker, lambda: outages_seen(worker) == 2), 20, message="outage noticed")
    # The locks are released: the held tasks finish while their connection is dead.
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down)))
    redis.start()

    wait_until(alive(worker, lambda: all_queued(app, held)), 45, 0.5, "the held requests routed")
    after = [submit(patient, "contact", {"topic": "question"}, "en") for _ in range(3)]
    wait_until(alive(worker, lambda: all_queued(app, after)), 30, 0.5, "new requests routed")

    # Their lines are written after the commit that queued them (a batch's one after another).
    wait_until(
        lambda: all(reference in worker.log_path.read_text() for reference in after),
        10,
        0.2,
        "routed by this worker",
    )
    log = worker.log_path.read_text()
    assert worker.process.poll() is None and worker.process.pid == pid
    assert log.count(" ready.") == 1, "the worker started once and was never restarted"
    assert "Unrecoverable error" not in log, log[-4000:]
    # Running tasks are let finish on a lost connection, by our setting, not by default.
    assert "CPendingDeprecationWarning" not in log
    events = routed_events(app)
    assert {r: events[r] for r in held + after} == {r: 1 for r in held + after}
