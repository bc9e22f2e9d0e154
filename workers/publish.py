"""The one door from the domain to the task queue: publish an outbox row's task by name.

``create_app`` builds the publisher and hands it to :mod:`intake.requests.outbox`; the domain
never imports this package.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from celery import Celery
from flask import Flask
from kombu.exceptions import OperationalError

from intake.ops import tracing
from intake.requests import outbox

TASK_PREFIX = "workers.tasks."
# After a failed publish, stop trying for this long: each attempt on a dead broker costs the
# patient seconds of connection retries, and the outbox sweep publishes the rows anyway.
COOL_OFF_SECONDS = 5.0


class BrokerUnavailable(OperationalError):
    """The broker failed recently; publishing is skipped until the cool-off ends."""


def init_publisher(flask_app: Flask) -> outbox.Publisher:
    """Create the Celery app for ``flask_app`` and let the outbox publish through it."""
    from workers.celery_app import celery_init_app

    publisher = CeleryPublisher(celery_init_app(flask_app))
    flask_app.extensions["intake.broker_check"] = publisher.broker_reachable
    return publisher


class CeleryPublisher:
    """Sends outbox rows' tasks through Celery, one by one or in a batch."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery
        self._lock = threading.Lock()
        self._broken_until = 0.0
        self._local = threading.local()

    def __call__(self, task: str, request_id: str, outbox_id: int) -> None:
        if time.monotonic() < self._broken_until:
            raise BrokerUnavailable("broker failed recently")
        try:
            self.celery.send_task(
                TASK_PREFIX + task,
                args=[request_id],
                kwargs={"outbox_id": outbox_id},
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
