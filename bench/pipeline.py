"""Measure the whole submission pipeline against a bare Flask-WTF app, in one run.

Starts what it needs: a throwaway Redis with a password, a throwaway PostgreSQL database
(dropped afterwards), gunicorn with the production settings (``--workers 2``, as compose runs
it but for the worker count), a Celery worker (``--concurrency 2``), and the same gunicorn in
front of ``bench/bare_app.py``. ``wrk`` (``bench/wrk/submit.lua``) GETs the refill form and
POSTs it filled in, over and over, on each connection. For each target it reports:

- accepted submissions per second (POSTs answered 303), flat out for ``--seconds``;
- CPU per accepted submission, for the web processes and the workers apart (from /proc);
- whether routing kept up: every accepted request routed exactly once, the backlog drained, and
  how long draining took after the load stopped;
- submit to ``queued`` latency (p50, p95, max, from the audit trail's timestamps) in a second,
  paced run at half the measured rate;
- the peak RSS (VmHWM) of each web and worker process.

    .venv/bin/python bench/pipeline.py                       # bare, PostgreSQL, SQLite; 30 s each
    .venv/bin/python bench/pipeline.py --targets bare,postgresql --seconds 60
    .venv/bin/python bench/pipeline.py --quick               # a few seconds each (the tests)

Results go to ``bench/results/pipeline-<time>.md`` and ``.json`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LUA = ROOT / "bench" / "wrk" / "submit.lua"
DEFAULT_POSTGRES = os.environ.get(
    "INTAKE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TARGETS = ("bare", "postgresql", "sqlite")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


# --- processes ------------------------------------------------------------------------------


class Process:
    """One service, in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], folder: Path) -> None:
        self.name = name
        self.log = folder / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(  # noqa: S603 - our own argv
                argv,
                env=env,
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def tree(self) -> list[int]:
        """This process and its descendants."""
        found, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
        return found

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                parts = stat[stat.rindex(")") + 2 :].split()
                total += (int(parts[11]) + int(parts[12])) / CLOCK_TICKS  # utime, stime
        return total

    def peak_rss_mib(self) -> list[float]:
        """VmHWM of each process below the parent (gunicorn's and Celery's workers)."""
        sizes = []
        for pid in self.tree()[1:] or [self.popen.pid]:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                match = re.search(r"VmHWM:\s+(\d+) kB", status)
                if match:
                    sizes.append(round(int(match.group(1)) / 1024, 1))
        return sizes

    def stop(self) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def start_redis(folder: Path, stack: contextlib.ExitStack) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port, password = free_port(), secrets.token_urlsafe(32)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(folder), "--requirepass", password]
    redis = Process("redis", argv, dict(os.environ), folder)
    stack.callback(redis.stop)
    url = f"redis://:{password}@127.0.0.1:{port}/0"

    def answers() -> bool:
        import redis as redis_client

        try:
            with redis_client.Redis.from_url(url) as client:
                return bool(client.ping())
        except redis_client.RedisError:
            return False

    wait_until(answers, 20, "redis-server")
    return url


@contextlib.contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    name = f"intake_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield (
            sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - our own server
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# --- load -----------------------------------------------------------------------------------


@dataclass
class Load:
    seconds: float
    accepted: int
    forms: int
    refused: int
    throttled: int
    other: int
    errors: int
    http_p50_ms: float
    http_p95_ms: float
    web_cpu_s: float = 0.0
    worker_cpu_s: float = 0.0
    wrk_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0


def run_wrk(
    port: int, seconds: float, connections: int, delay_ms: float, folder: Path
) -> tuple[Load, float]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    env = {
        **os.environ,
        "BENCH_HOST": f"127.0.0.1:{port}",
        "BENCH_DELAY_MS": str(int(delay_ms)),
    }
    argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
    argv += ["-s", str(LUA), f"http://127.0.0.1:{port}"]
    before = os.times()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)  # noqa: S603
    after = os.times()
    wrk_cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed:\n{done.stdout}\n{done.stderr}")
    (folder / "wrk.log").open("a").write(done.stdout)
    figures = json.loads(line[len("BENCH ") :])
    load = Load(
        seconds=figures["duration_us"] / 1e6,
        accepted=figures["accepted"],
        forms=figures["forms"],
        refused=figures["refused"],
        throttled=figures["throttled"],
        other=figures["other"],
        errors=figures["errors"],
        http_p50_ms=figures["latency_p50_us"] / 1000,
        http_p95_ms=figures["latency_p95_us"] / 1000,
    )
    return load, wrk_cpu


