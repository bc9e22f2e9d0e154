"""gunicorn settings for Intake's web app: ``gunicorn -c python:config.gunicorn ...``.

Read by the gunicorn master before it forks: it names the folder the workers share their
metrics in (config.multiprocess), and tells prometheus_client when a worker exits.
"""

from __future__ import annotations

from typing import Any

from config.multiprocess import mark_process_dead, prepare_multiprocess_dir

prepare_multiprocess_dir("web")


def child_exit(_server: Any, worker: Any) -> None:
    mark_process_dead(worker.pid)
