"""One folder of Prometheus value files per process tree (gunicorn's workers, Celery's pool).

Why here, apart from intake.ops.metrics: prometheus_client picks how it stores values when it
is first imported, so the folder must be named before anything imports it: in gunicorn's
master (config.gunicorn) and in ``celery -A workers`` before the app is built. Nothing here
imports prometheus_client until a process has died.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(purpose: str) -> str:
    """Name a new, empty folder for this start unless the operator set one; return it.

    A new folder per start: counts of an earlier run never add in (Prometheus sees a counter
    reset and copes, as it does for any restart).
    """
    if not os.environ.get(ENV):
        folder = tempfile.mkdtemp(prefix=f"intake-metrics-{purpose}-")
        os.environ[ENV] = folder
        # Removed when the process that made it exits; forked children (gunicorn's workers,
        # Celery's pool) inherit this handler and must leave the shared folder alone.
        atexit.register(_remove_if_owner, folder, os.getpid())
    if "prometheus_client.values" in sys.modules:
        from prometheus_client import values

        # Imported already, so it chose in-process values: Flower, installed as a `celery`
        # command plugin, imports prometheus_client when the Celery CLI starts, before
        # `-A workers` gets here. Metrics made from now on (all of Intake's) must still count
        # into the folder, or the worker's metrics port never sees its pool's counts.
        values.ValueClass = values.get_value_class()
    return os.environ[ENV]


def _remove_if_owner(folder: str, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """Forget a dead process's live gauges; its counters stay in the sum."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
