"""A trace id per web request, in its log lines and in the lines of the tasks it started.

The web app makes a fresh id for each request (never one a client sends: a chosen id would let
anyone plant lines that look related), binds it in structlog as ``trace_id``, and returns it as
``X-Request-ID`` so a patient's or a colleague's report can be matched to the logs. Tasks
published while it is bound carry it as a Celery message header (never an argument, so the
task signature and the outbox stay ids only), and the worker binds it again around the task;
the notifications a routing task publishes carry it on. ``request_id`` in task lines is the
refill request's own id, a different thing.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from flask import Flask, Response

LOG_KEY = "trace_id"
HEADER = "intake_trace_id"  # the Celery message header
RESPONSE_HEADER = "X-Request-ID"
_FORM = re.compile(r"[0-9a-f]{32}")


def current() -> str | None:
    """The trace id bound in this context, if any."""
    value = structlog.contextvars.get_contextvars().get(LOG_KEY)
    return value if isinstance(value, str) else None


def task_headers() -> dict[str, str]:
    """Headers for a task published now: the current trace id, when there is one."""
    trace = current()
    return {HEADER: trace} if trace else {}


@contextmanager
def bound(trace: str | None) -> Iterator[None]:
    """Log (and publish tasks) under ``trace`` for the block, or under no trace when it is None
    or malformed; the trace bound before is back afterwards. For work done on behalf of another
    request than the one that started this context: a sweep publishing old rows, a routing
    batch."""
    before = current()
    wanted = trace if isinstance(trace, str) and _FORM.fullmatch(trace) else None
    if wanted == before:
        yield
        return
    if wanted is None:
        structlog.contextvars.unbind_contextvars(LOG_KEY)
    else:
        structlog.contextvars.bind_contextvars(**{LOG_KEY: wanted})
    try:
        yield
    finally:
        if before is None:
            structlog.contextvars.unbind_contextvars(LOG_KEY)
        else:
            structlog.contextvars.bind_contextvars(**{LOG_KEY: before})


def bind_from_task(request: Any) -> None:
    """Start a task's context afresh, with the trace id its message carried (if well formed)."""
    structlog.contextvars.clear_contextvars()
    trace = getattr(request, HEADER, None)
    if isinstance(trace, str) and _FORM.fullmatch(trace):
        structlog.contextvars.bind_contextvars(**{LOG_KEY: trace})


def init_app(app: Flask) -> None:
    def bind() -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**{LOG_KEY: uuid.uuid4().hex})

    def expose(response: Response) -> Response:
        trace = current()
        if trace:
            response.headers[RESPONSE_HEADER] = trace
        return response

    def unbind(_error: BaseException | None = None) -> None:
        structlog.contextvars.clear_contextvars()

    # First of all, so even a request refused early is traced.
    app.before_request_funcs.setdefault(None, []).insert(0, bind)
    app.after_request(expose)
    app.teardown_request(unbind)
