"""Attacks on the broker: Redis comes back as another Redis (another password).

Real parts, as in tests/workers/test_redis_outage.py: a password-protected redis-server, a real
prefork worker and beat, PostgreSQL. While Redis answers with an authentication error the
worker and beat must stay up (no crash loop), say why in their logs, and route what was
submitted meanwhile once the right Redis is back.
"""

from __future__ import annotations

import pytest

from tests.workers.conftest import RedisServer, pipeline_settings, wait_until
from tests.workers.test_pipeline import all_queued, routed_events, submit
from tests.workers.test_redis_outage import alive, outages_seen, redis  # noqa: F401

AUTH_ERRORS = (b"invalid username-password pair", b"WRONGPASS", b"AuthenticationError")


def auth_errors(log: bytes) -> int:
    return sum(log.count(marker) for marker in AUTH_ERRORS)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_redis_back_with_another_password_is_ridden_out_until_the_right_one_returns(
    app,
    patient,
    celery_processes,
    base_settings,
    database_url,
    tmp_path,
    redis,  # noqa: F811
    smtp_server,
):
    smtp_url, _mailbox = smtp_server
    settings = pipeline_settings(
        base_settings, database_url, tmp_path, redis.url, smtp_url, outbox_republish_seconds=4
    )
    worker = celery_processes(settings, "worker", "-Q", "routing").wait_ready()
    beat = celery_processes(settings, "beat")
    pid = worker.process.pid

    # Someone restarts Redis on its port with another password.
    redis.stop()
    impostor = RedisServer(tmp_path / "impostor", password="not-the-intake-password")
    impostor.folder.mkdir()
    impostor.port = redis.port
    impostor.start()
    try:
        wait_until(alive(worker, lambda: outages_seen(worker) >= 1), 20, message="outage noticed")
        held = [submit(patient, "refill", {}, "en") for _ in range(3)]
        wait_until(
            alive(worker, lambda: auth_errors(worker.log_path.read_bytes()) >= 1),
            30,
            0.2,
            "the worker to say the broker refused its password",
        )
        assert beat.process.poll() is None, beat.tail()
    finally:
        impostor.stop()
    redis.start()

    wait_until(alive(worker, lambda: all_queued(app, held)), 45, 0.5, "the held requests routed")
    log = worker.log_path.read_text()
    assert worker.process.pid == pid and log.count(" ready.") == 1, log[-4000:]
    assert "Unrecoverable error" not in log, log[-4000:]
    assert beat.process.poll() is None, beat.tail()
    assert {r: routed_events(app)[r] for r in held} == {r: 1 for r in held}
    print(f"\nauth errors logged while the impostor answered: {auth_errors(log.encode())}")
