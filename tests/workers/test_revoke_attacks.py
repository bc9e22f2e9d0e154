"""Attacks on the routing revokes (workers.publish.CeleryPublisher.revoke, workers.tasks.
_revoke_routed): a revoke asked before its batch is committed, or for a batch whose commit
failed; a revoke heard before the task it names is published; Redis stopped, frozen or out of
memory at the moment of the revoke; a routing process killed between its commit and its revoke;
two worker nodes; outage after outage (threads, connections); a forged flood of revokes; PHI in
Redis's traffic and the workers' logs during a burst.

What a user would notice is asserted: a request not routed, or routed twice, a team told twice
or never, a routing task that does not finish, rows left open, PHI where it must not be.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request
from intake.requests import outbox
from tests.conftest import reference_from
from tests.intake.crypto.test_phi_canary import CONTACT_CANARIES, leaked
from tests.workers.conftest import ROOT, pipeline_settings, process_env, wait_until
from tests.workers.test_batch_publish_attacks import e_mails_per_reference, everything_in_redis
from tests.workers.test_batch_routing import routed_events
from tests.workers.test_routing_revokes import (
    batched_in_log,
    burst,
    revokes_heard,
    routed_once,
    routing_task_ids,
)
from workers.publish import task_id

ROUTE = "route_request"


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server, smtp_server):
    smtp_url, _mailbox = smtp_server
    return pipeline_settings(base_settings, database_url, tmp_path, redis_server.url, smtp_url)


# --- what the database, the mailbox and the workers say


def open_rows(app) -> Counter[str]:
    """Outbox rows not done yet, by task."""
    with app.app_context():
        return Counter(
            db.session.execute(
                sa.select(OutboxMessage.task).where(OutboxMessage.status.in_(outbox.OPEN))
            ).scalars()
        )


def statuses(app) -> dict[str, str]:
    """reference -> status, of every request."""
    with app.app_context():
        return dict(db.session.execute(sa.select(Request.reference, Request.status)).all())


def assert_routed_and_told_once(app, mailbox, references, timeout: float = 60) -> None:
    """Every request routed once and its team e-mailed once; no outbox row left open."""
    wanted = set(references)

    def explain() -> str:
        return f"statuses {Counter(statuses(app).values())}, open rows {dict(open_rows(app))}"

    wait_until(
        lambda: routed_once(app, wanted), timeout, message="every request routed", explain=explain
    )
    wait_until(
        lambda: not open_rows(app) and len(mailbox.messages) >= len(wanted),
        timeout,
        message="every team e-mailed, every row closed",
        explain=explain,
    )
    assert routed_events(app) == Counter({reference: 1 for reference in wanted})
    assert set(statuses(app).values()) == {"queued"}
    assert e_mails_per_reference(mailbox) == Counter({reference: 1 for reference in wanted})


def submitted_unpublished(app, patient, count: int, monkeypatch) -> dict[str, str]:
    """``count`` requests whose routing tasks never reached the broker (the web's publish did
    not happen yet): reference -> request id."""
    publisher = app.extensions["intake.publisher"]
    monkeypatch.setitem(app.extensions, "intake.publisher", None)
    try:
        return burst(app, patient, count)
    finally:
        app.extensions["intake.publisher"] = publisher


def run_task(app, request_id: str) -> None:
    """The routing task of ``request_id``, run here as a worker's pool process runs it."""
    from workers.tasks import route_request

    with app.app_context():
        route_request.run(request_id)


def inspect(app, nodes: int) -> Any:
    """Celery's inspect, answered as soon as ``nodes`` workers have replied."""
    return app.extensions["celery"].control.inspect(timeout=5, limit=nodes)


def revoked_on(app, nodes: int = 1) -> dict[str, set[str]]:
    """Each worker node's revoked task ids."""
    with app.app_context():
        replies = inspect(app, nodes).revoked() or {}
    return {node: set(ids) for node, ids in replies.items()}


def routing_runs(app, nodes: int = 1) -> int:
    """How many routing tasks the workers ran (revoked ones are dropped, not run)."""
    with app.app_context():
        stats = inspect(app, nodes).stats() or {}
    return sum(s["total"].get(f"workers.tasks.{ROUTE}", 0) for s in stats.values())


