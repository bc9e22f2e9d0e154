"""Attacks on batched publishing (workers.publish.CeleryPublisher.batch, outbox._send): a real
redis-server that takes a routing batch's pipeline only in part, dies between buffering and the
flush, or stops answering mid-flush; PHI in what a batch leaves in Redis; the batch's
thread-local producer leaking into later or concurrent single publishes; the caller's own error
inside a batch.

What a user would notice is asserted: a team notice lost or e-mailed twice, a row counted as
published that is not in Redis, a patient's request not queued once the broker is back, a
request not routed, an exception out of the routing task.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request
from intake.ops import tracing
from tests.conftest import Patient, reference_from
from tests.workers.conftest import email_routing_file, wait_until
from tests.workers.test_batch_publish import notice_rows
from tests.workers.test_batch_routing import submitted

COUNT = 8


# --- a cutting proxy: a real redis-server behind a TCP hop that can drop a client mid-pipeline


class HoldingProxy:
    """Forwards TCP to a real redis-server. Armed with ``after(k, action)``, it forwards the next
    ``k`` LPUSH commands a client sends, waits until Redis has executed them, and runs
    ``action`` before the next one: making Redis refuse the rest, or dropping the connection
    (``CUT``: the rest never reaches Redis, the client hears the connection close)."""

    CUT = "cut"

    def __init__(self, upstream_port: int, executed: Callable[[], int]) -> None:
        self.upstream_port = upstream_port
        self.executed = executed  # how many LPUSHes Redis has executed (read directly)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._armed: tuple[int, int, Callable[[], None] | str] | None = None
        self.fired = 0
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def after(self, keep: int, action: Callable[[], None] | str) -> None:
        self._armed = (keep, self.executed() + keep, action)

    def close(self) -> None:
        self._closed = True
        for sock in [self.listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
            threading.Thread(target=self._commands, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _commands(self, client: socket.socket, upstream: socket.socket) -> None:
        buffer = b""
        pushed = 0
        try:
            while data := client.recv(65536):
                buffer += data
                while (end := _resp_command_end(buffer)) is not None:
                    command, buffer = buffer[:end], buffer[end:]
                    armed = self._armed
                    if armed is not None and b"\r\nLPUSH\r\n" in command[:32].upper():
                        keep, executed, action = armed
                        if pushed == keep:
                            wait_until(lambda n=executed: self.executed() >= n, 5, 0.01)
                            self._armed = None
                            self.fired += 1
                            if action == self.CUT:
                                raise ConnectionAbortedError
                            assert callable(action)
                            action()
                        pushed += 1
                    upstream.sendall(command)
        except OSError:
            pass
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _resp_command_end(buffer: bytes) -> int | None:
    """Where the first complete RESP command (an array of bulk strings) in ``buffer`` ends."""
    line = buffer.find(b"\r\n")
    if line < 0:
        return None
    if not buffer.startswith(b"*"):  # an inline command
        return line + 2
    position = line + 2
    for _ in range(int(buffer[1:line])):
        header = buffer.find(b"\r\n", position)
        if header < 0:
            return None
        length = int(buffer[position + 1 : header])
        position = header + 2 + length + 2
        if position > len(buffer):
            return None
    return position


# --- fixtures


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server, smtp_server, request):
    """E-mail to every team through a real SMTP server; Redis direct, or through the holding
    proxy for a test that asks for ``proxy``."""
    smtp_url, _mailbox = smtp_server
    redis_url = request.getfixturevalue("proxy").url if "proxy" in request.fixturenames else None
    return base_settings.replace(
        database_url=database_url,
        data_dir=tmp_path / "data",
        redis_url=redis_url or redis_server.url,
        smtp_url=smtp_url,
        routing_file=email_routing_file(tmp_path),
    )


@pytest.fixture
def proxy(redis_server) -> Iterator[HoldingProxy]:
    direct = redis_server.client()
    cutting = HoldingProxy(redis_server.port, lambda: int(direct.llen("notifications")))
    yield cutting
    cutting.close()
    direct.close()


@pytest.fixture
def quick_cool_off(monkeypatch):
    """The publisher's cool-off after a failure, short enough to wait out in a test."""
    import workers.publish

    monkeypatch.setattr(workers.publish, "COOL_OFF_SECONDS", 1.0)
    return 1.0


