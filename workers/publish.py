"""The one door from the domain to the task queue: publish an outbox row's task by name."""

from __future__ import annotations

from flask import Flask

from intake import outbox

TASK_PREFIX = "workers.tasks."


def init_publisher(flask_app: Flask) -> outbox.Publisher:
    """Create the Celery app for ``flask_app`` and let the outbox publish through it."""
    from workers.celery_app import celery_init_app

    celery = celery_init_app(flask_app)

    def publish(task: str, request_id: str, outbox_id: int) -> None:
        celery.send_task(
            TASK_PREFIX + task,
            args=[request_id],
            kwargs={"outbox_id": outbox_id},
            retry=False,
        )

    def broker_reachable() -> bool:
        try:
            with celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False
        return True

    flask_app.extensions["intake.broker_check"] = broker_reachable
    return publish