class Recorder:
    """The app's publisher's revoke, recorded (and checked by ``check``) when it is asked."""

    def __init__(self, publisher: Any, check: Any = None) -> None:
        self.real = publisher.revoke
        self.check = check
        self.calls: list[list[str]] = []

    def __call__(self, task_ids) -> bool:
        ids = list(task_ids)
        self.calls.append(ids)
        if self.check is not None:
            self.check(ids)
        return bool(self.real(ids))

    @property
    def ids(self) -> list[str]:
        return [task for call in self.calls for task in call]


def record_revokes(app, monkeypatch, check: Any = None) -> Recorder:
    publisher = app.extensions["intake.publisher"]
    recorder = Recorder(publisher, check)
    monkeypatch.setattr(publisher, "revoke", recorder)
    return recorder


# --- 1. A revoke names only requests whose routing is committed; never the task's own


def test_every_revoke_names_only_requests_already_committed_as_routed(
    app, patient, database_url, monkeypatch
):
    """Thirty requests wait (more than a batch); their routing tasks run here, newest first,
    as workers would take them. Each time a revoke is asked, another connection to the
    database must already see every request it names routed (status queued, its one
    request.routed event, its routing row closed): a revoke sent before the batch's commit
    would drop a task whose request may still be waiting. Never the running task's own id.
    And each revoked task, run anyway, finds nothing to do."""
    requests = burst(app, patient, 30)
    tasks = routing_task_ids(app, requests.values())
    by_task = {task: request_id for request_id, task in tasks.items()}
    reference_of = {request_id: reference for reference, request_id in requests.items()}
    # SQLite: a reader that meets the batch's write lock gives up at once (a revoke asked
    # inside the batch's transaction), rather than failing the batch after the busy timeout.
    options = {"connect_args": {"timeout": 0.5}} if database_url.startswith("sqlite") else {}
    engine = sa.create_engine(database_url, **options)
    running: list[str] = []
    problems: list[str] = []

    def committed(ids: list[str]) -> None:
        try:
            check(ids)
        except sa.exc.OperationalError as error:
            problems.append(f"{ids}: revoked inside the batch's transaction ({error.orig})")

    def check(ids: list[str]) -> None:
        with engine.connect() as other:
            for task in ids:
                request_id = by_task.get(task)
                if request_id is None:
                    problems.append(f"{task}: no such routing task")
                    continue
                if request_id == running[-1]:
                    problems.append(f"{task}: the running task's own")
                status = other.execute(
                    sa.select(Request.status).where(Request.id == request_id)
                ).scalar_one()
                row = other.execute(
                    sa.select(OutboxMessage.status).where(
                        OutboxMessage.request_id == request_id, OutboxMessage.task == ROUTE
                    )
                ).scalar_one()
                events = other.execute(
                    sa.select(sa.func.count(AuditEvent.seq)).where(
                        AuditEvent.action == "request.routed",
                        AuditEvent.reference == reference_of[request_id],
                    )
                ).scalar_one()
                if (status, row, events) != ("queued", "done", 1):
                    problems.append(f"{task}: revoked while {status}, row {row}, {events} events")

    recorder = record_revokes(app, monkeypatch, committed)
    try:
        done_by: dict[str, str] = {}
        for request_id in reversed(list(requests.values())):
            before = routed_events(app)
            running.append(request_id)
            run_task(app, request_id)
            for reference in routed_events(app) - before:
                done_by[requests[reference]] = request_id
    finally:
        engine.dispose()
    assert problems == []
    assert routed_once(app, requests)
    batched = {rid for rid, owner in done_by.items() if owner != rid}
    assert len(batched) == 28  # the newest task takes 24 others, the next one the last 4
    # Exactly the tasks of requests another task routed, each once.
    assert Counter(recorder.ids) == Counter({tasks[rid]: 1 for rid in batched})

    # Every revoked task, had it run anyway, finds its request routed and does nothing.
    notices = open_rows(app)
    for request_id in batched:
        run_task(app, request_id)
    assert open_rows(app) == notices
    assert routed_events(app) == Counter({reference: 1 for reference in requests})


