"""Routing and notifications on separate Celery queues: a mail server that hangs ties up the
notification pool only, and new requests keep reaching their teams."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import OutboxMessage, Request
from tests.conftest import reference_from, valid_refill
from tests.workers.conftest import free_port, pipeline_settings, wait_until


class HangingSmtpServer:
    """Accepts TCP connections and never says a word: no greeting, no error, no close."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"smtp://127.0.0.1:{self.port}"
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._held.append(connection)
            self.accepted += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for connection in self._held:
            connection.close()
        self._listener.close()


@pytest.fixture
def hanging_smtp() -> Iterator[HangingSmtpServer]:
    server = HangingSmtpServer()
    yield server
    server.close()


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server, hanging_smtp):
    return pipeline_settings(
        base_settings,
        database_url,
        tmp_path,
        redis_server.url,
        hanging_smtp.url,
        broker_visibility_timeout=30,
    )


def statuses(app, references: list[str]) -> dict[str, str]:
    with app.app_context():
        found = db.session.execute(
            sa.select(Request.reference, Request.status).where(Request.reference.in_(references))
        ).all()
        return dict(found)  # type: ignore[arg-type]


def notifications_waiting(app) -> int:
    with app.app_context():
        return int(
            db.session.scalar(
                sa.select(sa.func.count())
                .select_from(OutboxMessage)
                .where(OutboxMessage.task == "notify_team")
                .where(OutboxMessage.status.in_(("pending", "sending")))
            )
            or 0
        )


def submit(patient, count: int) -> list[str]:
    return [reference_from(patient.submit("refill", valid_refill())) for _ in range(count)]


def routed(app, references: list[str]) -> bool:
    current = statuses(app, references)
    return len(current) == len(references) and set(current.values()) == {"queued"}


def test_a_hanging_mail_server_does_not_delay_routing(
    app, patient, celery_processes, settings, hanging_smtp
):
    router = celery_processes(settings, "worker", "-Q", "routing").wait_ready()
    first = submit(patient, 6)
    wait_until(lambda: routed(app, first), 30, message="routed by the routing pool")
    # The routing pool never picked up a notification: nothing has knocked on the mail server.
    assert hanging_smtp.accepted == 0
    assert notifications_waiting(app) == len(first)

    # The notification pool takes them and hangs on the silent server, both of its processes.
    celery_processes(settings, "worker", "-Q", "notifications").wait_ready()
    wait_until(lambda: hanging_smtp.accepted >= 2, 30, message="notifier stuck on SMTP")

    # Meanwhile new requests reach their teams: routing does not queue behind the mail server.
    second = submit(patient, 6)
    wait_until(lambda: routed(app, second), 30, message="routed while notifications hang")
    assert notifications_waiting(app) >= len(first) + len(second) - 2
    assert router.process.poll() is None