class Interposed:
    """The app's own publisher, with ``hook(n)`` called right after the n-th message of the
    first batch was buffered (from the thread publishing): a way to act between buffering and
    the flush."""

    def __init__(self, inner: Any, hook: Callable[[int], None]) -> None:
        self.inner, self.hook = inner, hook
        self.batches = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        first, self.batches = not self.batches, self.batches + 1
        with self.inner.batch():
            self._local.count = 0 if first else None  # the first batch only
            try:
                yield
            finally:
                self._local.count = None

    def __call__(self, task: str, subject: str, outbox_id: int, attempt: int) -> None:
        self.inner(task, subject, outbox_id, attempt)
        count = getattr(self._local, "count", None)
        if count is not None:
            self._local.count = count + 1
            self.hook(count + 1)


def interpose(app, monkeypatch, hook: Callable[[int], None]) -> Interposed:
    wrapper = Interposed(app.extensions["intake.publisher"], hook)
    monkeypatch.setitem(app.extensions, "intake.publisher", wrapper)
    return wrapper


# --- what is in Redis, in the database, in the mailbox


def decode(raw: bytes) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]:
    message = json.loads(raw)
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return message["headers"]["task"], args, kwargs, message["headers"]


def queued(redis, queue: str = "notifications") -> list[tuple[str, list[Any], dict[str, Any]]]:
    """The messages waiting in ``queue``, oldest first: (task, args, kwargs)."""
    return [decode(raw)[:3] for raw in reversed(redis.lrange(queue, 0, -1))]


def notice_counts(redis) -> Counter[str]:
    """How many notify_team messages wait for each request."""
    found = queued(redis)
    assert {task for task, _args, _kwargs in found} <= {"workers.tasks.notify_team"}
    return Counter(args[0] for _task, args, _kwargs in found)


def statuses(app) -> dict[str, str]:
    with app.app_context():
        return dict(db.session.execute(sa.select(Request.id, Request.status)).all())


def deliver_everything_queued_twice(app, redis) -> None:
    """Run every queued notification, in order, then all of them again: a worker taking each
    message Redis holds (duplicates included), and then a redelivery of each."""
    from workers import tasks

    messages = queued(redis)
    redis.delete("notifications")
    with app.app_context():
        for _ in range(2):
            for task, args, kwargs in messages:
                getattr(tasks, task.rsplit(".", 1)[1]).apply(args=args, kwargs=kwargs)


def e_mails_per_reference(mailbox) -> Counter[str]:
    return Counter(message["Subject"].split(" ")[2] for message in mailbox.messages)


def routed_batch(app, patient, redis) -> list[tuple[str, str, str]]:
    """``COUNT`` requests waiting, the routing queue emptied (its tasks are run by hand), and
    the task's producer warmed up by routing a first batch whose notices are then cleared."""
    from workers.tasks import route_request

    first = submitted(app, patient, COUNT)
    with app.app_context():
        route_request.run(first[-1][1])
        db.session.execute(sa.update(OutboxMessage).values(status="done"))
        db.session.commit()
    requests = submitted(app, patient, COUNT)
    redis.delete("notifications", "routing")
    return requests


def route(app, requests) -> None:
    """The routing task of the newest request, as a worker runs it: it must not raise."""
    from workers.tasks import route_request

    with app.app_context():
        route_request.run(requests[-1][1])


def sweep(app) -> int:
    from workers.tasks import sweep_outbox

    with app.app_context():
        return int(sweep_outbox.run())


def assert_each_team_e_mailed_once(app, redis, mailbox, requests) -> None:
    """After the sweep: every request has a notice queued; delivering all of them twice sends
    each team one e-mail per request and closes every row."""
    ids = {request_id for _ref, request_id, _trace in requests}
    assert set(notice_counts(redis)) == ids, "a request without a queued notice"
    deliver_everything_queued_twice(app, redis)
    mails = e_mails_per_reference(mailbox)
    assert {ref: mails[ref] for ref, _id, _t in requests} == {ref: 1 for ref, _i, _t in requests}
    assert len(mailbox.messages) == len(requests)
    with app.app_context():
        sent = Counter(
            db.session.execute(
                sa.select(AuditEvent.reference).where(AuditEvent.action == "notification.sent")
            ).scalars()
        )
    assert {ref: sent[ref] for ref, _id, _t in requests} == {ref: 1 for ref, _i, _t in requests}
    rows = notice_rows(app)
    assert {request_id: rows[request_id] for request_id in ids} == {
        request_id: ("done", True) for request_id in ids
    }