# --- 2. A batch whose commit fails revokes nothing; a revoke heard before the publish


@contextlib.contextmanager
def failing_batch_commit():
    """The next routing batch of more than one request fails at its commit (after its events,
    its anchor entries and its closing of the routing rows were written): what a lost
    connection or a serialization failure at COMMIT does. Yields how often it fired."""
    from intake.audit import chain

    real = chain.record_events
    state = {"armed": False, "fired": 0}

    def record(session, new):
        if len(new) > 1 and not state["fired"]:
            state["armed"] = True
        return real(session, new)

    def before_commit(_session) -> None:
        if state["armed"]:
            state["armed"] = False
            state["fired"] += 1
            raise RuntimeError("injected: the batch's COMMIT failed")

    chain.record_events = record
    sa.event.listen(sa.orm.Session, "before_commit", before_commit)
    try:
        yield state
    finally:
        sa.event.remove(sa.orm.Session, "before_commit", before_commit)
        chain.record_events = real


def test_a_batch_whose_commit_fails_revokes_nothing_and_every_request_still_routes(
    app, patient, celery_processes, settings, smtp_server, monkeypatch
):
    """A worker is up and listening for revokes. Six requests wait, their tasks not yet
    published. The newest one's task builds a batch of all six and its COMMIT fails: it
    routes its own request alone. Had it revoked the batch's other tasks (before the commit,
    or from what the failed batch had planned), the worker would drop them when the sweep
    publishes them, and the five would wait for hours. None may be revoked; the sweep's
    publish routes them, each once, each team told once."""
    _url, mailbox = smtp_server
    worker = celery_processes(settings).wait_ready()
    requests = submitted_unpublished(app, patient, 6, monkeypatch)
    newest = list(requests.values())[-1]
    recorder = record_revokes(app, monkeypatch)

    with failing_batch_commit() as failed:
        run_task(app, newest)
    assert failed["fired"] == 1, "the batch never reached its commit"
    routed = {reference for reference, status in statuses(app).items() if status == "queued"}
    assert routed == {reference for reference, rid in requests.items() if rid == newest}
    assert recorder.ids == [], "a revoke for a batch that did not commit"

    with app.app_context():
        outbox.sweep(db.session)  # publishes the five routing tasks
    assert_routed_and_told_once(app, mailbox, requests)
    assert worker.process.poll() is None, worker.tail()


def test_a_revoke_heard_before_its_task_is_published_drops_only_routed_work(
    app, patient, celery_processes, settings, smtp_server, redis_server, monkeypatch
):
    """The web committed six requests and has not published their tasks yet (slow, or the
    broker blinked) when a worker's batch routes all six and revokes the other five. Their
    tasks reach the broker only afterwards, with the ids the revoke named: the worker drops
    them unrun (each request is routed), and a request submitted afterwards, and a sweep,
    still get everything routed once and every team told once."""
    _url, mailbox = smtp_server
    celery_processes(settings).wait_ready()
    requests = submitted_unpublished(app, patient, 6, monkeypatch)
    ids = list(requests.values())
    tasks = routing_task_ids(app, ids)
    recorder = record_revokes(app, monkeypatch)
    run_task(app, ids[-1])
    assert sorted(recorder.ids) == sorted(tasks[rid] for rid in ids[:-1])
    wait_until(
        lambda: (nodes := revoked_on(app)) and all(set(recorder.ids) <= f for f in nodes.values()),
        20,
        message="the worker flagged the revokes",
    )
    ran = routing_runs(app)

    # The web's late publish of all six (the own one included: it was run here, not queued).
    publisher = app.extensions["intake.publisher"]
    with app.app_context():
        rows = dict(
            db.session.execute(
                sa.select(OutboxMessage.request_id, OutboxMessage.id).where(
                    OutboxMessage.task == ROUTE
                )
            ).all()
        )
    for request_id in ids:
        publisher(ROUTE, request_id, rows[request_id])
    redis = redis_server.client()
    wait_until(
        lambda: redis.llen("routing") == 0 and not redis.hlen("unacked"),
        30,
        message="the routing queue drained",
    )
    late = reference_from(patient.contact(topic="copay"))
    assert_routed_and_told_once(app, mailbox, [*requests, late])
    # The five were dropped: only the own task's copy and the late request's task ran.
    assert routing_runs(app) - ran == 2


