"""Celery wiring for Intake: ``celery -A workers worker`` and ``celery -A workers beat``.

The Celery app is built on first use (``workers.app``) from a Flask app made with the
environment's settings, so importing this package costs nothing and the web process can
publish through :mod:`workers.publish` without building a second Flask app.
"""

from __future__ import annotations

from typing import Any

_celery: Any = None


def __getattr__(name: str) -> Any:
    global _celery
    if name in ("app", "celery"):
        if _celery is None:
            # Before anything imports prometheus_client: the worker's pool processes count
            # into one folder, which the worker's metrics port adds up.
            from config.multiprocess import prepare_multiprocess_dir

            prepare_multiprocess_dir("worker")
            from intake import create_app

            _celery = create_app().extensions["celery"]
        return _celery
    raise AttributeError(name)