# --- 1. Redis takes a pipeline only in part


@pytest.mark.usefixtures("quick_cool_off")
def test_a_pipeline_redis_runs_in_part_then_refuses_out_of_memory_loses_no_notice_nor_sends_two(
    app, patient, redis_server, proxy, smtp_server
):
    """Redis runs the first three LPUSHes of the pipeline, then runs out of memory and refuses
    the other five (OOM replies, the connection stays up). (The proxy holds the pipeline after
    three, until Redis has run them and maxmemory is lowered: Redis itself refuses the rest.)
    The routing task returns; no row counts as published (a published row whose message Redis
    refused would wait for the republish delay); the sweep publishes them all, and the three
    notices Redis then holds twice are e-mailed once each."""
    _url, mailbox = smtp_server
    redis = redis_server.client()
    redis.config_set("maxmemory-policy", "noeviction")
    requests = routed_batch(app, patient, redis)
    mailbox.messages.clear()

    proxy.after(3, lambda: redis.config_set("maxmemory", "1"))
    try:
        route(app, requests)  # must not raise
    finally:
        redis.config_set("maxmemory", "0")
    assert proxy.fired == 1
    assert redis.info("errorstats")["errorstat_OOM"]["count"] == COUNT - 3
    held = set(notice_counts(redis))
    assert len(held) == 3
    assert set(statuses(app)[rid] for _r, rid, _t in requests) == {"queued"}
    rows = notice_rows(app)
    assert {rid: rows[rid] for _r, rid, _t in requests} == {
        rid: ("pending", False) for _r, rid, _t in requests
    }, "a notice counted as published though its batch failed"

    time.sleep(1.1)  # the cool-off
    assert sweep(app) == COUNT
    assert notice_counts(redis) == Counter(
        {rid: 2 if rid in held else 1 for _r, rid, _t in requests}
    )
    assert_each_team_e_mailed_once(app, redis, mailbox, requests)


@pytest.mark.usefixtures("quick_cool_off")
def test_a_connection_dropped_mid_pipeline_loses_no_notice_and_sends_one_each(
    app, patient, redis_server, proxy, smtp_server
):
    """The connection to Redis drops after three LPUSHes of the pipeline reached it (a proxy,
    a failover): three notices are queued, the client hears only a closed connection. The
    routing still commits and the task returns; the sweep publishes the rest once the cool-off
    ends, through a fresh connection, and nobody is e-mailed twice."""
    _url, mailbox = smtp_server
    redis = redis_server.client()
    requests = routed_batch(app, patient, redis)
    mailbox.messages.clear()

    proxy.after(3, proxy.CUT)
    route(app, requests)
    assert proxy.fired == 1
    assert len(notice_counts(redis)) == 3
    assert set(statuses(app)[rid] for _r, rid, _t in requests) == {"queued"}
    rows = notice_rows(app)
    assert {rid: rows[rid] for _r, rid, _t in requests} == {
        rid: ("pending", False) for _r, rid, _t in requests
    }

    time.sleep(1.1)
    assert sweep(app) == COUNT
    assert sum(notice_counts(redis).values()) == COUNT + 3
    assert_each_team_e_mailed_once(app, redis, mailbox, requests)


# --- 2. Redis dies between buffering and the flush; 2b. Redis freezes during the flush