@dataclass
class Result:
    target: str
    flat: Load
    paced: Load | None = None
    drain_s: float | None = None
    requests_stored: int | None = None
    accepted_total: int | None = None
    unanswered: int | None = None
    routed: int | None = None
    routed_twice: int | None = None
    routed_once: bool | None = None
    duplicates: int | None = None
    unrouted: list[dict[str, Any]] = field(default_factory=list)
    queued_p50_ms: float | None = None
    queued_p95_ms: float | None = None
    queued_max_ms: float | None = None
    web_rss_mib: list[float] = field(default_factory=list)
    worker_rss_mib: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        flat = self.flat
        data: dict[str, Any] = {
            "target": self.target,
            "accepted_per_s": round(flat.rate, 1),
            "accepted": flat.accepted,
            "refused": flat.refused,
            "throttled": flat.throttled,
            "other": flat.other,
            "errors": flat.errors,
            "seconds": round(flat.seconds, 1),
            "web_cpu_ms": round(1000 * flat.web_cpu_s / max(flat.accepted, 1), 2),
            "worker_cpu_ms": round(1000 * flat.worker_cpu_s / max(flat.accepted, 1), 2),
            "wrk_cpu_share": round(flat.wrk_cpu_s / flat.seconds, 2) if flat.seconds else None,
            "http_p95_ms": round(flat.http_p95_ms, 1),
            "drain_s": self.drain_s,
            "requests_stored": self.requests_stored,
            "accepted_total": self.accepted_total,
            "unanswered_at_stop": self.unanswered,
            "routed": self.routed,
            "routed_twice": self.routed_twice,
            "routed_once": self.routed_once,
            "duplicates": self.duplicates,
            "unrouted": self.unrouted,
            "paced_per_s": round(self.paced.rate, 1) if self.paced else None,
            "queued_p50_ms": self.queued_p50_ms,
            "queued_p95_ms": self.queued_p95_ms,
            "queued_max_ms": self.queued_max_ms,
            "web_rss_mib": self.web_rss_mib,
            "worker_rss_mib": self.worker_rss_mib,
        }
        return data


def measure(
    web: Process,
    workers: Process | None,
    port: int,
    seconds: float,
    connections: int,
    folder: Path,
    delay_ms: float = 0,
) -> Load:
    web_before = web.cpu_seconds()
    worker_before = workers.cpu_seconds() if workers else 0.0
    load, wrk_cpu = run_wrk(port, seconds, connections, delay_ms, folder)
    load.web_cpu_s = web.cpu_seconds() - web_before
    load.worker_cpu_s = (workers.cpu_seconds() - worker_before) if workers else 0.0
    load.wrk_cpu_s = wrk_cpu
    return load


def gunicorn_argv(app: str, port: int, workers: int, access_log: Path) -> list[str]:
    """docker-compose.yml's web command, with this run's port and worker count."""
    return [
        str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
        "--forwarded-allow-ips", "127.0.0.1", "--access-logfile", str(access_log),
        "--access-logformat", '%(t)s "%(m)s %(U)s" %(s)s %(b)s %(L)s', app,
    ]  # fmt: skip


def run_bare(args: argparse.Namespace, folder: Path) -> Result:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_SECRET_KEY": secrets.token_urlsafe(32)}
    argv = gunicorn_argv(
        "bench.bare_app:create_app()", port, args.web_workers, folder / "access.log"
    )
    web = Process("web", argv, env, folder)
    try:
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{port}/refill") or not web.alive(), 60, "bare app"
        )
        if not web.alive():
            raise RuntimeError(f"the bare app exited:\n{web.tail()}")
        measure(web, None, port, min(3, args.seconds), args.connections, folder)  # warm up
        flat = measure(web, None, port, args.seconds, args.connections, folder)
        return Result("bare", flat, web_rss_mib=web.peak_rss_mib())
    finally:
        web.stop()


