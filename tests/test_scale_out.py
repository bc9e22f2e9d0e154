"""Scale-out as docs/deploy.md describes it: two web instances and two routing workers (each its
own process tree, as on two hosts) against one PostgreSQL and one password-protected Redis.
Submissions spread over both web ports are each routed exactly once, by both workers between
them."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import subprocess
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import valid_refill
from tests.test_docker_compose import VKEY, command
from tests.workers.conftest import RedisServer, free_port, wait_until

SUBMISSIONS = 200


def submit(base: str) -> str:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = opener.open(base + "/refill", timeout=30).read().decode()
    hidden = dict(re.findall(r'name="(csrf_token|rendered_at)"[^>]*value="([^"]*)"', form))
    for cookie in jar:
        cookie.secure = False  # production's cookies are Secure; this is loopback HTTP
    body = urllib.parse.urlencode({**valid_refill(), **hidden}).encode()
    request = urllib.request.Request(
        base + "/refill", data=body, headers={"Referer": base + "/refill"}
    )
    response = opener.open(request, timeout=30)
    assert "/thanks/R-" in response.geturl(), response.read().decode()[:300]
    return response.geturl().rsplit("/", 1)[1]


def scaled(argv: list[str], option: str, value: str) -> list[str]:
    """A compose command with one option's value changed (fewer processes on a test machine)."""
    index = argv.index(option)
    return [*argv[: index + 1], value, *argv[index + 2 :]]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_two_web_instances_and_two_workers_route_every_request_once(
    backend, database_url, settings, tmp_path
):
    redis = RedisServer(tmp_path, password="scale-" + os.urandom(12).hex())
    redis.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    env.update(
        {
            "INTAKE_PROFILE": "production",
            "INTAKE_DATABASE_URL": database_url,
            "INTAKE_REDIS_URL": redis.url,
            "INTAKE_SECRET_KEY": settings.secret_key,
            "INTAKE_KEYRING": settings.keyring,
            "INTAKE_AUDIT_VERIFY_KEYS": VKEY,
            "INTAKE_MIN_FILL_SECONDS": "0",
            "INTAKE_SUBMIT_RATE_LIMIT": "100000/minute",
            "INTAKE_PUBLIC_URL": "https://intake.pharmacy.test",
            "INTAKE_LOG_LEVEL": "INFO",
        }
    )
    processes: list[subprocess.Popen[bytes]] = []
    logs: dict[str, Path] = {}

    def start(name: str, argv: list[str]) -> None:
        # Each host has its own data folder, as separate machines would.
        own = {**env, "INTAKE_DATA_DIR": str(tmp_path / name)}
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("ab") as log:
            processes.append(
                subprocess.Popen(  # noqa: S603
                    argv,
                    env=own,
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    try:
        migrate = subprocess.run(  # noqa: S603
            command("migrate", 0),
            env={**env, "INTAKE_DATA_DIR": str(tmp_path / "migrate")},
            cwd=tmp_path,
            capture_output=True,
            timeout=120,
        )
        assert migrate.returncode == 0, migrate.stderr.decode()[-2000:]
        ports = [free_port(), free_port()]
        for index, port in enumerate(ports):
            start(f"web-{index}", scaled(command("web", port), "--workers", "2"))
        for index in range(2):
            argv = scaled(command("worker", 0), "--concurrency", "2")
            start(f"worker-{index}", [*argv, "--hostname", f"router{index}@%h"])
        bases = [f"http://127.0.0.1:{port}" for port in ports]

        def ready() -> bool:
            for base in bases:
                try:
                    with urllib.request.urlopen(base + "/readyz", timeout=2) as answer:  # noqa: S310
                        if answer.status != 200:
                            return False
                except OSError:
                    return False
            return all(b"ready." in logs[f"worker-{i}"].read_bytes() for i in range(2))

        wait_until(ready, 90, 0.5, "two web instances and two workers ready")
        with ThreadPoolExecutor(max_workers=4) as pool:
            references = list(pool.map(submit, [bases[i % 2] for i in range(SUBMISSIONS)]))
        assert len(set(references)) == SUBMISSIONS

        engine = sa.create_engine(database_url)
        try:

            def statuses() -> Counter[str]:
                with engine.connect() as conn:
                    rows = conn.execute(sa.text("SELECT status FROM requests")).scalars()
                    return Counter(rows)

            wait_until(
                lambda: statuses() == Counter({"queued": SUBMISSIONS}),
                120,
                0.5,
                "every request routed",
            )
            with engine.connect() as conn:
                routed = Counter(
                    conn.execute(
                        sa.text(
                            "SELECT reference FROM audit_events WHERE action = 'request.routed'"
                        )
                    ).scalars()
                )
        finally:
            engine.dispose()
        assert routed == Counter({reference: 1 for reference in references})

        # Both web instances took submissions, and both workers routed some of them.
        def events(name: str, event: str) -> int:
            count = 0
            for line in logs[name].read_text(errors="replace").splitlines():
                if line.startswith("{") and json.loads(line).get("event") == event:
                    count += 1
            return count

        accepted = [events(f"web-{i}", "submission_decision") for i in range(2)]
        assert accepted == [SUBMISSIONS // 2, SUBMISSIONS // 2]
        # The routed lines follow the commits (a batch's one after another): wait for them all.
        wait_until(
            lambda: sum(events(f"worker-{i}", "request_routed") for i in range(2)) >= SUBMISSIONS,
            20,
            0.5,
            "a routed line for every request",
        )
        by_worker = [events(f"worker-{i}", "request_routed") for i in range(2)]
        assert sum(by_worker) == SUBMISSIONS and min(by_worker) > 0, by_worker
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
        redis.stop()