@pytest.mark.usefixtures("quick_cool_off")
def test_redis_killed_before_the_flush_then_restarted_gets_every_notice_once_from_the_sweep(
    app, patient, redis_server, smtp_server, monkeypatch
):
    """redis-server SIGKILLed with every notice of the batch buffered and none sent: the flush
    fails fast, the task returns, every request is routed and no notice counts as published.
    Redis restarts empty on the same port; the sweep publishes each notice exactly once."""
    _url, mailbox = smtp_server
    redis = redis_server.client()
    requests = routed_batch(app, patient, redis)
    mailbox.messages.clear()

    def kill_after_the_last(count: int) -> None:
        if count == COUNT:  # every notice buffered, none sent yet
            assert redis_server.process is not None
            redis_server.process.send_signal(signal.SIGKILL)
            redis_server.process.wait(10)
            redis_server.process = None

    interpose(app, monkeypatch, kill_after_the_last)
    started = time.monotonic()
    route(app, requests)
    assert time.monotonic() - started < 30, "the routing task hung on a dead Redis"
    assert redis_server.process is None, "the batch never reached its last notice"
    assert set(statuses(app)[rid] for _r, rid, _t in requests) == {"queued"}
    rows = notice_rows(app)
    assert {rid: rows[rid] for _r, rid, _t in requests} == {
        rid: ("pending", False) for _r, rid, _t in requests
    }

    redis_server.start()  # same port, empty (no persistence)
    redis = redis_server.client()
    time.sleep(1.1)
    assert sweep(app) == COUNT
    assert notice_counts(redis) == Counter({rid: 1 for _r, rid, _t in requests})
    assert_each_team_e_mailed_once(app, redis, mailbox, requests)


@pytest.mark.usefixtures("quick_cool_off")
def test_redis_frozen_during_the_flush_delivers_late_and_still_e_mails_each_team_once(
    app, patient, redis_server, smtp_server, monkeypatch
):
    """Redis stops (SIGSTOP) with the pipeline in its socket: the client times out after
    socket_timeout (5 s) and counts nothing as published, then Redis wakes and runs every
    LPUSH. Delivery was uncertain, so the sweep publishes them all again: each twice in the
    queue, each e-mailed once; and the connection that timed out, with its replies still due,
    is never reused (a later publish would read a stale reply)."""
    _url, mailbox = smtp_server
    redis = redis_server.client()
    requests = routed_batch(app, patient, redis)
    mailbox.messages.clear()
    assert redis_server.process is not None
    pid = redis_server.process.pid

    def freeze_after_the_last(count: int) -> None:
        if count == COUNT:
            os.kill(pid, signal.SIGSTOP)
            # Well past the client's 5 s socket timeout, also on a loaded machine.
            threading.Timer(9.0, os.kill, (pid, signal.SIGCONT)).start()

    interpose(app, monkeypatch, freeze_after_the_last)
    try:
        route(app, requests)
    finally:
        wait_until(lambda: redis.ping(), 15, 0.1, "Redis to wake")
    assert notice_counts(redis) == Counter({rid: 1 for _r, rid, _t in requests})
    rows = notice_rows(app)
    assert {rid: rows[rid] for _r, rid, _t in requests} == {
        rid: ("pending", False) for _r, rid, _t in requests
    }

    time.sleep(1.1)
    assert sweep(app) == COUNT
    assert notice_counts(redis) == Counter({rid: 2 for _r, rid, _t in requests})
    # A single publish afterwards (a patient's submission) lands, and is read back intact.
    reference = reference_from(patient.contact(topic="copay"))
    ((task, args, _kwargs),) = queued(redis, "routing")
    assert task == "workers.tasks.route_request"
    assert statuses(app)[args[0]] == "received"
    with app.app_context():
        assert (
            db.session.execute(
                sa.select(Request.reference).where(Request.id == args[0])
            ).scalar_one()
            == reference
        )
    assert_each_team_e_mailed_once(app, redis, mailbox, requests)


# --- 3. PHI never reaches Redis


PHI = {
    "first_name": "Quintessa",
    "last_name": "Vorhees-Plum",
    "date_of_birth": "1971-02-03",
    "phone": "(303) 555-0187",
    "email": "quintessa.plum@example.org",
    "message": "My Zyloprim prescription ran out",
    "callback_time": "after 4 pm Tuesdays",
}
NEEDLES = (
    "quintessa",
    "vorhees",
    "1971-02-03",
    "02/03/1971",
    "19710203",
    "555-0187",
    "3035550187",
    "zyloprim",
    "tuesdays",
)