def intake_env(
    target: str, folder: Path, redis_url: str, database_url: str, port: int
) -> dict[str, str]:
    from intake.crypto.phi import Keyring
    from intake_verify.note import generate_key

    signing_key, verify_key = generate_key(f"127.0.0.1:{port}/intake-audit")
    data_dir = folder / "data"
    data_dir.mkdir(mode=0o700, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    env |= {
        "INTAKE_PROFILE": "production" if target == "postgresql" else "embedded",
        "INTAKE_DATA_DIR": str(data_dir),
        "INTAKE_DATABASE_URL": database_url,
        "INTAKE_REDIS_URL": redis_url,
        "INTAKE_SECRET_KEY": secrets.token_urlsafe(36),
        "INTAKE_KEYRING": Keyring.generate().to_json(),
        "INTAKE_AUDIT_VERIFY_KEYS": verify_key,
        "BENCH_SIGNING_KEY": signing_key,
        "INTAKE_PUBLIC_URL": f"https://127.0.0.1:{port}",
        "INTAKE_TRUSTED_PROXIES": "127.0.0.1",
        "INTAKE_LOG_LEVEL": "INFO",
        # One client (wrk) sends everything, as fast as it can: no throttle, no fill time.
        "INTAKE_SUBMIT_RATE_LIMIT": "1000000/minute",
        "INTAKE_MIN_FILL_SECONDS": "0",
        "HOME": str(folder),
    }
    return env


def migrate(env: dict[str, str], folder: Path) -> None:
    """``intake db upgrade`` on the database ``env`` names."""
    done = subprocess.run(  # noqa: S603
        [str(BIN / "intake"), "db", "upgrade"], env=env, cwd=folder,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"intake db upgrade failed:\n{done.stderr[-3000:]}")


def worker_argv(concurrency: int, *extra: str, app: str = "workers") -> list[str]:
    """The Celery worker as compose runs it, with this run's concurrency (and ``extra``)."""
    argv = [str(BIN / "celery"), "-A", app, "worker", "--loglevel", "INFO"]
    return [*argv, "--concurrency", str(concurrency), *extra]


def run_intake(target: str, args: argparse.Namespace, folder: Path, redis_url: str) -> Result:
    port = free_port()
    with contextlib.ExitStack() as stack:
        if target == "postgresql":
            database_url = stack.enter_context(postgres_database(args.postgres))
        else:
            database_url = f"sqlite:///{folder / 'intake.sqlite3'}"
        env = intake_env(target, folder, redis_url, database_url, port)
        migrate(env, folder)
        argv = gunicorn_argv("intake:create_app()", port, args.web_workers, folder / "access.log")
        web = Process("web", argv, env, folder)
        stack.callback(web.stop)
        workers = Process("worker", worker_argv(args.worker_concurrency), env, folder)
        stack.callback(workers.stop)
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{port}/readyz") or not web.alive(), 90, "gunicorn"
        )
        if not web.alive():
            raise RuntimeError(f"gunicorn exited:\n{web.tail()}")
        wait_until(lambda: "ready." in workers.log.read_text() or not workers.alive(), 90, "worker")
        if not workers.alive():
            raise RuntimeError(f"the worker exited:\n{workers.tail()}")
        # The checkpoint signer, as compose runs it: the only process holding the signing key.
        signer_env = {k: v for k, v in env.items() if k != "BENCH_SIGNING_KEY"}
        signer_env["INTAKE_AUDIT_SIGNING_KEY"] = env["BENCH_SIGNING_KEY"]
        signer = Process("signer", [str(BIN / "intake"), "audit", "signer"], signer_env, folder)
        stack.callback(signer.stop)
        engine = sa.create_engine(database_url)
        stack.callback(engine.dispose)

        warm = measure(web, workers, port, min(3, args.seconds), args.connections, folder)
        drain(engine, 300)
        flat = measure(web, workers, port, args.seconds, args.connections, folder)
        result = Result(target, flat)
        result.accepted_total = warm.accepted + flat.accepted
        started = time.monotonic()
        drain(engine, 600)
        result.drain_s = round(time.monotonic() - started, 1)

        # Half the rate measured: each connection waits before each GET.
        if flat.rate > 0:
            mark = last_seq(engine)
            per_pair_ms = 1000 * args.connections / (flat.rate / 2)
            service_ms = 1000 * args.connections / flat.rate
            paced = measure(
                web, workers, port, args.seconds, args.connections, folder,
                delay_ms=max(per_pair_ms - service_ms, 1),
            )  # fmt: skip
            drain(engine, 300)
            result.paced = paced
            result.accepted_total += paced.accepted
            latencies = queued_latencies(engine, mark)
            if latencies:
                cut = (
                    statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
                )
                result.queued_p50_ms = round(statistics.median(latencies), 1)
                result.queued_p95_ms = round(cut[94], 1)
                result.queued_max_ms = round(max(latencies), 1)
        check_exactly_once(engine, result)
        result.web_rss_mib = web.peak_rss_mib()
        result.worker_rss_mib = workers.peak_rss_mib()
        return result


