"""Build the Celery app for a Flask app: tasks run in its app context, JSON only.

Broker: ``INTAKE_REDIS_URL`` when set, through kombu's Redis transport mended so that a worker
that loses Redis reconnects (workers.redis_broker); otherwise a folder in the data folder, read
and written through kombu's filesystem transport with whole-file writes
(workers.embedded_broker), so a real worker process consumes real messages with no server
installed.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import (
    beat_init,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)
from flask import Flask
from kombu import Queue

from intake.ops.transport import redis_ssl_options
from workers import embedded_broker, redis_broker

embedded_broker.register()
redis_broker.register()

ROUTING_QUEUE = "routing"
NOTIFICATIONS_QUEUE = "notifications"


def broker_settings(flask_app: Flask) -> dict[str, Any]:
    settings = flask_app.extensions["intake.settings"]
    if settings.redis_url:
        return {
            "broker_url": settings.redis_url,
            # rediss://: verify Redis's certificate and name (kombu's default checks nothing).
            "broker_use_ssl": redis_ssl_options(settings) or None,
            "broker_transport_options": {
                # A task taken by a worker that died is handed out again after this long.
                "visibility_timeout": settings.broker_visibility_timeout,
                "socket_connect_timeout": 2,
                # No retry_on_timeout: a command that times out fails, and the outbox sweep
                # publishes the row again (a retried write could land twice, as kombu notes);
                # without it, kombu can send a routing batch's notices in one pipeline.
                "socket_timeout": 5,
            },
        }
    folder = (Path(settings.data_dir) / "broker").resolve()
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": f"{embedded_broker.ALIAS}://",
        "broker_transport_options": {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
            "polling_interval": 0.05,
        },
    }


def celery_init_app(flask_app: Flask) -> Celery:
    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with flask_app.app_context():
                return self.run(*args, **kwargs)

    settings = flask_app.extensions["intake.settings"]
    app = Celery(flask_app.name, task_cls=FlaskTask)
    app.conf.update(
        **broker_settings(flask_app),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=4,
        # A patient must never wait on a broken broker: fail fast and let the outbox sweep retry.
        task_publish_retry=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
        # On a lost broker connection, let running tasks finish rather than cancel them: a
        # routing commits during a Redis outage (the patient's request reaches its queue), a
        # notice already handed to the mail server is not cut off half-way, and the ack that
        # cannot be sent only means one idempotent redelivery. Set explicitly, the choice is
        # ours, not Celery 6's changed default (its warning is silenced once the worker is ready).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        beat_schedule_filename=str((Path(settings.data_dir) / "celerybeat-schedule").resolve()),
        beat_schedule={
            "sweep-outbox": {
                "task": "workers.tasks.sweep_outbox",
                "schedule": timedelta(seconds=settings.outbox_sweep_seconds),
            },
            # Automatic assignment: claim timeouts and whatever is still in the pool.
            "sweep-assignments": {
                "task": "workers.tasks.sweep_assignments",
                "schedule": timedelta(seconds=60),
            },
            "escalate-overdue": {
                "task": "workers.tasks.escalate_overdue",
                "schedule": timedelta(seconds=60),
            },
            "purge-login-throttles": {
                "task": "workers.tasks.purge_login_throttles",
                "schedule": timedelta(hours=1),
            },
            "rewrap-data-keys": {
                "task": "workers.tasks.rewrap_data_keys",
                "schedule": timedelta(minutes=10),
            },
            "purge-expired": {
                "task": "workers.tasks.purge_expired",
                "schedule": timedelta(hours=6),
            },
        },
        # Two queues, so a slow mail server or webhook never holds up routing: a worker started
        # without -Q consumes both (intake serve, tests); compose runs one pool per queue.
        task_queues=[Queue(ROUTING_QUEUE), Queue(NOTIFICATIONS_QUEUE)],
        task_default_queue=ROUTING_QUEUE,
        task_routes={"workers.tasks.notify_*": {"queue": NOTIFICATIONS_QUEUE}},
        timezone="UTC",
        include=["workers.tasks"],
    )
    app.set_default()
    flask_app.extensions["celery"] = app
    app.flask_app = flask_app  # for the worker's signal handlers
    return app


@worker_process_init.connect
def _fresh_connections_after_fork(**_kwargs: object) -> None:
    """A forked pool process must not share its parent's database connections."""
    from intake.extensions import db

    for engines in list(db._app_engines.values()):  # noqa: SLF001 - Flask-SQLAlchemy's registry
        for engine in engines.values():
            engine.dispose(close=False)


@worker_init.connect
def _serve_metrics(sender: Any = None, **_kwargs: object) -> None:
    """INTAKE_WORKER_METRICS_PORT: the worker's own /metrics (routing counts and latency)."""
    flask_app = getattr(getattr(sender, "app", None), "flask_app", None)
    if flask_app is None:
        return
    port = flask_app.extensions["intake.settings"].worker_metrics_port
    if port:
        from intake.ops.metrics import serve_worker_metrics

        serve_worker_metrics(flask_app, port)


@worker_process_shutdown.connect
def _forget_pool_process(pid: int | None = None, **_kwargs: object) -> None:
    from config.multiprocess import mark_process_dead

    mark_process_dead(pid or os.getpid())


@task_prerun.connect
def _bind_trace(task: Any = None, **_kwargs: object) -> None:
    """The web request's trace id (a message header) in every line this task logs."""
    from intake.ops import tracing

    tracing.bind_from_task(getattr(task, "request", None))


@task_postrun.connect
def _unbind_trace(**_kwargs: object) -> None:
    import structlog

    structlog.contextvars.clear_contextvars()


@worker_ready.connect
def _worker_ready(**_kwargs: object) -> None:
    from intake.ops import readiness

    # Celery warns on every lost broker connection that the default of
    # worker_cancel_long_running_tasks_on_connection_loss changes in 6.0; we set it. Its
    # logging set-up turns its own warnings to "always", so this comes after it.
    warnings.filterwarnings(
        "ignore",
        message=r"\s*In Celery 5\.1 we introduced an optional breaking change",
        category=CPendingDeprecationWarning,
    )
    readiness.mark_ready("worker")


@beat_init.connect
def _beat_ready(**_kwargs: object) -> None:
    from intake.ops import readiness

    readiness.mark_ready("beat")
