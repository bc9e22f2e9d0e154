"""Measure how fast Intake's worker drains a routing backlog, against a bare Celery task.

Target 4 of the performance issue: routing throughput at least 0.5× Celery's own drain rate
for a trivial task, on the same Redis, with the same worker settings. One run:

1. Starts a throwaway Redis with a password (bench/pipeline.py's), and for each Intake target
   a throwaway PostgreSQL database (dropped afterwards) or SQLite file, migrated.
2. **Baseline**: publishes N ``noop`` tasks (``bench/bare_celery.py``: JSON, ``acks_late``,
   the same prefetch multiplier) while no worker runs, then starts ``celery -A
   bench.bare_celery worker -Q routing -c 2`` and times the drain.
3. **Intake**: stores N refill requests through the real submit path in-process
   (``intake.requests.submit.submit_request``: sealed PHI, consents, outbox row, audit event),
   each ``route_request`` published after its commit by the real publisher while no worker
   runs, then starts ``celery -A workers worker -Q routing -c 2`` (bench/pipeline.py's worker,
   consuming the routing queue only, as compose runs the routing pool) and times the drain.
   The team notices it publishes wait on the ``notifications`` queue, consumed by nobody in
   this run: routing is what is measured, and the notices are counted there instead.

Each drain is timed from outside, the same way for both: from the first poll that finds the
queue shorter than N (the worker has started consuming; its start-up is not counted) to the
first that finds it empty with nothing delivered and unacked. Worker CPU is read from /proc
for the worker's process tree over the same interval.

Checks (the run fails if any does not hold): the baseline worker logged N successes; every
stored request is ``queued`` with exactly one ``request.routed`` event; every routing outbox
row is done; each request has one team notice, still pending, and the notifications queue
holds exactly N messages.

    .venv/bin/python bench/routing_drain.py                  # 5,000 tasks, PostgreSQL
    .venv/bin/python bench/routing_drain.py --sqlite         # also Intake on SQLite
    .venv/bin/python bench/routing_drain.py --tasks 200 --out /tmp/x   # what the test runs
    .venv/bin/python bench/routing_drain.py --profile 500    # then cProfile a solo worker

Results go to ``bench/results/routing-drain-<time>.md`` and ``.json`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pstats
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import (
    DEFAULT_POSTGRES,
    ROOT,
    Process,
    free_port,
    intake_env,
    machine,
    migrate,
    plain_cell,
    postgres_database,
    print_logs,
    start_redis,
    table_lines,
    versions,
    worker_argv,
    write_results,
)

ROUTING, NOTIFICATIONS = "routing", "notifications"
# kombu's Redis transport keeps each delivered, not yet acknowledged message in this hash.
UNACKED = "unacked"
POLL_SECONDS = 0.01
# One Redis database per measured worker, so no run sees another's queues.
REDIS_DB = {"baseline": 1, "postgresql": 2, "sqlite": 3}
TARGETS = ("postgresql", "sqlite")
TITLE = {
    "baseline": "bare Celery noop",
    "postgresql": "Intake, PostgreSQL",
    "sqlite": "Intake, SQLite",
}
# The refill form bench/wrk/submit.lua sends, at each of the pharmacy's locations in turn.
REFILL_FORM = {
    "first_name": "Maria", "last_name": "Nunez-Ortiz", "date_of_birth": "1980-03-15",
    "phone": "(202) 555-0143", "email": "maria@example.com", "contact_method": "sms",
    "rx_numbers": "1234567\n7654321", "medication": "Immune globulin", "fulfillment": "pickup",
    "address": "", "needed_by": "", "notes": "", "consent_privacy": "y", "consent_contact": "y",
}  # fmt: skip
LOCATIONS = ("main", "north", "infusion")


def redis_db(url: str, number: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{number}"


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


# --- timing ---------------------------------------------------------------------------------


@dataclass
class Drain:
    tasks: int
    seconds: float
    worker_cpu_s: float

    @property
    def per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "seconds": round(self.seconds, 3),
            "tasks_per_s": round(self.per_s, 1),
            "worker_cpu_ms_per_task": round(1000 * self.worker_cpu_s / max(self.tasks, 1), 3),
            "worker_cpu_share": round(self.worker_cpu_s / self.seconds, 2)
            if self.seconds
            else None,
        }


def time_drain(client: Any, worker: Process, count: int, timeout: float) -> Drain:
    """Time ``worker`` from taking its first message of ``count`` to the queue drained, acked."""
    deadline = time.monotonic() + timeout
    started: float | None = None
    cpu_before = 0.0
    while True:
        pipe = client.pipeline(transaction=False)
        pipe.llen(ROUTING)
        pipe.hlen(UNACKED)
        waiting, unacked = pipe.execute()
        moment = time.monotonic()
        if started is None and waiting < count:
            started, cpu_before = moment, worker.cpu_seconds()
        if started is not None and waiting == 0 and unacked == 0:
            return Drain(count, moment - started, worker.cpu_seconds() - cpu_before)
        if not worker.alive():
            raise RuntimeError(f"{worker.name} exited:\n{worker.tail()}")
        if moment > deadline:
            raise RuntimeError(
                f"timed out after {timeout:.0f} s: {waiting} queued, {unacked} unacked"
            )
        time.sleep(POLL_SECONDS)


# --- baseline -------------------------------------------------------------------------------


def run_baseline(args: argparse.Namespace, folder: Path, redis_url: str) -> dict[str, Any]:
    from bench import bare_celery

    url = redis_db(redis_url, REDIS_DB["baseline"])
    bare_celery.app.conf.broker_url = url
    with bare_celery.app.producer_or_acquire() as producer:
        for number in range(args.tasks):
            bare_celery.noop.apply_async(args=[number], producer=producer)
    client = redis_client(url)
    if (queued := client.llen(ROUTING)) != args.tasks:
        raise RuntimeError(f"baseline: {queued} messages queued, not {args.tasks}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    env |= {"PYTHONPATH": str(ROOT), "CELERY_BROKER_URL": url, "HOME": str(folder)}
    argv = worker_argv(args.worker_concurrency, "-Q", ROUTING, app="bench.bare_celery")
    worker = Process("baseline-worker", argv, env, folder)
    try:
        drain = time_drain(client, worker, args.tasks, args.timeout)
        rss = worker.peak_rss_mib()
    finally:
        worker.stop()
    succeeded = worker.log.read_text(errors="replace").count("] succeeded in ")
    if succeeded != args.tasks:
        raise RuntimeError(f"baseline: {succeeded} tasks succeeded, not {args.tasks}")
    client.close()
    return {"target": "baseline", **drain.as_dict(), "succeeded": succeeded, "worker_rss_mib": rss}


# --- Intake ---------------------------------------------------------------------------------


def seed(count: int) -> dict[str, Any]:
    """Submit ``count`` refill requests as POST /refill does, each routing task published.

    Runs in its own process with the Intake environment (``--seed``): the form is validated by
    the real RefillForm once, then each request is stored by ``submit_request`` with its own
    submission key and published by ``outbox.publish_outgoing``, as the view does.
    """
    from werkzeug.datastructures import MultiDict

    from intake import create_app
    from intake.crypto.phi import ip_pseudonym
    from intake.extensions import db
    from intake.patient.forms import RefillForm
    from intake.requests import outbox
    from intake.requests.consents import accepted_consents
    from intake.requests.submit import Submission, submit_request

    app = create_app()
    celery = app.extensions["celery"]
    keyring = app.extensions["intake.keyring"]
    documents = {}
    for location in LOCATIONS:
        with app.test_request_context("/refill", method="POST"):
            form = RefillForm(
                formdata=MultiDict({**REFILL_FORM, "location": location}), meta={"csrf": False}
            )
            if not form.validate():
                raise RuntimeError(f"the bench's refill form does not validate: {form.errors}")
            documents[location] = dict(form.cleaned)
    published = 0
    started = time.monotonic()
    with app.app_context():
        consents = accepted_consents("refill", "en")
        ip_hmac = ip_pseudonym(keyring, "127.0.0.1")
        for number in range(count):
            location = LOCATIONS[number % len(LOCATIONS)]
            accepted = submit_request(
                db.session,
                keyring,
                Submission(
                    kind="refill",
                    language="en",
                    phi=documents[location],
                    consents=consents,
                    location=location,
                    ip_hmac=ip_hmac,
                    submission_key=secrets.token_urlsafe(24),
                ),
            )
            published += outbox.publish_outgoing(db.session, accepted.outgoing)
    return {
        "published": published,
        "seconds": round(time.monotonic() - started, 1),
        # What the baseline must match (bench/bare_celery.py): checked by the caller.
        "celery": task_settings(celery.conf),
    }


def task_settings(conf: Any) -> dict[str, Any]:
    """The Celery settings that shape a task's path through the worker."""
    return {
        "task_acks_late": conf.task_acks_late,
        "task_reject_on_worker_lost": conf.task_reject_on_worker_lost,
        "worker_prefetch_multiplier": conf.worker_prefetch_multiplier,
        "task_serializer": conf.task_serializer,
        "visibility_timeout": conf.broker_transport_options.get("visibility_timeout"),
    }


