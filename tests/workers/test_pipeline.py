"""The pipeline with real parts: redis-server, Celery worker and beat processes, an SMTP server.

Faults are real too: Redis is stopped and started again, a worker is SIGKILLed mid-stream.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request
from tests.conftest import reference_from
from tests.intake.crypto.test_phi_canary import CONTACT_CANARIES, REFILL_CANARIES, leaked
from tests.workers.conftest import pipeline_settings, wait_until

# One request per rule of config/routing.toml: (form, fields, language, team, priority, sla)
RULE_CASES = [
    ("contact", {"topic": "side_effect"}, "en", "clinical", "urgent", timedelta(hours=1)),
    ("contact", {"topic": "specialist"}, "en", "ivig", "high", timedelta(hours=4)),
    ("contact", {"topic": "copay"}, "en", "benefits", "normal", None),
    ("contact", {"topic": "insurance"}, "es", "benefits", "normal", None),
    ("refill", {"location": "infusion"}, "en", "infusion", "high", timedelta(hours=8)),
    ("refill", {"location": "north"}, "es", "bilingual", "normal", None),
    ("contact", {"topic": "question"}, "es", "bilingual", "normal", None),
    ("refill", {"location": "north"}, "en", "refills-north", "normal", None),
    ("refill", {"location": "main"}, "en", "refills-main", "normal", None),
    ("contact", {"topic": "transfer"}, "en", "patient-services", "normal", None),
]


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server, smtp_server):
    smtp_url, _mailbox = smtp_server
    return pipeline_settings(base_settings, database_url, tmp_path, redis_server.url, smtp_url)


def submit(patient, form: str, fields: dict, language: str) -> str:
    response = getattr(patient, form)(lang=language, **fields)
    return reference_from(response)


def rows(app) -> dict[str, Request]:
    with app.app_context():
        found = db.session.execute(sa.select(Request)).scalars().all()
        db.session.expunge_all()
        return {r.reference: r for r in found}


def routed_events(app) -> Counter[str]:
    with app.app_context():
        refs = db.session.execute(
            sa.select(AuditEvent.reference).where(AuditEvent.action == "request.routed")
        ).scalars()
        return Counter(refs)


def all_queued(app, references) -> bool:
    current = rows(app)
    return all(current[r].status == "queued" for r in references)


def test_every_rule_routes_to_its_team_with_a_notification(
    app, patient, celery_processes, settings, smtp_server
):
    _url, mailbox = smtp_server
    celery_processes(settings).wait_ready()
    cases = {
        submit(patient, form, fields, lang): (team, priority, sla)
        for form, fields, lang, team, priority, sla in RULE_CASES
    }
    wait_until(lambda: all_queued(app, cases), 30, message="every request queued")
    current = rows(app)
    for reference, (team, priority, sla) in cases.items():
        row = current[reference]
        assert (row.team, row.priority) == (team, priority), reference
        assert row.sla_due_at is not None and row.sla_due_at > row.created_at
        if sla is not None:
            assert abs((row.sla_due_at - row.routed_at) - sla) < timedelta(seconds=1)
    assert routed_events(app) == Counter({r: 1 for r in cases})

    wait_until(lambda: len(mailbox.messages) >= len(cases), 30, message="team e-mails")
    time.sleep(1)
    assert len(mailbox.messages) == len(cases)
    by_reference = {}
    for message in mailbox.messages:
        body = message.get_payload(decode=True).decode()
        reference = next(r for r in cases if r in body)
        by_reference[reference] = message
        assert message["To"] == f"{cases[reference][0]}@pharmacy.test"
        assert f"/staff/requests/{reference}" in body
        assert "Maria" not in body and "Núñez" not in body and "1980-03-15" not in body
    assert set(by_reference) == set(cases)


ON_POSTGRESQL = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
ON_SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@ON_POSTGRESQL
def test_redis_down_delays_requests_but_loses_none(
    app, patient, celery_processes, settings, redis_server
):
    worker = celery_processes(settings).wait_ready()
    celery_processes(settings, "beat")
    warmup = submit(patient, "refill", {}, "en")
    wait_until(lambda: all_queued(app, [warmup]), 30, message="warm-up routed")
    # Redis goes away whatever the worker holds (the warm-up's notice may be in flight): the
    # same worker carries on once it is back (workers.redis_broker).
    redis_server.stop()
    started = time.monotonic()
    references = [submit(patient, "contact", {"topic": "question"}, "en") for _ in range(50)]
    assert time.monotonic() - started < 30, "patients must not wait on a dead broker"
    assert len(set(references)) == 50
    time.sleep(2)
    assert all(r.status == "received" for ref, r in rows(app).items() if ref in references)

    redis_server.start()
    back = time.monotonic()
    wait_until(lambda: all_queued(app, references), 60, 0.5, "all 50 routed after Redis is back")
    assert time.monotonic() - back < 60
    events = routed_events(app)
    assert all(events[r] == 1 for r in references), "each request routed exactly once"
    assert worker.process.poll() is None, "the worker survived the outage"
    assert b"Unrecoverable error" not in worker.log_path.read_bytes()
    with app.app_context():
        pending = db.session.scalar(
            sa.select(sa.func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.task == "route_request", OutboxMessage.status == "pending")
        )
    assert pending == 0


@ON_POSTGRESQL
def test_a_killed_worker_loses_nothing_and_duplicates_nothing(
    app, patient, celery_processes, settings, smtp_server
):
    _url, mailbox = smtp_server
    references = [submit(patient, "refill", {}, "en") for _ in range(120)]

    first = celery_processes(settings).wait_ready()

    def some_routed() -> bool:
        return sum(1 for r in rows(app).values() if r.status == "queued") >= 5

    wait_until(some_routed, 30, 0.02, "the first worker to route some requests")
    first.kill()
    done_before = sum(1 for r in rows(app).values() if r.status == "queued")
    assert done_before < len(references), "the worker was killed after finishing everything"

    second = celery_processes(settings).wait_ready()
    beat = celery_processes(settings, "beat")

    def explain() -> str:
        with app.app_context():
            statuses = Counter(r.status for r in rows(app).values())
            outbox = db.session.execute(
                sa.select(OutboxMessage.task, OutboxMessage.status, sa.func.count()).group_by(
                    OutboxMessage.task, OutboxMessage.status
                )
            ).all()
        tails = "\n".join(process.tail() for process in (first, second, beat))
        return f"requests {dict(statuses)}, outbox {outbox}, mails {len(mailbox.messages)}\n{tails}"

    # Generous waits: this test is about losing and duplicating nothing, not about speed (the
    # benchmark measures that); on a slow CI machine the redeliveries and sweeps take a while.
    wait_until(lambda: all_queued(app, references), 180, 0.5, "every request routed", explain)
    events = routed_events(app)
    assert [r for r in references if events[r] != 1] == []

    wait_until(
        lambda: len(mailbox.messages) >= len(references), 120, 0.5, "every notification", explain
    )
    time.sleep(2)
    ids: dict[str, set[str]] = {r: set() for r in references}
    deliveries: Counter[str] = Counter()
    for message, body in zip(mailbox.messages, mailbox.bodies(), strict=True):
        reference = next(r for r in references if r in body)
        ids[reference].add(message["Message-ID"])
        deliveries[reference] += 1
    assert [r for r in references if len(ids[r]) != 1] == [], "one e-mail per request"
    # A send the killed worker could not record (the server took the message, the worker died
    # before it wrote so) is sent again, under the same Message-ID: at most one per process.
    assert sum(count - 1 for count in deliveries.values()) <= 2


def test_a_notification_published_twice_is_sent_once_even_while_the_first_is_sending(
    app, patient, celery_processes, settings, slow_smtp_server
):
    """The sweep republishes a row whose send is still under way: the second worker leaves it."""
    mailbox = slow_smtp_server
    reference = submit(patient, "contact", {"topic": "copay"}, "en")
    request_id = rows(app)[reference].id
    celery_processes(settings.replace(smtp_url=mailbox.url)).wait_ready()
    wait_until(lambda: mailbox.started, 30, 0.05, message="the first send to begin")
    with app.app_context():
        outbox_id = db.session.scalar(
            sa.select(OutboxMessage.id).where(
                OutboxMessage.request_id == request_id, OutboxMessage.task == "notify_team"
            )
        )
        celery = app.extensions["celery"]
        for _ in range(3):
            celery.send_task("workers.tasks.notify_team", args=[request_id, outbox_id])
    wait_until(lambda: mailbox.messages, 30, message="notified")
    time.sleep(mailbox.delay * 2 + 2)
    assert len(mailbox.messages) == 1
    with app.app_context():
        row = db.session.get(OutboxMessage, outbox_id)
        assert row is not None and row.status == "done"
        sent = db.session.scalar(
            sa.select(sa.func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "notification.sent", AuditEvent.reference == reference)
        )
    assert sent == 1


def test_the_same_task_delivered_twice_routes_and_notifies_once(
    app, patient, celery_processes, settings, smtp_server
):
    _url, mailbox = smtp_server
    reference = submit(patient, "contact", {"topic": "side_effect"}, "en")
    request_id = rows(app)[reference].id
    with app.app_context():
        celery = app.extensions["celery"]
        for _ in range(3):
            celery.send_task("workers.tasks.route_request", args=[request_id])
    celery_processes(settings).wait_ready()
    wait_until(lambda: all_queued(app, [reference]), 30, message="routed")
    wait_until(lambda: mailbox.messages, 30, message="notified")
    time.sleep(3)
    assert routed_events(app)[reference] == 1
    assert len(mailbox.messages) == 1


def redis_contents(server) -> list[bytes]:
    """Every key and value in Redis, with Celery message bodies base64-decoded."""
    found: list[bytes] = []
    with server.client() as client:
        for key in client.scan_iter(count=1000):
            found.append(key)
            kind = client.type(key).decode()
            values: list[bytes] = []
            if kind == "string":
                values = [client.get(key) or b""]
            elif kind == "list":
                values = client.lrange(key, 0, -1)
            elif kind == "hash":
                values = [v for pair in client.hgetall(key).items() for v in pair]
            elif kind == "set":
                values = list(client.smembers(key))
            elif kind == "zset":
                values = list(client.zrange(key, 0, -1))
            dump = client.dump(key)
            values.append(dump or b"")
            for value in values:
                found.append(value)
                try:
                    body = json.loads(value)
                except (ValueError, UnicodeDecodeError):
                    continue
                candidates = [body] + (body if isinstance(body, list) else [])
                for item in candidates:
                    if isinstance(item, dict) and isinstance(item.get("body"), str):
                        found.append(base64.b64decode(item["body"]))
    return found


def test_no_phi_in_redis_messages_worker_logs_or_emails(
    app, patient, celery_processes, settings, redis_server, smtp_server
):
    _url, mailbox = smtp_server
    # Published but never consumed: the messages stay in Redis for inspection.
    references = [
        reference_from(patient.refill(fulfillment="ship", **REFILL_CANARIES)),
        reference_from(patient.contact(**CONTACT_CANARIES)),
    ]
    contents = redis_contents(redis_server)
    assert any(b"route_request" in v for v in contents), "the scan must see the messages"
    assert [v for v in contents if leaked(v)] == []

    worker = celery_processes(settings).wait_ready()
    wait_until(lambda: all_queued(app, references), 30, message="routed")
    wait_until(lambda: len(mailbox.messages) == 2, 30, message="notified")
    assert [v for v in redis_contents(redis_server) if leaked(v)] == []
    assert leaked(worker.log_path.read_bytes()) == []
    assert b"request_routed" in worker.log_path.read_bytes()
    for body in mailbox.bodies():
        assert leaked(body) == []


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (lambda t: t.replace('team = "ivig"', 'team = "nobody"'), "unknown team 'nobody'"),
        (lambda t: t.replace('sla = "4h"', 'sla = "soon"'), "bad SLA 'soon'"),
        (
            lambda t: t.replace(
                'name = "everything else"', 'name = "everything else"\ntopic = "transfer"'
            ),
            "last rule must be a default rule",
        ),
        (
            lambda t: t.replace('topic = ["copay", "insurance"]', 'topic = "side_effect"'),
            "can never match",
        ),
        (lambda t: t + "\n[[rules]]\nteam = 'clinical'\nsla = '1h'\n", "can never match"),
        (lambda t: t.replace("[[rules]]", "[[rules]", 1), "routing.toml"),
        (
            lambda t: t.replace('"team:clinical"', '"team:nobody"'),
            "falls back to unknown team 'nobody' for language needs",
        ),
    ],
)
def test_a_broken_routing_file_stops_the_worker_with_a_clear_message(
    tmp_path, base_settings, celery_processes, mutation, expected
):
    bad = tmp_path / "routing.toml"
    bad.write_text(mutation((Path(__file__).parents[2] / "config" / "routing.toml").read_text()))
    worker = celery_processes(base_settings.replace(routing_file=bad, data_dir=tmp_path / "d"))
    code = worker.process.wait(60)
    output = worker.log_path.read_text()
    assert code != 0
    assert expected in output and f"{bad}:" in output


@ON_SQLITE
def test_the_embedded_broker_routes_with_a_real_worker(app, patient, celery_processes, settings):
    embedded = settings.replace(redis_url=None, smtp_url=None)
    from intake import create_app

    embedded_app = create_app(embedded)
    from tests.conftest import Patient

    embedded_patient = Patient(embedded_app.test_client())
    worker = celery_processes(embedded).wait_ready()
    references = [submit(embedded_patient, "refill", {}, "en") for _ in range(5)]
    wait_until(lambda: all_queued(embedded_app, references), 30, message="embedded routing")
    assert Counter(routed_events(embedded_app)) == Counter({r: 1 for r in references})
    # The notice is a task of its own, sent after the routing commits: wait for it.
    wait_until(
        lambda: b"team_notified" in worker.log_path.read_bytes(), 30, message="team notified"
    )
    assert (Path(embedded.data_dir) / "broker" / "queue").is_dir()
