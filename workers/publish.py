"""The one door from the domain to the task queue: publish an outbox row's task by name.

``create_app`` builds the publisher and hands it to :mod:`intake.requests.outbox`; the domain
never imports this package.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence

import structlog
from celery import Celery
from flask import Flask
from kombu.exceptions import OperationalError

from intake.ops import tracing
from intake.requests import outbox
from workers import redis_broker

log = structlog.get_logger(__name__)

TASK_PREFIX = "workers.tasks."
# After a failed publish, stop trying for this long: each attempt on a dead broker costs the
# patient seconds of connection retries, and the outbox sweep publishes the rows anyway.
COOL_OFF_SECONDS = 5.0
# Revokes waiting for the background sender, at most; more are dropped (they only save work).
REVOKE_BACKLOG = 64


def task_id(task: str, subject: str, outbox_id: int, attempt: int = 1) -> str:
    """The Celery id of an outbox row's task: fixed for the row's first publish, so that
    whoever closes the row can revoke what is still queued of it. Ids only, no PHI; the
    subject (a request or user id, random) keeps it unique across databases.

    A republish (``attempt`` 2 and on: the sweep sending a row that is still open) gets an
    id of its own, which no batch ever revokes. A revoked first id then never strands a row
    that is open again: one a database restore or failover brought back, or one whose id an
    operator revoked by hand. The sweep's next publish reaches a worker."""
    first = f"{task}-{outbox_id}-{subject}"
    return first if attempt <= 1 else f"{first}-{attempt}"


class BrokerUnavailable(OperationalError):
    """The broker failed recently; publishing is skipped until the cool-off ends."""


def init_publisher(flask_app: Flask) -> outbox.Publisher:
    """Create the Celery app for ``flask_app`` and let the outbox publish through it."""
    from workers.celery_app import celery_init_app

    publisher = CeleryPublisher(celery_init_app(flask_app))
    flask_app.extensions["intake.broker_check"] = publisher.broker_reachable
    return publisher


# Every publisher of this process, for the fork hook below.
_publishers: weakref.WeakSet[CeleryPublisher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A fork copies a lock as it is: held, if another thread (the revoke sender) held it at
    that moment, and that thread does not exist in the child to let it go. The child starts
    each publisher's lock and revoke queue afresh, or its first publish failure or revoke
    would wait forever."""
    for publisher in list(_publishers):
        publisher._lock = threading.Lock()
        publisher._pending, publisher._sender, publisher._sender_pid = [], None, os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


class CeleryPublisher:
    """Sends outbox rows' tasks through Celery, one by one or in a batch."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery
        _publishers.add(self)
        self._lock = threading.Lock()
        self._broken_until = 0.0
        self._local = threading.local()
        # Revokes go over Redis's pub/sub; the embedded broker would write a file for each
        # worker that ever listened, alive or not, and its workers poll for them anyway.
        scheme = str(celery.conf.broker_url or "").partition("://")[0]
        self.revokes = scheme in redis_broker.SCHEMES
        self._pending: list[list[str]] = []  # revokes waiting for the sender thread
        self._sender: threading.Thread | None = None
        self._sender_pid = 0

    def __call__(self, task: str, request_id: str, outbox_id: int, attempt: int = 1) -> None:
        if time.monotonic() < self._broken_until:
            raise BrokerUnavailable("broker failed recently")
        try:
            self.celery.send_task(
                TASK_PREFIX + task,
                args=[request_id],
                kwargs={"outbox_id": outbox_id},
                task_id=task_id(task, request_id, outbox_id, attempt),
                headers=tracing.task_headers(),
                retry=False,
                producer=getattr(self._local, "producer", None),
            )
        except Exception:
            self._broke()
            raise

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Send the tasks published in the block together, in one round trip to Redis, when
        the block ends. Raises then if the broker failed; which of them reached it is not
        known, so the caller treats them all as unpublished (workers are idempotent). An error
        of the block itself discards what it buffered and is no broker failure: no cool-off
        (a failed publish in it has started one already)."""
        raised_inside = False
        try:
            with self.celery.producer_or_acquire() as producer, producer.batch():
                self._local.producer = producer
                try:
                    yield
                except BaseException:
                    raised_inside = True
                    raise
                finally:
                    self._local.producer = None
        except Exception:
            if not raised_inside:
                self._broke()
            raise

    def revoke(self, task_ids: Sequence[str]) -> bool:
        """Ask every worker to drop these tasks unrun if they are still queued; return whether
        the request was taken.

        For tasks that can only find their work done (a routing batch routed their requests):
        each still costs a delivery, a pool round trip and a read, and after a burst they are
        most of the routing queue. A worker drops a revoked task when it receives it, before
        any of that. Best effort: sent from a background thread, never waited on, because
        kombu retries a control message without end while the broker is down. What is not
        sent (broker down, backlog full, embedded broker) only means those tasks run and stop
        at their first read, as they would without it."""
        if not self.revokes or not task_ids or time.monotonic() < self._broken_until:
            return False
        with self._lock:
            if self._sender_pid != os.getpid():  # a thread does not survive a fork
                self._pending, self._sender, self._sender_pid = [], None, os.getpid()
            if len(self._pending) >= REVOKE_BACKLOG:
                return False
            self._pending.append(list(task_ids))
            if self._sender is None:
                sender = threading.Thread(
                    target=self._send_revokes, name="intake-revoke", daemon=True
                )
                try:
                    sender.start()  # it waits for the lock, then finds what was just added
                except RuntimeError:  # the process's thread limit: those tasks just run
                    self._pending = []
                    return False
                self._sender = sender
        return True

    def _send_revokes(self) -> None:
        """Send what is pending, in one message each time, then end: the thread lives only
        while there is something to send (or the broker is down and it waits for it)."""
        while True:
            with self._lock:
                if not self._pending:
                    self._sender = None
                    return
                ids = [task for batch in self._pending for task in batch]
                self._pending = []
            try:
                self.celery.control.revoke(ids)
            except Exception as error:  # noqa: BLE001 - they only save work; the tasks still run
                log.info("revoke_not_sent", tasks=len(ids), error=type(error).__name__)

    def close(self, timeout: float = 5.0) -> None:
        """Give the revokes still to be sent up to ``timeout`` seconds, as a process ends."""
        sender = self._sender
        if sender is not None and self._sender_pid == os.getpid():
            sender.join(timeout)

    def _broke(self) -> None:
        with self._lock:
            self._broken_until = time.monotonic() + COOL_OFF_SECONDS

    def broker_reachable(self) -> bool:
        try:
            with self.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False
        return True
