"""The one door from the domain to the task queue: publish an outbox row's task by name.

``create_app`` builds the publisher and hands it to :mod:`intake.requests.outbox`; the domain
never imports this package.
"""

from __future__ import annotations

import threading
import time

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

    celery = celery_init_app(flask_app)

    lock = threading.Lock()
    broken_until = [0.0]

    def publish(task: str, request_id: str, outbox_id: int) -> None:
        if time.monotonic() < broken_until[0]:
            raise BrokerUnavailable("broker failed recently")
        try:
            celery.send_task(
                TASK_PREFIX + task,
                args=[request_id],
                kwargs={"outbox_id": outbox_id},
                headers=tracing.task_headers(),
                retry=False,
            )
        except Exception:
            with lock:
                broken_until[0] = time.monotonic() + COOL_OFF_SECONDS
            raise

    def broker_reachable() -> bool:
        try:
            with celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False
        return True

    flask_app.extensions["intake.broker_check"] = broker_reachable
    return publish