def drain(engine: sa.Engine, timeout: float) -> None:
    stored: list[int] = []

    def empty() -> bool:
        # Routed, and every task it led to (the team's notice) done: nothing queued behind.
        # And no new request for a second (five looks): a POST wrk left in flight when it
        # stopped may be committed after a first look found the backlog empty.
        with engine.connect() as conn:
            stored.append(int(conn.scalar(sa.text("SELECT count(*) FROM requests")) or 0))
            return (
                len(stored) >= 5
                and len(set(stored[-5:])) == 1
                and not conn.scalar(
                    sa.text("SELECT count(*) FROM requests WHERE status = 'received'")
                )
                and not conn.scalar(
                    sa.text("SELECT count(*) FROM outbox WHERE status IN ('pending', 'sending')")
                )
            )

    wait_until(empty, timeout, "the routing backlog to drain")


def last_seq(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.text("SELECT coalesce(max(seq), 0) FROM audit_events")) or 0)


def _moment(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def queued_latencies(engine: sa.Engine, after_seq: int) -> list[float]:
    """Milliseconds from each request's submission event to its routing event."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT reference, action, created_at FROM audit_events WHERE seq > :seq "
                "AND action IN ('request.submitted', 'request.routed')"
            ),
            {"seq": after_seq},
        ).all()
    submitted = {
        r.reference: _moment(r.created_at) for r in rows if r.action == "request.submitted"
    }
    routed = {r.reference: _moment(r.created_at) for r in rows if r.action == "request.routed"}
    return [
        (routed[ref] - moment).total_seconds() * 1000
        for ref, moment in submitted.items()
        if ref in routed
    ]


def check_exactly_once(engine: sa.Engine, result: Result) -> None:
    with engine.connect() as conn:
        result.requests_stored = int(conn.scalar(sa.text("SELECT count(*) FROM requests")) or 0)
        twice = conn.scalar(
            sa.text(
                "SELECT count(*) FROM (SELECT reference FROM audit_events "
                "WHERE action = 'request.routed' GROUP BY reference HAVING count(*) > 1) AS t"
            )
        )
        routed = conn.scalar(
            sa.text(
                "SELECT count(DISTINCT reference) FROM audit_events WHERE action = 'request.routed'"
            )
        )
        # Stored but never routed: their status and audit trail say where they stopped.
        unrouted = conn.execute(
            sa.text(
                "SELECT r.id, r.reference, r.status FROM requests r WHERE NOT EXISTS "
                "(SELECT 1 FROM audit_events a WHERE a.reference = r.reference "
                "AND a.action = 'request.routed') LIMIT 10"
            )
        ).all()
        result.unrouted = [
            {
                "reference": row.reference,
                "status": row.status,
                "actions": conn.scalars(
                    sa.text("SELECT action FROM audit_events WHERE reference = :r ORDER BY seq"),
                    {"r": row.reference},
                ).all(),
                "outbox": [
                    f"{o.task}:{o.status}:{o.attempts}"
                    for o in conn.execute(
                        sa.text("SELECT task, status, attempts FROM outbox WHERE request_id = :i"),
                        {"i": row.id},
                    )
                ],
            }
            for row in unrouted
        ]
        keys = conn.scalar(
            sa.text(
                "SELECT count(*) - count(DISTINCT submission_key_index) FROM requests "
                "WHERE submission_key_index IS NOT NULL"
            )
        )
    # Every 303 wrk saw is a stored request (none lost), and every stored request was routed,
    # once. More may be stored than answered: wrk stops each run with POSTs in flight, which
    # the server finishes after wrk stopped counting, and a connection wrk drops mid-answer is
    # a stored request it never counted; that number is reported, not held to a bound.
    stored, answered = result.requests_stored, result.accepted_total or 0
    result.unanswered = stored - answered
    result.routed_twice, result.routed = int(twice or 0), int(routed or 0)
    result.routed_once = not twice and routed == stored and stored >= answered
    result.duplicates = int(keys or 0)


# --- report ---------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": platform.python_version()}
    for name in ("flask", "flask-wtf", "sqlalchemy", "celery", "kombu", "gunicorn", "psycopg"):
        with contextlib.suppress(Exception):
            found[name] = version(name)
    with contextlib.suppress(Exception):
        found["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[
            1
        ]
    return found


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        model = match.group(1) if match else ""
    return {"cpus": os.cpu_count(), "cpu": model, "load_before": os.getloadavg()[0]}


def print_logs(folder: Path, lines: int = 30) -> None:
    """The end of every service's log in ``folder``, to stderr (a run failed)."""
    for log in sorted(folder.glob("*.log")):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        print(f"--- {log.name}\n{tail}", file=sys.stderr)


def write_results(out: Path, name: str, table: str, report: dict[str, Any]) -> Path:
    """Write ``<name>-<time>.md`` and ``.json`` into ``out``, print both; return the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"{name}-{stamp}.md").write_text(table)
    path = out / f"{name}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(json.dumps(report))
    return path


def plain_cell(value: Any) -> str:
    """A figure as the tables show it: "–" for none, a list as sizes in MiB."""
    if value is None:
        return "–"
    if isinstance(value, list):
        return ", ".join(f"{v:.0f}" for v in value) + " MiB"
    return f"{value}"


def table_lines(
    titles: list[str],
    rows: list[tuple[str, str]],
    columns: list[str],
    cell: Callable[[str, str], str],
) -> list[str]:
    """A Markdown table: one column per target, one row per (label, figure's name)."""
    lines = ["| | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]
    for label, name in rows:
        lines.append(f"| {label} | " + " | ".join(cell(c, name) for c in columns) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    results = {r["target"]: r for r in report["results"]}
    bare = results.get("bare")
    columns = [t for t in TARGETS if t in results]
    title = {
        "bare": "bare Flask-WTF",
        "postgresql": "Intake, PostgreSQL",
        "sqlite": "Intake, SQLite",
    }

    def ratio(value: float | None, base: float | None) -> str:
        return f" ({value / base:.2f}×)" if value and base else ""

    def cell(target: str, name: str) -> str:
        r = results[target]
        base = bare.get(name) if bare and target != "bare" else None
        if name == "accepted_per_s":
            return f"{r[name]:,.0f}{ratio(r[name], base)}"
        if name == "cpu":
            total = r["web_cpu_ms"] + r["worker_cpu_ms"]
            if target == "bare":
                return f"{total:.2f} ms"
            web = ratio(r["web_cpu_ms"], bare["web_cpu_ms"] if bare else None)
            return f"web {r['web_cpu_ms']:.2f}{web} + worker {r['worker_cpu_ms']:.2f} ms"
        return plain_cell(r.get(name))

    rows = [
        ("accepted submissions/s", "accepted_per_s"),
        ("CPU per submission", "cpu"),
        ("HTTP p95 under full load, ms", "http_p95_ms"),
        ("every request stored and routed once", "routed_once"),
        ("backlog drained after load, s", "drain_s"),
        ("paced rate, /s", "paced_per_s"),
        ("submit → queued p50, ms", "queued_p50_ms"),
        ("submit → queued p95, ms", "queued_p95_ms"),
        ("submit → queued max, ms", "queued_max_ms"),
        ("peak RSS, web workers", "web_rss_mib"),
        ("peak RSS, Celery workers", "worker_rss_mib"),
        ("load generator CPU share", "wrk_cpu_share"),
    ]
    lines = [
        f"Pipeline benchmark, {report['date']}: {report['machine']['cpus']} CPUs "
        f"({report['machine']['cpu']}), {report['settings']['seconds']} s per run, "
        f"wrk -t1 -c{report['settings']['connections']}, gunicorn --workers "
        f"{report['settings']['web_workers']}, Celery --concurrency "
        f"{report['settings']['worker_concurrency']}.",
        "",
        *table_lines([title[c] for c in columns], rows, columns, cell),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS)
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--worker-concurrency", type=int, default=2)
    parser.add_argument(
        "--postgres", default=DEFAULT_POSTGRES, help="server URL (a database is created)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="2 s runs: check the benchmark works")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(targets) - set(TARGETS):
        parser.error(f"--targets: unknown {sorted(unknown)}")
    if args.quick:
        args.seconds = 2.0
    if args.seconds <= 0:
        parser.error("--seconds must be positive")

    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "seconds": args.seconds,
            "connections": args.connections,
            "web_workers": args.web_workers,
            "worker_concurrency": args.worker_concurrency,
        },
        "results": [],
    }
    with (
        tempfile.TemporaryDirectory(prefix="intake-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        folder = Path(tmp)
        redis_url = start_redis(folder, stack) if set(targets) - {"bare"} else ""
        for target in targets:
            run_folder = folder / target
            run_folder.mkdir()
            print(f"running {target} ...", file=sys.stderr, flush=True)
            try:
                if target == "bare":
                    result = run_bare(args, run_folder)
                else:
                    result = run_intake(target, args, run_folder, redis_url)
            except Exception:
                print_logs(run_folder)
                raise
            report["results"].append(result.as_dict())
            print(json.dumps(result.as_dict()), file=sys.stderr, flush=True)
    write_results(args.out, "pipeline", markdown(report), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
