"""Prometheus metrics: what the pipeline did (counters) and what it holds now (from the database).

Counters and the routing histogram count events in the process that saw them: submissions and
logins in the web app, routing and SLA breaches in the Celery workers. Under gunicorn or a
Celery prefork pool, several processes count; they share one folder of value files
(``PROMETHEUS_MULTIPROC_DIR``, named by config.multiprocess before anything imports
prometheus_client) and a scrape adds them up.

Gauges of state (outbox backlog and its oldest row, open and overdue requests by team, the
audit trail's head and the age of its last checkpoint) are read from the database at scrape
time, so every web process answers the same and nothing drifts.

No label holds PHI: kinds, outcomes, reasons, task names and team ids only, from fixed sets.
``GET /metrics`` answers only with ``Authorization: Bearer <INTAKE_METRICS_TOKEN>`` and is a 404
while the token is unset; a Celery worker serves the same on ``INTAKE_WORKER_METRICS_PORT``.
"""

from __future__ import annotations

import hmac
import os
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import sqlalchemy as sa
import structlog
from flask import Blueprint, Flask, Response, abort, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from config.settings import read_secret_setting

log = structlog.get_logger(__name__)

bp = Blueprint("metrics", __name__)

SUBMISSIONS = Counter(
    "intake_submissions", "Patient form decisions, by form and outcome.", ["kind", "outcome"]
)
PUBLISH_FAILURES = Counter(
    "intake_publish_failures",
    "Task messages the broker did not take; the outbox sweep publishes them again.",
    ["task"],
)
LOGIN_FAILURES = Counter("intake_login_failures", "Staff logins refused, by reason.", ["reason"])
ACCOUNT_LOCKS = Counter(
    "intake_account_locks", "Lockouts begun after failed logins (account or client).", ["scope"]
)
AUDIT_WRITE_FAILURES = Counter(
    "intake_audit_write_failures",
    "Audited actions that could not be written (database), or anchored after commit (anchor).",
    ["stage"],
)
ROUTED = Counter("intake_requests_routed", "Requests routed to a team.", ["team"])
ROUTING_LATENCY = Histogram(
    "intake_routing_latency_seconds",
    "From a request's submission to its routing to a team.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
SLA_BREACHES = Counter("intake_sla_breaches", "Open requests escalated for passing their due time.")

OPEN_STATUSES = ("queued", "in_progress", "waiting_on_patient", "waiting_on_prescriber")


def _age_seconds(moment: Any, now: datetime) -> float | None:
    if moment is None:
        return None
    if isinstance(moment, str):  # SQLite hands back text
        try:
            moment = datetime.fromisoformat(moment)
        except ValueError:
            return None  # a damaged row must not take every other metric down with it
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max((now - moment).total_seconds(), 0.0)


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape (a few indexed aggregate queries)."""

    def __init__(
        self, engine: sa.Engine, now: Callable[[], datetime], teams: Iterable[str] = ()
    ) -> None:
        # ``teams``: the routing file's, listed even while nothing is open in them.
        self.engine, self.now, self.teams = engine, now, set(teams)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self.now()
        up = GaugeMetricFamily("intake_database_up", "1 if the scrape could read the database.")
        try:
            with self.engine.connect() as conn:
                families = list(self._read(conn, now))
        except sa.exc.SQLAlchemyError as error:
            log.warning("metrics_database_unavailable", error=type(error).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self, conn: sa.Connection, now: datetime) -> Iterable[GaugeMetricFamily]:
        backlog, oldest = conn.execute(
            sa.text(
                "SELECT count(*), min(created_at) FROM outbox "
                "WHERE status IN ('pending', 'sending')"
            )
        ).one()
        family = GaugeMetricFamily(
            "intake_outbox_backlog", "Task messages written and not yet done."
        )
        family.add_metric([], backlog or 0)
        yield family
        family = GaugeMetricFamily(
            "intake_outbox_oldest_pending_seconds",
            "Age of the oldest task message not yet done (0 when none).",
        )
        family.add_metric([], _age_seconds(oldest, now) or 0.0)
        yield family

        received = conn.scalar(sa.text("SELECT count(*) FROM requests WHERE status = 'received'"))
        family = GaugeMetricFamily(
            "intake_requests_unrouted", "Requests stored and not yet routed to a team."
        )
        family.add_metric([], received or 0)
        yield family

        depth = GaugeMetricFamily("intake_queue_depth", "Open requests, by team.", labels=["team"])
        overdue = GaugeMetricFamily(
            "intake_queue_overdue", "Open requests past their due time, by team.", labels=["team"]
        )
        rows = conn.execute(
            sa.text(
                "SELECT team, count(*), sum(CASE WHEN sla_due_at < :now THEN 1 ELSE 0 END) "
                "FROM requests WHERE status IN :open AND team IS NOT NULL GROUP BY team"
            ).bindparams(sa.bindparam("open", expanding=True)),
            {"now": now, "open": list(OPEN_STATUSES)},
        ).all()
        teams = {row[0] for row in rows} | self.teams
        teams |= set(conn.scalars(sa.text("SELECT id FROM teams")).all())
        counts = {row[0]: (row[1], row[2] or 0) for row in rows}
        for team in sorted(teams):
            open_count, late = counts.get(team, (0, 0))
            depth.add_metric([team], open_count)
            overdue.add_metric([team], late)
        yield depth
        yield overdue

        head = conn.scalar(sa.text("SELECT max(seq) FROM audit_events")) or 0
        family = GaugeMetricFamily("intake_audit_head_seq", "The audit trail's last event.")
        family.add_metric([], head)
        yield family
        signed = conn.execute(
            sa.text(
                "SELECT seq, created_at FROM audit_events WHERE action = 'audit.checkpointed' "
                "ORDER BY seq DESC LIMIT 1"
            )
        ).first()
        family = GaugeMetricFamily(
            "intake_audit_checkpoint_age_seconds",
            "Time since the last signed checkpoint (absent before the first).",
        )
        if signed is not None:
            family.add_metric([], _age_seconds(signed.created_at, now) or 0.0)
        yield family
        family = GaugeMetricFamily(
            "intake_audit_unsigned_events",
            "Audit events after the last checkpoint (its own event not counted).",
        )
        family.add_metric([], max(head - (signed.seq if signed is not None else 0), 0))
        yield family


def exposition(
    engine: sa.Engine | None, now: Callable[[], datetime], teams: Iterable[str] = ()
) -> bytes:
    """The Prometheus text of every process's counters plus, with an engine, the state gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Counters())
    if engine is not None:
        registry.register(DatabaseCollector(engine, now, teams))
    return generate_latest(registry)


class _Counters(Collector):
    """This single process's own metrics (no multiprocess folder: ``intake serve``, tests)."""

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()


def token_matches(expected: str | None, authorization: str | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header."""
    if not expected or not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


def _token(app: Flask) -> str | None:
    raw = app.extensions["intake.settings"].metrics_token
    return read_secret_setting(raw).strip() if raw else None


@bp.get("/metrics")
def metrics() -> Response:
    from intake.clock import utcnow
    from intake.extensions import db

    expected = _token(current_app)
    if not expected:
        abort(404)
    if not token_matches(expected, request.headers.get("Authorization")):
        log.info("metrics_refused")
        return Response(
            "unauthorized\n", 401, {"WWW-Authenticate": 'Bearer realm="metrics"'}, "text/plain"
        )
    teams = current_app.extensions["intake.routing"].teams
    return Response(exposition(db.engine, utcnow, teams), 200, mimetype=CONTENT_TYPE_LATEST)


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # a client that connects and says nothing is dropped, not waited on

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        return None


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per connection: a slow or idle client never holds up Prometheus's scrape."""

    daemon_threads = True


def serve_worker_metrics(app: Flask, port: int, host: str = "0.0.0.0") -> WSGIServer:  # noqa: S104
    """Serve /metrics for a Celery worker in a thread (the token rule of the web app)."""
    from intake.clock import utcnow

    expected = _token(app)

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if not expected or environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if not token_matches(expected, environ.get("HTTP_AUTHORIZATION")):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"unauthorized\n"]
        # Workers count routing; the state gauges are the web app's to report.
        body = exposition(None, utcnow)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [body]

    server = make_server(
        host, port, wsgi, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="worker-metrics", daemon=True).start()
    log.info("worker_metrics_serving", port=server.server_port)
    return server
