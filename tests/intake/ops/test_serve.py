"""``intake serve`` as a newcomer runs it: one process tree on the embedded profile.

What the README's start command runs, started the same way (``intake db upgrade``, ``intake
demo``, ``intake serve``) in a data folder of its own, with the patient forms used over HTTP:
what the console shows, and whether the embedded broker keeps every request when its worker
is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import hidden_fields, valid_refill
from tests.workers.conftest import free_port, wait_until

INTAKE = Path(sys.executable).parent / "intake"
BANNER_END = "Press Ctrl-C to stop."


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class Served:
    """``intake serve`` on a free port with its own data folder; its console in a file."""

    def __init__(self, folder: Path, **settings: str) -> None:
        self.folder = folder
        self.data = folder / "var"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
        self.env.update(
            INTAKE_DATA_DIR=str(self.data),
            INTAKE_MIN_FILL_SECONDS="0",
            INTAKE_SUBMIT_RATE_LIMIT="100000/minute",
            **settings,
        )
        self.console = folder / "console.log"
        self.process: subprocess.Popen[bytes] | None = None

    def intake(self, *args: str) -> str:
        done = subprocess.run(  # noqa: S603 - our own command
            [str(INTAKE), *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def start(self) -> None:
        self.intake("db", "upgrade")
        self.intake("demo", "--if-empty", "--requests", "0")
        with self.console.open("wb") as out:
            self.process = subprocess.Popen(  # noqa: S603
                [str(INTAKE), "serve", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(lambda: BANNER_END in self.text() or self.process.poll() is not None, 90)
        assert self.process.poll() is None, self.text()[-3000:]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def engine(self) -> sa.Engine:
        return sa.create_engine(f"sqlite:///{self.data / 'intake.sqlite3'}")

    def worker_pid(self) -> int | None:
        """The Celery worker's main process: the child of ``intake serve`` running ``worker``."""
        assert self.process is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if ppid == self.process.pid and b"worker" in argv and b"celery" in argv:
                return int(entry.name)
        return None

    def submit(self) -> str:
        """GET the refill form and POST it filled in, as a browser would; the confirmation URL."""
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(CookieJar()), NoRedirect()
        )
        with opener.open(self.url + "/refill", timeout=30) as page:
            form = {**valid_refill(), **hidden_fields(page.read().decode())}
        body = urllib.parse.urlencode(form).encode()
        try:
            opener.open(self.url + "/refill", data=body, timeout=30)
        except urllib.error.HTTPError as answer:
            assert answer.code == 303, answer.code
            return str(answer.headers["Location"])
        raise AssertionError("the form was not accepted")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path, INTAKE_OUTBOX_SWEEP_SECONDS="1", INTAKE_OUTBOX_REPUBLISH_SECONDS="5")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _routed(engine: sa.Engine) -> tuple[int, int, int]:
    """(requests stored, requests routed, routing events): routed once each means 2nd == 3rd."""
    with engine.connect() as conn:
        stored = conn.scalar(sa.text("SELECT count(*) FROM requests"))
        routed, events = conn.execute(
            sa.text(
                "SELECT count(DISTINCT reference), count(*) FROM audit_events "
                "WHERE action = 'request.routed'"
            )
        ).one()
    return int(stored or 0), int(routed or 0), int(events or 0)


def test_the_console_shows_where_to_log_in_after_start_up_and_no_housekeeping(served: Served):
    saved = json.loads((served.data / "demo-credentials.json").read_text())
    text = served.text()
    banner = text[text.rindex("Intake is running") :]
    # The logins come after every start-up line, next to the addresses to open.
    assert f"Open {served.url}/ for the patient forms" in banner
    assert f"Log in at {served.url}/staff/login as pharmacist" in banner
    assert saved["pharmacist"] in banner and saved["pharmacist:totp"] in banner
    # Beat sends the outbox sweep every second here: none of it reaches the console.
    time.sleep(4)
    served.submit()
    wait_until(lambda: _routed(served.engine())[1] == 1, 30, message="the request routed")
    time.sleep(1.5)
    after = served.text()[len(text) :]
    lines = [line for line in after.splitlines() if line.strip()]
    assert not [line for line in lines if "sweep" in line or "Sending due task" in line], lines
    # One line for the submission and one for its routing; Celery's own "received" and
    # "succeeded" lines for the task stay out of the way.
    assert len([line for line in lines if "request_routed" in line]) == 1, lines
    assert not [line for line in lines if "succeeded in" in line or "] received" in line], lines
    assert len(lines) <= 6, lines
    # The team's notice links to this server, on the port it was started on.
    assert f'"link": "{served.url}/staff/requests/' in after


def test_the_embedded_broker_keeps_every_request_through_two_worker_kills(served: Served):
    total, threads = 1000, 4
    kills: list[int] = []
    failures: list[BaseException] = []
    counter = iter(range(total))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            if n in (total // 3, 2 * total // 3):
                pid = wait_until(served.worker_pid, 60, message="a worker to kill")
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
            try:
                served.submit()
            except Exception as error:  # noqa: BLE001 - reported below
                failures.append(error)

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(600)
    assert failures == [] and len(kills) == 2
    engine = served.engine()
    # Every request routed exactly once: a worker killed with messages in hand loses them,
    # and the outbox publishes them again.
    wait_until(lambda: _routed(engine)[:2] == (total, total), 240, 1, "every request routed")
    assert _routed(engine) == (total, total, total)
    console = served.text()
    assert console.count("child_process_exited") == 2  # the two kills, and nothing else
    assert "Unrecoverable error" not in console and "Traceback" not in console
    assert '"level": "critical"' not in console


def _intake_in(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own command
        [str(INTAKE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_demo_otp_finds_the_data_folder_it_is_run_beside(tmp_path: Path):
    import pyotp

    installation = Served(tmp_path)
    installation.intake("db", "upgrade")
    installation.intake("demo", "--if-empty", "--requests", "0")
    secret = json.loads((installation.data / "demo-credentials.json").read_text())
    env = {k: v for k, v in installation.env.items() if k != "INTAKE_DATA_DIR"}
    # Run where scripts/start was run (its var/ beside): the code of that installation.
    done = _intake_in(tmp_path, env, "demo-otp", "pharmacist")
    assert done.returncode == 0, done.stderr
    totp = pyotp.TOTP(secret["pharmacist:totp"])
    assert totp.verify(done.stdout.strip(), valid_window=1)


@pytest.mark.parametrize("args", [(), ("--help",), ("users", "create", "--help")])
def test_help_outside_an_installation_leaves_nothing_behind(tmp_path: Path, args: tuple[str, ...]):
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    done = _intake_in(tmp_path, env, *args)
    assert done.returncode == (2 if not args else 0), done.stderr
    assert "Usage: intake" in done.stdout + done.stderr
    if not args or args == ("--help",):
        assert "serve" in done.stdout + done.stderr and "backup" in done.stdout + done.stderr
    # No ./var with fresh keys where someone only asked what the commands are.
    assert list(tmp_path.iterdir()) == []
    assert "secret_generated" not in done.stderr and "Traceback" not in done.stderr


def test_demo_otp_where_there_is_no_installation_says_where_to_run_it(tmp_path: Path):
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    env["INTAKE_DATA_DIR"] = str(empty / "var")
    done = _intake_in(empty, env, "demo-otp", "pharmacist")
    assert done.returncode == 2
    assert "scripts/start" in done.stderr and "INTAKE_DATA_DIR" in done.stderr
    assert "Traceback" not in done.stderr
    # Nothing was made up on the way: no fresh data folder with new keys.
    assert list(empty.iterdir()) == []
