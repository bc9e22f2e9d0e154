"""The baseline for bench/routing_drain.py: a bare Celery app with one trivial task.

Configured as ``workers.celery_app`` configures Intake's, where it touches the path of a
task (JSON only, results ignored, ``acks_late``, requeued when a pool process dies, the same
prefetch multiplier and visibility timeout, a ``routing`` queue), and nothing else: no Flask
app, no database, no logging set-up of its own. The broker is ``CELERY_BROKER_URL``.

    CELERY_BROKER_URL=redis://... celery -A bench.bare_celery worker -Q routing -c 2
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

QUEUE = "routing"

app = Celery("bare")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    result_backend=None,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=4,
    broker_transport_options={"visibility_timeout": 300.0},
    task_queues=[Queue(QUEUE)],
    task_default_queue=QUEUE,
)


@app.task(name="bench.noop")
def noop(x: int) -> None:
    """Do nothing: what the broker and the worker cost per task, and no more."""
    return None