def everything_in_redis(redis) -> list[bytes]:
    """Every key and value in Redis, with every base64 or JSON payload in them decoded too."""
    blobs: list[bytes] = []
    for key in redis.scan_iter("*"):
        blobs.append(key)
        kind = redis.type(key)
        if kind == b"string":
            blobs.append(redis.get(key))
        elif kind == b"list":
            blobs += redis.lrange(key, 0, -1)
        elif kind == b"set":
            blobs += redis.smembers(key)
        elif kind == b"hash":
            for field, value in redis.hgetall(key).items():
                blobs += [field, value]
        elif kind == b"zset":
            blobs += [member for member, _score in redis.zrange(key, 0, -1, withscores=True)]
        else:
            raise AssertionError(f"unexpected Redis type {kind!r} at {key!r}")
    found: list[bytes] = []

    def walk(value: Any) -> None:
        if isinstance(value, bytes | str):
            raw = value.encode() if isinstance(value, str) else value
            found.append(raw)
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                walk(json.loads(raw))
                return
            with contextlib.suppress(binascii.Error, ValueError):
                if len(raw) >= 16:
                    decoded = base64.b64decode(raw, validate=True)
                    if decoded != raw:
                        walk(decoded)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(str(key))
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif value is not None:
            found.append(str(value).encode())

    for blob in blobs:
        walk(blob)
    return found


def test_a_batch_leaves_no_phi_anywhere_in_redis_only_ids_and_traces(app, redis_server):
    """Patients with a distinctive name, birth date, phone, e-mail and message; their
    submissions and a routing batch publish; then every key and value in Redis (queues, kombu's
    bindings, unacked) is read, payloads decoded: none of it is PHI; every message carries a
    request id and an outbox id only, and a trace id as a header."""
    from workers.tasks import route_request

    redis = redis_server.client()
    patient = Patient(app.test_client())
    responses = [patient.contact(topic="copay", **PHI) for _ in range(COUNT)]
    references = [reference_from(response) for response in responses]
    traces = [response.headers[tracing.RESPONSE_HEADER] for response in responses]
    with app.app_context():
        ids = dict(db.session.execute(sa.select(Request.reference, Request.id)).all())
    routing_messages = [decode(raw) for raw in redis.lrange("routing", 0, -1)]
    with app.app_context(), tracing.bound(traces[-1]):  # as the worker binds its header
        route_request.run(ids[references[-1]])
    notices = [decode(raw) for raw in redis.lrange("notifications", 0, -1)]
    assert len(notices) == COUNT and len(routing_messages) == COUNT

    texts = b"\n".join(everything_in_redis(redis)).lower()
    leaked = [needle for needle in NEEDLES if needle.encode() in texts]
    assert leaked == [], f"PHI in Redis: {leaked}"
    with app.app_context():
        rows = {
            row.id: (row.request_id, row.task)
            for row in db.session.execute(sa.select(OutboxMessage)).scalars()
        }
    for task, args, kwargs, headers in routing_messages + notices:
        assert args == [rows[kwargs["outbox_id"]][0]] and list(kwargs) == ["outbox_id"]
        assert rows[kwargs["outbox_id"]][1] == task.rsplit(".", 1)[1]
        assert len(headers[tracing.HEADER]) == 32
        assert headers["argsrepr"] == repr(args) and headers["kwargsrepr"] == repr(kwargs)
    assert {args[0] for _t, args, _k, _h in notices} == set(ids.values())


# --- 4. The batch's producer does not leak


