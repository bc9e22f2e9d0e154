"""``intake serve``: web, worker, beat and the audit signer for one machine, stopped together.

The web app runs in this process under waitress; the Celery worker and beat run as child
processes (``celery -A workers worker`` / ``beat``) with the same environment, so what runs
here is exactly what runs on separate machines in production. The audit signer
(``intake audit signer``) is a child of its own: it alone loads the checkpoint signing key, from
the signer's folder in the data folder; the web app and the workers never do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from flask import Flask

from intake.ops import readiness

log = structlog.get_logger(__name__)


def _celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "--quiet", "-A", "workers", *args]


def _signer() -> list[str]:
    # argv[1:3] == ["audit", "signer"]: the one command whose app may load the signing key.
    return [sys.executable, "-c", "from intake.cli import main; main()", "audit", "signer"]


MAX_RESTARTS = 20
CHILD_ROLES = ("worker", "beat", "signer")
START_TIMEOUT_SECONDS = 60.0


def child_environment(
    app: Flask, host: str | None = None, port: int | None = None
) -> dict[str, str]:
    settings = app.extensions["intake.settings"]
    env = {
        **os.environ,
        "INTAKE_DATA_DIR": str(settings.data_dir),
        readiness.ENV: str(_ready_folder(app)),
    }
    listening_on_one_address = host and host not in ("0.0.0.0", "::")  # noqa: S104
    if (
        listening_on_one_address
        and port
        and settings.embedded
        and not os.environ.get("INTAKE_PUBLIC_URL")
    ):
        # The links in the workers' notices point where this server listens.
        env["INTAKE_PUBLIC_URL"] = f"http://{host}:{port}"
    return env


def _ready_folder(app: Flask) -> Path:
    return Path(app.extensions["intake.settings"].data_dir) / "run" / "ready"


def start_children(
    app: Flask, host: str | None = None, port: int | None = None
) -> list[subprocess.Popen[bytes]]:
    readiness.fresh_folder(_ready_folder(app))
    env = child_environment(app, host, port)
    worker = subprocess.Popen(  # noqa: S603 - fixed argv
        _celery(
            "worker", "--loglevel", "INFO", "--concurrency", "2", "--hostname", "intake-worker@%h"
        ),
        env=env,
    )
    beat = subprocess.Popen(  # noqa: S603 - fixed argv
        _celery("beat", "--loglevel", "INFO"),
        env=env,
    )
    signer = subprocess.Popen(_signer(), env=env)  # noqa: S603 - fixed argv
    return [worker, beat, signer]


def stop_children(children: list[subprocess.Popen[bytes]], timeout: float = 15) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def make_server(app: Flask, host: str, port: int) -> Any:
    """The waitress server of ``intake serve``."""
    from waitress.server import create_server

    # waitress would drop X-Forwarded-* itself; Intake's own middleware (intake.ops.proxies)
    # believes them from INTAKE_TRUSTED_PROXIES only, the same rule as under gunicorn.
    return create_server(
        app, host=host, port=port, threads=8, ident="intake", clear_untrusted_proxy_headers=False
    )


def banner(app: Flask, host: str, port: int) -> str:
    """Where to open Intake and, on the embedded profile, how to log in: printed once the
    worker and beat have said hello, so the start-up lines do not bury it."""
    from intake.ops.demo import saved_logins

    settings = app.extensions["intake.settings"]
    url = f"http://{host}:{port}"
    broker = "Redis" if settings.redis_url else "embedded broker in " + str(settings.data_dir)
    lines = [
        "",
        f"  Intake is running on the {settings.profile} profile ({broker}).",
        f"  Open {url}/ for the patient forms,",
        f"       {url}/staff/login for staff.",
    ]
    if settings.embedded:
        lines += ["  " + line if line else "" for line in saved_logins(app, url)]
    log_file = Path(settings.data_dir) / "logs" / "intake.log"
    lines += [f"  Logs are printed here and kept in {log_file}.", "  Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


def run(app: Flask, host: str, port: int, with_workers: bool = True) -> None:
    children = start_children(app, host, port) if with_workers else []
    child_env = child_environment(app, host, port)
    server = make_server(app, host, port)
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            print("\nStopping Intake (web, worker, beat, signer)...", flush=True)
            server.close()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    def watch() -> None:
        """Start a child again if it dies (a broker outage can end a Celery worker); the outbox
        sweep then catches up on anything it missed, the signer on the chain since its last."""
        restarts = 0
        while not stopping.wait(1):
            for index, child in enumerate(children):
                if child.poll() is None or stopping.is_set():
                    continue
                log.error("child_process_exited", argv=str(child.args), code=child.returncode)
                if restarts >= MAX_RESTARTS:
                    stop(signal.SIGTERM, None)
                    return
                restarts += 1
                time.sleep(min(2**restarts, 30))
                if not stopping.is_set():
                    children[index] = subprocess.Popen(child.args, env=child_env)  # noqa: S603

    threading.Thread(target=watch, daemon=True).start()
    if children:
        # The banner goes after the children's start-up lines, where a newcomer sees it last.
        missing = readiness.wait_ready(_ready_folder(app), CHILD_ROLES, START_TIMEOUT_SECONDS)
        if missing:
            log.warning("children_not_ready", missing=missing, waited=START_TIMEOUT_SECONDS)
        time.sleep(0.3)  # their last lines reach the console just after the mark
    print(banner(app, host, port), flush=True)
    try:
        server.run()
    except OSError:
        if not stopping.is_set():
            raise
    finally:
        stop_children(children)
        print("Intake stopped.", flush=True)