def seed_in_process(env: dict[str, str], folder: Path, count: int) -> dict[str, Any]:
    done = subprocess.run(  # noqa: S603 - our own script
        [sys.executable, str(Path(__file__).resolve()), "--seed", str(count)],
        env={**env, "PYTHONPATH": str(ROOT)}, cwd=folder,
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    (folder / "seed.log").write_text(done.stdout + done.stderr)
    line = next((x for x in done.stdout.splitlines() if x.startswith("SEED ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"seeding failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(line[len("SEED ") :]))


def baseline_matches(intake_conf: dict[str, Any]) -> None:
    from bench import bare_celery

    ours = task_settings(bare_celery.app.conf)
    if ours != intake_conf:
        raise RuntimeError(f"bench/bare_celery.py {ours} no longer matches Intake {intake_conf}")


def check_routed(engine: sa.Engine, count: int) -> dict[str, Any]:
    """Every request queued and routed exactly once; its team notice written, not yet sent."""
    with engine.connect() as conn:

        def scalar(sql: str) -> int:
            return int(conn.scalar(sa.text(sql)) or 0)

        statuses = dict(
            conn.execute(sa.text("SELECT status, count(*) FROM requests GROUP BY status")).all()
        )
        outbox = {
            f"{task}:{status}": int(n)
            for task, status, n in conn.execute(
                sa.text("SELECT task, status, count(*) FROM outbox GROUP BY task, status")
            )
        }
        found = {
            "requests": sum(statuses.values()),
            "statuses": {k: int(v) for k, v in statuses.items()},
            "submitted_events": scalar(
                "SELECT count(*) FROM audit_events WHERE action = 'request.submitted'"
            ),
            "routed_events": scalar(
                "SELECT count(*) FROM audit_events WHERE action = 'request.routed'"
            ),
            "routed_references": scalar(
                "SELECT count(DISTINCT reference) FROM audit_events WHERE action = 'request.routed'"
            ),
            "outbox": outbox,
        }
        span = conn.execute(
            sa.text(
                "SELECT min(created_at), max(created_at) FROM audit_events "
                "WHERE action = 'request.routed'"
            )
        ).one()
    found["routed_once"] = (
        found["requests"] == found["submitted_events"] == count
        and found["statuses"] == {"queued": count}
        and found["routed_events"] == found["routed_references"] == count
        and outbox == {"route_request:done": count, "notify_team:pending": count}
    )
    if span[0] is not None and span[1] is not None:
        first, last = (
            datetime.fromisoformat(v) if isinstance(v, str) else v for v in (span[0], span[1])
        )
        found["audit_span_s"] = round((last - first).total_seconds(), 3)
    return found


def run_intake(
    target: str, args: argparse.Namespace, folder: Path, redis_url: str
) -> dict[str, Any]:
    url = redis_db(redis_url, REDIS_DB[target])
    with contextlib.ExitStack() as stack:
        if target == "postgresql":
            database_url = stack.enter_context(postgres_database(args.postgres))
        else:
            database_url = f"sqlite:///{folder / 'intake.sqlite3'}"
        env = intake_env(target, folder, url, database_url, free_port())
        env.pop("BENCH_SIGNING_KEY")  # no signer here: nothing signs a checkpoint in this run
        migrate(env, folder)
        seeded = seed_in_process(env, folder, args.tasks)
        baseline_matches(seeded["celery"])
        client = redis_client(url)
        stack.callback(client.close)
        if (queued := client.llen(ROUTING)) != args.tasks or seeded["published"] != args.tasks:
            raise RuntimeError(f"{target}: {queued} routing tasks queued, not {args.tasks}")
        worker = Process("worker", worker_argv(args.worker_concurrency, "-Q", ROUTING), env, folder)
        stack.callback(worker.stop)
        drain = time_drain(client, worker, args.tasks, args.timeout)
        rss = worker.peak_rss_mib()
        worker.stop()
        engine = sa.create_engine(database_url)
        stack.callback(engine.dispose)
        checks = check_routed(engine, args.tasks)
        checks["notifications_queued"] = int(client.llen(NOTIFICATIONS))
        checks["routing_queued"] = int(client.llen(ROUTING))
        checks["routed_once"] = (
            checks["routed_once"]
            and checks["notifications_queued"] == args.tasks
            and checks["routing_queued"] == 0
        )
        result = {
            "target": target,
            **drain.as_dict(),
            "seed_s": seeded["seconds"],
            **checks,
            "worker_rss_mib": rss,
        }
        if args.profile:
            result["profile"] = profile_solo(env, folder, client, engine, args)
        return result


# --- profile --------------------------------------------------------------------------------


PROFILE_RUNNER = """
import cProfile, sys
from celery.bin.celery import main
sys.argv = ["celery", "-A", "workers", "worker", "-P", "solo", "-Q", "routing",
            "--loglevel", "INFO"]
profile = cProfile.Profile()
try:
    profile.runcall(main)
except SystemExit:
    pass
finally:
    profile.dump_stats("worker.prof")
"""


def profile_solo(
    env: dict[str, str], folder: Path, client: Any, engine: sa.Engine, args: argparse.Namespace
) -> dict[str, Any]:
    """Route ``--profile`` more requests with one solo worker under cProfile; the hot spots."""
    seed_in_process(env, folder, args.profile)
    argv = [sys.executable, "-c", PROFILE_RUNNER]
    worker = Process("profiled-worker", argv, env, folder)
    try:
        drain = time_drain(client, worker, args.profile, args.timeout)
    finally:
        worker.stop()
    stats_file = folder / "worker.prof"
    if not stats_file.exists():
        raise RuntimeError(f"the profiled worker wrote no profile:\n{worker.tail()}")
    text = io.StringIO()
    stats = pstats.Stats(str(stats_file), stream=text)
    breakdown = profile_breakdown(stats, args.profile)
    for row in breakdown:
        print(f"{row['ms_per_task']:8.3f} ms {row['calls']:8d} calls  {row['what']}", file=text)
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(30)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"routing-drain-{stamp}.profile.txt"
    path.write_text(text.getvalue())
    return {"tasks": args.profile, **drain.as_dict(), "breakdown": breakdown, "stats": str(path)}


# Where a routing task's time goes (wall time under cProfile, so waits on PostgreSQL count):
# (what, the file's path ends with, function name). Nested rows are part of the row above.
HOT_SPOTS = (
    ("the drain loop, per message (idle polls included)", "celery/worker/loops.py", "asynloop"),
    ("Celery's trace of one task (task included)", "celery/app/trace.py", "trace_task"),
    ("workers.tasks.route_request", "workers/tasks.py", "route_request"),
    ("  routing.route_received (a skip or a batch)", "requests/routing.py", "route_received"),
    ("    a batch (one transaction)", "intake/requests/routing.py", "_route_batch"),
    ("      one request's decision and update", "intake/requests/routing.py", "_route_row"),
    ("      record_events", "intake/audit/chain.py", "record_events"),
    ("        chain lock (pg_advisory_xact_lock)", "intake/audit/chain.py", "_lock_chain"),
    ("        anchor: prepared lines, fsync'd", "intake/audit/anchor.py", "prepare_events"),
    ("      outbox.mark_done_for (routing rows)", "intake/requests/outbox.py", "mark_done_for"),
    ("      commit", "sqlalchemy/orm/session.py", "commit"),
    ("        anchor: committed lines", "intake/audit/anchor.py", "_confirm"),
    ("    plan_language", "intake/requests/routing.py", "plan_language"),
    ("  publish notify_team to Redis", "intake/requests/outbox.py", "publish_outgoing"),
    ("  structlog lines", "structlog/_base.py", "_proxy_to_logger"),
    ("  Prometheus inc", "prometheus_client/metrics.py", "inc"),
    ("  Prometheus observe", "prometheus_client/metrics.py", "observe"),
    ("SQL statements (SQLAlchemy Connection.execute)", "sqlalchemy/engine/base.py", "execute"),
    ("waiting on PostgreSQL (psycopg wait)", "psycopg/connection.py", "wait"),
    ("fsync", "~", "<built-in method posix.fsync>"),
    ("acks (kombu Message.ack)", "kombu/message.py", "ack"),
)


def profile_breakdown(stats: pstats.Stats, tasks: int) -> list[dict[str, Any]]:
    """Milliseconds per task in each of HOT_SPOTS (the outermost frame of that name)."""
    table = stats.stats  # type: ignore[attr-defined]
    rows = []
    for what, suffix, name in HOT_SPOTS:
        found = [
            (calls, cumulative)
            for (path, _line, function), (_cc, calls, _tt, cumulative, _callers) in table.items()
            if function == name and path.endswith(suffix)
        ]
        if found:
            calls, cumulative = max(found, key=lambda pair: pair[1])
            rows.append(
                {"what": what, "calls": calls, "ms_per_task": round(1000 * cumulative / tasks, 3)}
            )
    return rows


# --- report ---------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    results = {r["target"]: r for r in report["results"]}
    base = results["baseline"]["tasks_per_s"]
    columns = [t for t in ("baseline", *TARGETS) if t in results]
    settings = report["settings"]

    def cell(target: str, name: str) -> str:
        r = results[target]
        value = r.get(name)
        if name == "tasks_per_s":
            return f"{value:,.1f}" + (f" ({value / base:.2f}×)" if target != "baseline" else "")
        if name == "worker_cpu_ms_per_task" and target != "baseline":
            return f"{value:.2f} ({value / results['baseline'][name]:.1f}×)"
        return plain_cell(value)

    rows = [
        ("tasks drained/s", "tasks_per_s"),
        ("drain time, s", "seconds"),
        ("worker CPU per task, ms", "worker_cpu_ms_per_task"),
        ("worker CPU share (of 1 core)", "worker_cpu_share"),
        ("routing span in the audit trail, s", "audit_span_s"),
        ("every request routed once, notices queued", "routed_once"),
        ("peak RSS, worker processes", "worker_rss_mib"),
    ]
    lines = [
        f"Routing drain benchmark, {report['date']}: {report['machine']['cpus']} CPUs "
        f"({report['machine']['cpu']}, load {report['machine']['load_before']:.2f} before), "
        f"{settings['tasks']:,} tasks published before the worker started, "
        f"`-Q routing -c {settings['worker_concurrency']}`, Redis with a password.",
        "",
        *table_lines([TITLE[c] for c in columns], rows, columns, cell),
        "",
    ]
    for target in columns[1:]:
        ratio = results[target]["tasks_per_s"] / base if base else 0.0
        verdict = "met" if ratio >= 0.5 else "not met"
        lines.append(f"- {TITLE[target]}: ratio {ratio:.2f} (target ≥ 0.5: {verdict})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per drain")
    parser.add_argument("--sqlite", action="store_true", help="also Intake on SQLite (with Redis)")
    parser.add_argument("--worker-concurrency", type=int, default=2)
    parser.add_argument(
        "--postgres", default=DEFAULT_POSTGRES, help="server URL (a database is created)"
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per drain at most")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="then route N more with a solo worker under cProfile (per Intake target)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # the seeding subprocess
    args = parser.parse_args(argv)
    if args.seed is not None:
        print("SEED " + json.dumps(seed(args.seed)), flush=True)
        return 0
    if args.tasks <= 0:
        parser.error("--tasks must be positive")
    targets = ["postgresql", *(["sqlite"] if args.sqlite else [])]
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "tasks": args.tasks,
            "worker_concurrency": args.worker_concurrency,
            "worker_prefetch_multiplier": 4,
            "poll_seconds": POLL_SECONDS,
        },
        "results": [],
    }
    with (
        tempfile.TemporaryDirectory(prefix="intake-drain-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        folder = Path(tmp)
        redis_url = start_redis(folder, stack)
        for target in ("baseline", *targets):
            run_folder = folder / target
            run_folder.mkdir()
            print(f"running {target} ...", file=sys.stderr, flush=True)
            try:
                if target == "baseline":
                    result = run_baseline(args, run_folder, redis_url)
                else:
                    result = run_intake(target, args, run_folder, redis_url)
            except Exception:
                print_logs(run_folder)
                raise
            report["results"].append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    base = report["results"][0]["tasks_per_s"]
    report["ratios"] = {
        r["target"]: round(r["tasks_per_s"] / base, 3) for r in report["results"][1:] if base
    }
    write_results(args.out, "routing-drain", markdown(report), report)
    failed = [r["target"] for r in report["results"][1:] if not r["routed_once"]]
    if failed:
        print(f"exactly-once checks failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