# --- 3. Redis stopped, frozen or out of memory at the moment of the revoke


FAULTS = ("stopped", "frozen", "out_of_memory")


def revoke_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "intake-revoke"]


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize("fault", FAULTS)
def test_redis_failing_at_the_revoke_the_task_finishes_and_every_team_is_told_once(
    app, patient, celery_processes, settings, smtp_server, redis_server, monkeypatch, fault
):
    """Six requests wait, their tasks queued. The newest one's task routes all six and
    publishes their notices; then, as it revokes the other five, Redis is stopped (gone:
    kombu retries a control message without end), frozen by SIGSTOP (connections open, no
    answer) or out of memory (writes refused). The task must still finish (a synchronous
    revoke would hang it, with its assignments not made), all six routed once. Once Redis is
    back, a worker and the sweep tell each team once, and nothing stays open."""
    from workers import tasks

    _url, mailbox = smtp_server
    redis = redis_server.client()
    redis.config_set("maxmemory-policy", "noeviction")
    requests = burst(app, patient, 6)
    newest = list(requests.values())[-1]
    assert redis_server.process is not None
    pid = redis_server.process.pid
    threads_before = len(revoke_threads())
    real = tasks._revoke_routed
    applied: list[str] = []

    def failing(batch, request_id) -> None:
        if fault == "stopped":
            redis_server.stop()
        elif fault == "frozen":
            os.kill(pid, signal.SIGSTOP)
        else:
            redis.config_set("maxmemory", "1")
        applied.append(fault)
        real(batch, request_id)

    monkeypatch.setattr(tasks, "_revoke_routed", failing)
    done = threading.Event()
    errors: list[BaseException] = []

    def route() -> None:
        try:
            run_task(app, newest)
        except BaseException as error:  # noqa: BLE001 - the test asserts on it
            errors.append(error)
        finally:
            done.set()

    threading.Thread(target=route, daemon=True).start()
    try:
        finished = done.wait(40)
    finally:
        if fault == "stopped":
            redis_server.start()  # the same port, empty
        elif fault == "frozen":
            os.kill(pid, signal.SIGCONT)
        else:
            redis.config_set("maxmemory", "0")
    assert finished, "the routing task hung at its revoke"
    assert errors == [] and applied == [fault]
    assert routed_once(app, requests)
    assert len(revoke_threads()) <= threads_before + 1

    celery_processes(settings).wait_ready()
    with app.app_context():
        outbox.sweep(db.session, republish_after=0)  # what Redis lost, or never took
    assert_routed_and_told_once(app, mailbox, requests)


# --- 4. Outage after outage: one sender thread, no pile of connections


def redis_clients(admin) -> int:
    return len(admin.client_list())