@pytest.mark.usefixtures("quick_cool_off")
def test_after_a_failed_batch_a_patient_submission_is_queued_once_the_cool_off_ends(
    app, patient, redis_server, monkeypatch
):
    """A batch fails at its flush (Redis killed), Redis comes back. A patient who submits
    during the cool-off still gets the thanks page and the sweep queues their request; one who
    submits after it has their request queued at once, through a working producer (not the
    failed batch's), and exactly once."""
    redis = redis_server.client()
    requests = routed_batch(app, patient, redis)

    def kill_after_the_last(count: int) -> None:
        if count == COUNT:
            assert redis_server.process is not None
            redis_server.process.send_signal(signal.SIGKILL)
            redis_server.process.wait(10)
            redis_server.process = None

    wrapper = interpose(app, monkeypatch, kill_after_the_last)
    route(app, requests)
    redis_server.start()
    redis = redis_server.client()
    publisher = wrapper.inner
    assert getattr(publisher._local, "producer", None) is None  # noqa: SLF001

    during = reference_from(patient.contact(topic="copay"))
    assert queued(redis, "routing") == []
    time.sleep(1.1)
    after = reference_from(patient.contact(topic="copay"))
    with app.app_context():
        ids = dict(db.session.execute(sa.select(Request.reference, Request.id)).all())
        published = dict(
            db.session.execute(
                sa.select(OutboxMessage.request_id, OutboxMessage.published_at).where(
                    OutboxMessage.task == "route_request",
                    OutboxMessage.request_id.in_([ids[during], ids[after]]),
                )
            ).all()
        )
    assert [args[0] for _t, args, _k in queued(redis, "routing")] == [ids[after]]
    assert published[ids[during]] is None and published[ids[after]] is not None

    assert sweep(app) == COUNT + 1  # the notices, and the submission made during the cool-off
    assert Counter(args[0] for _t, args, _k in queued(redis, "routing")) == Counter(
        {ids[during]: 1, ids[after]: 1}
    )
    assert notice_counts(redis) == Counter({rid: 1 for _r, rid, _t in requests})


def test_a_single_publish_beside_a_batch_in_another_thread_goes_out_at_once_and_alone(
    app, patient, redis_server, monkeypatch
):
    """A worker thread holds a batch open (one notice buffered, paused before the next) while
    a web thread publishes a patient's submission: that message reaches Redis at once, through
    its own producer, not buffered in (or flushing) the batch; the batch then sends all its
    notices, once each."""
    from workers.tasks import route_request

    redis = redis_server.client()
    requests = routed_batch(app, patient, redis)
    paused, resume = threading.Event(), threading.Event()
    batch_thread: list[threading.Thread] = []

    def pause_after_the_first(count: int) -> None:
        if count == 1 and threading.current_thread() is batch_thread[0]:
            paused.set()
            assert resume.wait(15)

    interpose(app, monkeypatch, pause_after_the_first)
    # Which producer each publish was handed: the batch's own, or none (one from the pool).
    celery = app.extensions["celery"]
    send_task = celery.send_task
    handed: list[tuple[threading.Thread, str, Any]] = []

    def recording_send_task(name: str, *args: Any, **kwargs: Any) -> Any:
        handed.append((threading.current_thread(), name, kwargs.get("producer")))
        return send_task(name, *args, **kwargs)

    monkeypatch.setattr(celery, "send_task", recording_send_task)
    errors: list[BaseException] = []

    def run_batch() -> None:
        try:
            with app.app_context():
                route_request.run(requests[-1][1])
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)
            paused.set()

    batch_thread.append(threading.Thread(target=run_batch))
    batch_thread[0].start()
    try:
        assert paused.wait(15) and not errors, errors
        web = Patient(app.test_client())
        done: list[str] = []
        web_thread = threading.Thread(target=lambda: done.append(web.contact(topic="copay")))
        web_thread.start()
        web_thread.join(15)
        assert done, "the web thread hung beside the batch"
        reference = reference_from(done[0])
        # The web thread's message is in Redis now; the batch's buffered notice is not.
        assert [task for task, _a, _k in queued(redis, "routing")] == [
            "workers.tasks.route_request"
        ]
        assert redis.llen("notifications") == 0, "the single publish flushed the batch"
    finally:
        resume.set()
        batch_thread[0].join(15)
    assert not errors, errors
    assert notice_counts(redis) == Counter({rid: 1 for _r, rid, _t in requests})
    with app.app_context():
        own = db.session.execute(
            sa.select(Request.id).where(Request.reference == reference)
        ).scalar_one()
    assert [args[0] for _t, args, _k in queued(redis, "routing")] == [own]
    assert notice_rows(app)[requests[0][1]] == ("pending", True)
    # The web thread was handed no producer (it took its own); the batch's notices all went
    # through one producer, the batch's.
    web_sends = [producer for thread, _n, producer in handed if thread is not batch_thread[0]]
    batch_sends = [producer for thread, _n, producer in handed if thread is batch_thread[0]]
    assert web_sends == [None]
    assert len(batch_sends) == COUNT and batch_sends[0] is not None
    assert all(producer is batch_sends[0] for producer in batch_sends)