@pytest.mark.parametrize("backend", ["sqlite"])
def test_outage_after_outage_leaves_one_sender_and_no_pile_of_connections(app, redis_server):
    """Revokes asked from many threads while Redis is stopped, then started again, four
    times over, then while it is frozen past the socket timeout: never more than one sender
    thread for the process, however often asked; after each outage it sends again; and the
    process holds no more connections to Redis after the fifth outage than after the first."""
    publisher = app.extensions["intake.publisher"]
    others = set(revoke_threads())  # other apps' senders in this test process

    def senders() -> list[threading.Thread]:
        return [thread for thread in revoke_threads() if thread not in others]

    most = 0

    def ask(tag: str) -> None:
        nonlocal most

        def asker(n: int) -> None:
            nonlocal most
            for k in range(40):
                publisher.revoke([f"{ROUTE}-{n}-{tag}-{k}"])
                most = max(most, len(senders()))

        askers = [threading.Thread(target=asker, args=(n,), daemon=True) for n in range(6)]
        for thread in askers:
            thread.start()
        for thread in askers:
            thread.join(30)
            assert not thread.is_alive(), "a revoke waited on the broker"

    def sent_again(tag: str) -> None:
        listener = redis_server.client().pubsub()
        listener.psubscribe("*pidbox*")
        heard: list[str] = []

        def heard_marker() -> bool:
            publisher.revoke([f"{ROUTE}-0-{tag}"])
            heard.extend(revokes_heard(listener))
            return f"{ROUTE}-0-{tag}" in heard

        wait_until(heard_marker, 60, message=f"a revoke sent after outage {tag}")
        listener.close()

    counts = []
    for cycle in range(4):
        redis_server.stop()
        ask(f"down{cycle}")
        assert len(senders()) <= 1
        redis_server.start()
        sent_again(f"up{cycle}")
        with redis_server.client() as admin:
            counts.append(len(admin.client_list()))
    assert redis_server.process is not None
    pid = redis_server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        ask("frozen")
        time.sleep(7)  # past the 5 s socket timeout: the sender's connection is given up
        assert len(senders()) <= 1
    finally:
        os.kill(pid, signal.SIGCONT)
    sent_again("thawed")
    with redis_server.client() as admin:
        wait_until(
            lambda: len(admin.client_list()) <= counts[0] + 1,
            30,
            message=f"connections back to {counts[0]} (after each outage: {counts})",
            explain=lambda: str(admin.client_list()),
        )
    assert max(counts) <= counts[0] + 1, counts
    assert most <= 1, f"{most} sender threads at once"
    wait_until(lambda: len(senders()) <= 1, 30, message="senders ended")


# --- 5. A process at its thread limit


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_process_at_its_thread_limit_still_assigns_its_batch_and_revokes_once_it_can(
    app, patient, redis_server, monkeypatch
):
    """A worker's pool process at its thread limit (a container's pids limit, RLIMIT_NPROC):
    starting the revoke sender fails with "can't start new thread". The revoke only saves
    work, so the routing task must go on: the batch's requests (patient services, which
    assigns) are each given to someone, and the task raises nothing (a worker would log a
    failed task). Once threads can be started again, the next batch's revokes go out."""
    from tests.intake.requests.test_assignment import add_user, create_teams

    create_teams(app)
    add_user(app, "ann", ["patient-services"])
    add_user(app, "bob", ["patient-services"])
    first = [reference_from(patient.contact(topic="question")) for _ in range(4)]
    ids = statuses_ids(app)
    real_start = threading.Thread.start
    limited = {"on": True, "refused": 0}

    def start(self) -> None:
        if limited["on"] and self.name == "intake-revoke":
            limited["refused"] += 1
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        run_task(app, ids[first[-1]])
        raised = None
    except RuntimeError as error:
        raised = error
    finally:
        limited["on"] = False
    with app.app_context():
        assigned = set(
            db.session.execute(
                sa.select(AuditEvent.reference).where(AuditEvent.action == "request.assigned")
            ).scalars()
        )

    listener = redis_server.client().pubsub()
    listener.psubscribe("*pidbox*")
    second = [reference_from(patient.contact(topic="question")) for _ in range(4)]
    ids = statuses_ids(app)
    expected = set(routing_task_ids(app, [ids[r] for r in second[:-1]]).values())
    with contextlib.suppress(RuntimeError):
        run_task(app, ids[second[-1]])
    heard: list[str] = []
    resumed = eventually(
        lambda: heard.extend(revokes_heard(listener)) or expected <= set(heard), 10
    )

    assert limited["refused"] >= 1
    assert raised is None, f"the routing task failed after its commit: {raised!r}"
    assert assigned == set(first), "requests of the batch left unassigned"
    assert resumed, "no revoke sent again once threads could be started"


def eventually(predicate, timeout: float = 20) -> bool:
    """Whether ``predicate`` came true within ``timeout`` seconds (polled)."""
    try:
        wait_until(predicate, timeout)
    except AssertionError:
        return False
    return True


def statuses_ids(app) -> dict[str, str]:
    with app.app_context():
        return dict(db.session.execute(sa.select(Request.reference, Request.id)).all())


# --- 6. A routing process killed between its commit and its revoke