# --- 5. The caller's own error inside a batch


def caller_fails_inside_a_batch(app, requests) -> None:
    """Publish two notices in a batch, then raise from the caller's own code in the block."""
    publisher = app.extensions["intake.publisher"]
    with app.app_context():
        rows = dict(
            db.session.execute(
                sa.select(OutboxMessage.request_id, OutboxMessage.id).where(
                    OutboxMessage.task == "notify_team"
                )
            ).all()
        )
    with pytest.raises(LookupError), publisher.batch():
        for _ref, request_id, _trace in requests[:2]:
            publisher("notify_team", request_id, rows[request_id])
        raise LookupError("the caller's own bug")


@pytest.mark.usefixtures("quick_cool_off")
def test_a_callers_error_inside_a_batch_sends_nothing_and_leaves_no_producer_behind(
    app, patient, redis_server
):
    """The caller's exception propagates; what was buffered is discarded, not half sent (the
    caller cannot know what to mark published); and the same thread's next single publish (a
    patient's submission) is not sent into the dead batch's producer: it reaches Redis."""
    redis = redis_server.client()
    requests = routed_batch(app, patient, redis)
    route(app, requests)
    redis.delete("notifications", "routing")

    caller_fails_inside_a_batch(app, requests)
    assert redis.llen("notifications") == 0
    publisher = app.extensions["intake.publisher"]
    assert getattr(publisher._local, "producer", None) is None  # noqa: SLF001
    time.sleep(1.1)  # past any cool-off: this test is about the producer left behind
    reference = reference_from(patient.contact(topic="copay"))  # in this same thread
    ((task, args, _kwargs),) = queued(redis, "routing")
    assert task == "workers.tasks.route_request"
    with app.app_context():
        assert db.session.get(Request, args[0]).reference == reference


def test_a_callers_error_inside_a_batch_does_not_hold_back_the_next_patient(
    app, patient, redis_server
):
    """Redis is fine; the caller's code inside a batch raised. A patient who submits right
    after must have their request queued at once, not left to the next sweep."""
    redis = redis_server.client()
    requests = routed_batch(app, patient, redis)
    route(app, requests)
    redis.delete("notifications", "routing")

    caller_fails_inside_a_batch(app, requests)
    reference_from(patient.contact(topic="copay"))
    assert len(queued(redis, "routing")) == 1, "the submission waits for the sweep"


def test_a_sweep_batch_mixing_queues_that_redis_refuses_counts_none_published(
    app, patient, redis_server, monkeypatch
):
    """The sweep's own batch (routing and notice rows together, two queues in one pipeline)
    refused by Redis: nothing counted as published; the next sweep publishes each once."""
    import workers.publish

    monkeypatch.setattr(workers.publish, "COOL_OFF_SECONDS", 0.0)
    redis = redis_server.client()
    requests = routed_batch(app, patient, redis)
    route(app, requests)
    with app.app_context():
        db.session.execute(sa.update(OutboxMessage).values(published_at=None))
        db.session.execute(
            sa.update(OutboxMessage)
            .where(OutboxMessage.request_id.in_([rid for _r, rid, _t in requests]))
            .values(status="pending")
        )
        db.session.commit()
    redis.delete("notifications", "routing")
    redis.config_set("maxmemory-policy", "noeviction")
    redis.config_set("maxmemory", "1")
    try:
        assert sweep(app) == 0
    finally:
        redis.config_set("maxmemory", "0")
    with app.app_context():
        unpublished = db.session.execute(
            sa.select(sa.func.count()).where(
                OutboxMessage.status == "pending", OutboxMessage.published_at.is_not(None)
            )
        ).scalar_one()
    assert unpublished == 0, "a row counted as published though Redis refused the batch"
    assert sweep(app) == 2 * COUNT
    assert notice_counts(redis) == Counter({rid: 1 for _r, rid, _t in requests})
    assert Counter(args[0] for _t, args, _k in queued(redis, "routing")) == Counter(
        {rid: 1 for _r, rid, _t in requests}
    )