KILLED_TASK = """
import os, signal, sys

import workers
from workers import tasks

request_id, moment = sys.argv[1], sys.argv[2]
real = tasks._revoke_routed


def killed(batch, own):
    if moment == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(batch, own)
    os.kill(os.getpid(), signal.SIGKILL)  # "while": the revoke handed over, maybe not sent


tasks._revoke_routed = killed
with workers.app.flask_app.app_context():
    tasks.route_request.run(request_id)
sys.exit(3)
"""


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize("moment", ["before", "while"])
def test_a_process_killed_around_its_revoke_loses_nothing_and_tells_each_team_once(
    app, patient, celery_processes, settings, smtp_server, redis_server, moment
):
    """A worker that serves only notices is up (it hears revokes). Six requests wait, their
    routing tasks queued. A routing process (the pool process of a worker, with this test's
    settings) runs the newest one's task: the batch commits, the notices are published, and
    the process is SIGKILLed just before it revokes the other five, or just after handing the
    revoke to its sender. The worker then takes on the routing queue: the queued tasks, the
    killed one's own included (redelivered, as acks_late does), are dropped or find their
    requests routed. Every request routed once, every team told once, nothing left open."""
    _url, mailbox = smtp_server
    worker = celery_processes(settings, "worker", "-Q", "notifications").wait_ready()
    requests = burst(app, patient, 6)
    newest = list(requests.values())[-1]
    killed = subprocess.run(  # noqa: S603
        [sys.executable, "-c", KILLED_TASK, newest, moment],
        env=process_env(settings),
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    assert routed_once(app, requests), "the batch did not commit before the kill"

    with app.app_context():
        app.extensions["celery"].control.add_consumer(
            "routing", destination=[node for node in revoked_on(app)], reply=True, timeout=5
        )
    redis = redis_server.client()
    wait_until(
        lambda: redis.llen("routing") == 0 and not redis.hlen("unacked"),
        30,
        message="the routing queue taken and done",
    )
    assert_routed_and_told_once(app, mailbox, requests)
    assert worker.process.poll() is None, worker.tail()


# --- 7. Two worker nodes


def listening(app, nodes: int) -> set[str]:
    """The worker nodes that answered a broadcast ping: they hear broadcasts (revokes)."""
    with app.app_context():
        replies = app.extensions["celery"].control.ping(timeout=2, limit=nodes) or []
    return {node for reply in replies for node in reply}


@pytest.mark.parametrize("backend", ["postgresql"])
def test_two_worker_nodes_both_drop_the_revoked_tasks_and_route_each_request_once(
    app, patient, celery_processes, settings, smtp_server, monkeypatch
):
    """Forty routing tasks reach the broker at once while two worker nodes (each with two
    pool processes) listen: their batches race. Every request is routed once and each team
    told once; both nodes hold the same revoked ids, exactly the tasks of requests routed in
    another task's batch (never a batch's own task, never one whose request some batch did
    not route).

    The nodes must hear broadcasts before the tasks go out: a revoke is a broadcast, and a
    node that subscribes after it (as one started later does, with mingle off) never holds
    it. That node would run such a task and find its request routed: harmless, but not what
    this test is about, so it waits for both nodes to answer a ping first."""
    _url, mailbox = smtp_server
    requests = submitted_unpublished(app, patient, 40, monkeypatch)
    tasks = routing_task_ids(app, requests.values())
    first = celery_processes(settings)
    second = celery_processes(settings)
    first.wait_ready(), second.wait_ready()
    wait_until(lambda: len(listening(app, 2)) == 2, 30, message="both nodes answer a ping")
    with app.app_context():
        outbox.sweep(db.session)  # the forty routing tasks, published at once
    assert_routed_and_told_once(app, mailbox, requests)

    batched = batched_in_log(first) | batched_in_log(second)
    expected = {tasks[requests[reference]] for reference in batched}
    assert batched, "nothing was routed in a batch"
    nodes = wait_until(
        lambda: (
            (found := revoked_on(app, 2))
            and len(found) == 2
            and all(ids >= expected for ids in found.values())
            and found
        ),
        20,
        message="both nodes flagged the revokes",
    )
    assert list(nodes.values()) == [expected, expected]


# --- 7b. A revoked id never strands a row that is open again


@pytest.mark.parametrize("backend", ["postgresql"])
def test_requests_a_restore_brought_back_after_their_revoke_are_routed_by_the_sweep(
    app, patient, celery_processes, settings, smtp_server, monkeypatch
):
    """A batch routed six requests and revoked the other five tasks; then the database failed
    over to a replica that had not seen that commit (or was restored from a backup taken
    before it), while the worker kept running. The five are back in ``received`` with their
    routing rows open. Before: the sweep republished them under the ids the worker had
    revoked, and the worker dropped them, for hours, until a new submission's batch happened
    to take them. Now a republish goes out under an id of its own, and they are routed."""
    _url, mailbox = smtp_server
    worker = celery_processes(settings).wait_ready()
    requests = submitted_unpublished(app, patient, 6, monkeypatch)
    with app.app_context():
        outbox.sweep(db.session)  # the six routing tasks at once: the first batches the rest
    assert_routed_and_told_once(app, mailbox, requests)
    stranded = batched_in_log(worker)
    assert stranded, "nothing was routed in a batch"
    tasks = routing_task_ids(app, requests.values())
    wanted = {tasks[requests[reference]] for reference in stranded}
    wait_until(
        lambda: any(wanted <= ids for ids in revoked_on(app).values()),
        20,
        message="the worker flagged the revokes",
    )

    with app.app_context():
        ids = [requests[reference] for reference in stranded]
        db.session.execute(sa.update(Request).where(Request.id.in_(ids)).values(status="received"))
        db.session.execute(
            sa.update(OutboxMessage)
            .where(OutboxMessage.request_id.in_(ids), OutboxMessage.task == ROUTE)
            .values(status="pending", done_at=None)
        )
        db.session.commit()
        assert outbox.sweep(db.session, republish_after=0) == len(ids)
    wait_until(
        lambda: set(statuses(app).values()) == {"queued"},
        30,
        message="the restored requests routed again",
        explain=lambda: f"{statuses(app)}\n{worker.tail()}",
    )


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_notice_whose_task_an_operator_revoked_is_sent_by_the_next_sweep(
    app, patient, celery_processes, settings, smtp_server, redis_server, monkeypatch
):
    """An operator revoked a team notice's task by hand (``celery control revoke``), or a
    stray script did. Before: every sweep republished the open row under that same id, every
    worker dropped it, and the team was never told. Now the republish has an id of its own:
    the notice goes out once."""
    _url, mailbox = smtp_server
    worker = celery_processes(settings).wait_ready()
    requests = submitted_unpublished(app, patient, 1, monkeypatch)
    (request_id,) = requests.values()
    publisher = app.extensions["intake.publisher"]
    app.extensions["intake.publisher"] = None
    try:
        run_task(app, request_id)  # routed here; its notice row waits unpublished
    finally:
        app.extensions["intake.publisher"] = publisher
    with app.app_context():
        row = db.session.execute(
            sa.select(OutboxMessage.id).where(
                OutboxMessage.request_id == request_id, OutboxMessage.task == "notify_team"
            )
        ).scalar_one()
        revoked = task_id("notify_team", request_id, row)
        app.extensions["celery"].control.revoke(revoked)
    wait_until(
        lambda: any(revoked in ids for ids in revoked_on(app).values()),
        20,
        message="the worker holds the operator's revoke",
    )
    with app.app_context():
        assert outbox.sweep(db.session) == 1  # the first publish: dropped, as the operator asked
    redis = redis_server.client()
    wait_until(
        lambda: redis.llen("notifications") == 0 and not redis.hlen("unacked"),
        30,
        message="the revoked notice taken off the queue",
    )
    assert e_mails_per_reference(mailbox) == Counter()
    with app.app_context():
        assert outbox.sweep(db.session, republish_after=0) == 1
    wait_until(
        lambda: e_mails_per_reference(mailbox) == Counter(requests.keys()),
        30,
        message="the team told, once",
        explain=worker.tail,
    )


# --- 8. PHI during a burst: Redis's traffic, its keys, the workers' logs


class Monitor:
    """Every command Redis runs, as its MONITOR reports it (raw bytes), until closed."""

    def __init__(self, redis_server) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", redis_server.port))
        self.sock.sendall(b"MONITOR\r\n")
        self.data = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                self.data += chunk

    def close(self) -> bytes:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.thread.join(5)
        return bytes(self.data)


def decoded(blob: bytes) -> list[bytes]:
    """``blob`` and what is encoded in it: MONITOR's escaped arguments, JSON, base64."""
    import base64
    import binascii
    import re

    found = [blob]
    for quoted in re.findall(rb'"((?:[^"\\]|\\.)*)"', blob):
        raw = quoted.decode("unicode_escape", "replace").encode("latin-1", "replace")
        found.append(raw)
        for candidate in re.findall(rb"[A-Za-z0-9+/=]{16,}", raw):
            with contextlib.suppress(binascii.Error, ValueError):
                found.append(base64.b64decode(candidate + b"=" * (-len(candidate) % 4)))
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            found.append(json.dumps(json.loads(raw)).encode())
    return found


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_burst_with_revokes_leaves_no_phi_in_redis_traffic_or_the_logs(
    app, patient, celery_processes, settings, smtp_server, redis_server
):
    """A burst of contact requests with distinctive PHI in every field, routed by a worker in
    batches that revoke each other's tasks. Everything Redis was told (every command, the
    revokes' pub/sub messages included, payloads decoded), everything left in it, and every
    line the worker and the app logged: no canary. The revokes did go out, and the worker's
    log does not repeat them or Celery's backend warnings at INFO."""
    _url, mailbox = smtp_server
    monitor = Monitor(redis_server)
    listener = redis_server.client().pubsub()
    listener.psubscribe("*pidbox*")
    references = [
        reference_from(patient.contact(topic="copay", **CONTACT_CANARIES)) for _ in range(12)
    ]
    worker = celery_processes(settings).wait_ready()
    assert_routed_and_told_once(app, mailbox, references)
    heard: list[str] = []
    wait_until(lambda: heard.extend(revokes_heard(listener)) or heard, 20, message="a revoke sent")
    worker.stop()
    traffic = monitor.close()
    assert b"PUBLISH" in traffic.upper() and b"LPUSH" in traffic.upper()

    blobs = decoded(traffic) + everything_in_redis(redis_server.client())
    # The scan reads inside the payloads: the tasks' bodies and the revokes' are decoded.
    assert any(b'"outbox_id"' in blob for blob in blobs)
    assert any(b'"revoke"' in blob and b"route_request-" in blob for blob in blobs)
    assert [needle for blob in blobs for needle in leaked(blob)] == []
    logs = worker.log_path.read_bytes()
    app_logs = b"".join(path.read_bytes() for path in settings.data_dir.rglob("*.log"))
    assert leaked(logs) == [] and leaked(app_logs) == []
    for line in (b"Failed to mark task", b"flagged as revoked", b"Discarding revoked task"):
        assert line not in logs and line not in app_logs, line
    assert all(task.startswith(f"{ROUTE}-") for task in heard)


# --- 9. A forged flood of revokes


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_flood_of_forged_revokes_keeps_the_revoked_set_capped_and_loses_no_request(
    app, patient, celery_processes, settings, smtp_server
):
    """Someone on the broker (or a careless caller) revokes 60,000 made-up routing task ids
    in one go, through the publisher. It returns at once; the worker keeps at most Celery's
    cap of revoked ids (memory), logs no line per id, and a burst submitted afterwards is
    routed once and each team told once."""
    _url, mailbox = smtp_server
    worker = celery_processes(settings).wait_ready()
    publisher = app.extensions["intake.publisher"]
    forged = [task_id(ROUTE, str(uuid.uuid4()), n) for n in range(60_000)]
    assert publisher.revoke(forged)
    wait_until(
        lambda: (nodes := revoked_on(app)) and all(len(ids) >= 40_000 for ids in nodes.values()),
        60,
        message="the flood flagged",
    )
    requests = burst(app, patient, 10)
    assert_routed_and_told_once(app, mailbox, requests)
    for ids in revoked_on(app).values():
        assert len(ids) <= 50_000
    assert worker.log_path.stat().st_size < 1_000_000
