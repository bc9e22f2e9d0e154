"""A routing batch revokes the queued tasks of the requests it routed, and workers drop them
unrun; the revoke never makes a task wait, and a revoke that is lost loses nothing.

Real parts: a redis-server of the test's own (stopped and started again), real worker
processes, an SMTP server receiving the teams' notices.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request
from tests.conftest import reference_from
from tests.workers.conftest import pipeline_settings, wait_until
from workers.publish import task_id

BURST = 20


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server, smtp_server):
    smtp_url, _mailbox = smtp_server
    return pipeline_settings(base_settings, database_url, tmp_path, redis_server.url, smtp_url)


def burst(app, patient, count: int) -> dict[str, str]:
    """``count`` contact requests submitted while no worker runs: reference -> request id."""
    references = [reference_from(patient.contact(topic="copay")) for _ in range(count)]
    with app.app_context():
        found = db.session.execute(
            sa.select(Request.reference, Request.id).where(Request.reference.in_(references))
        ).all()
    return dict(found)


def routing_task_ids(app, request_ids) -> dict[str, str]:
    """The Celery id of each request's routing task, as published: request id -> task id."""
    with app.app_context():
        rows = db.session.execute(
            sa.select(OutboxMessage.request_id, OutboxMessage.id).where(
                OutboxMessage.task == "route_request", OutboxMessage.request_id.in_(request_ids)
            )
        ).all()
    return {request_id: task_id("route_request", request_id, row_id) for request_id, row_id in rows}


def routed_once(app, references) -> bool:
    with app.app_context():
        statuses = dict(
            db.session.execute(
                sa.select(Request.reference, Request.status).where(
                    Request.reference.in_(references)
                )
            ).all()
        )
        events = Counter(
            db.session.execute(
                sa.select(AuditEvent.reference).where(AuditEvent.action == "request.routed")
            ).scalars()
        )
    return all(statuses[r] == "queued" for r in references) and all(
        events[r] == 1 for r in references
    )


def batched_in_log(worker) -> set[str]:
    """References the worker routed in another request's batch (its request_routed lines)."""
    found = set()
    for line in worker.log_path.read_text().splitlines():
        if '"request_routed"' in line:
            entry = json.loads(line)
            if entry.get("batched"):
                found.add(entry["reference"])
    return found


def test_a_burst_routed_in_a_batch_leaves_the_other_tasks_revoked_and_unrun(
    app, patient, celery_processes, settings, smtp_server
):
    """Before: each of the burst's routing tasks was delivered to a pool process, ran, and
    found its request routed by the first task's batch. Now those are revoked by the batch
    and the worker drops them on receipt: fewer tasks run than were queued, the revoked ones
    are exactly the requests routed in another's batch, and each team is still told once."""
    _url, mailbox = smtp_server
    requests = burst(app, patient, BURST)
    tasks = routing_task_ids(app, requests.values())
    worker = celery_processes(settings).wait_ready()
    wait_until(lambda: routed_once(app, requests), 30, message="the burst routed")
    wait_until(lambda: len(mailbox.messages) >= BURST, 30, message="every team notified")

    celery = app.extensions["celery"]
    batched = batched_in_log(worker)
    expected = {tasks[requests[reference]] for reference in batched}
    with app.app_context():

        def revoked() -> set[str]:
            replies = celery.control.inspect(timeout=2).revoked() or {}
            return {task for ids in replies.values() for task in ids}

        flagged = wait_until(
            lambda: (found := revoked()) >= expected and found, 20, message="revoked"
        )
        stats = celery.control.inspect(timeout=2).stats() or {}
    ran = sum(s["total"].get("workers.tasks.route_request", 0) for s in stats.values())

    assert batched, "the burst was routed one request per task"
    assert flagged == expected  # the batches' own tasks are not revoked, nor anything else
    assert ran < BURST, f"all {BURST} routing tasks ran"
    assert len(mailbox.messages) == BURST
    # No line per dropped task, and none of Celery's "no result backend" warnings per revoke.
    log = worker.log_path.read_text()
    assert "Discarding revoked task" not in log and "Failed to mark task" not in log


def revokes_heard(listener) -> list[str]:
    """Task ids in the revoke broadcasts ``listener`` (subscribed to the pidbox) has received."""
    found: list[str] = []
    while (message := listener.get_message(timeout=0.2)) is not None:
        if message["type"] != "pmessage":
            continue
        envelope = json.loads(message["data"])
        body = json.loads(base64.b64decode(envelope["body"]))
        if body.get("method") == "revoke":
            found += body["arguments"]["task_id"]
    return found


def test_a_revoke_never_waits_on_a_dead_broker_and_is_sent_once_it_is_back(app, redis_server):
    """kombu retries a control message until the broker answers. With Redis stopped, revoking
    must return at once, however often it is asked (the routing task that asks has committed
    and must finish); the revoke goes out when Redis is back."""
    publisher = app.extensions["intake.publisher"]
    assert publisher.revokes
    listener = redis_server.client().pubsub()
    listener.psubscribe("*pidbox*")
    assert publisher.revoke(["route_request-1-before"])
    wait_until(lambda: "route_request-1-before" in revokes_heard(listener), 20, message="sent")
    redis_server.stop()

    done = threading.Event()
    taken: list[bool] = []

    def ask() -> None:
        taken.extend(publisher.revoke([f"route_request-{n}-down"]) for n in range(200))
        done.set()

    threading.Thread(target=ask, daemon=True).start()
    assert done.wait(30), "revoke waited on the dead broker"
    assert taken[0] and not all(taken), "every revoke was kept while the broker was down"

    redis_server.start()  # on the same port
    listener = redis_server.client().pubsub()
    listener.psubscribe("*pidbox*")
    heard: list[str] = []

    def sent() -> bool:
        publisher.revoke(["route_request-2-after"])
        heard.extend(revokes_heard(listener))
        return "route_request-2-after" in heard

    wait_until(sent, 60, message="a revoke sent once Redis is back")


def test_the_embedded_broker_sends_no_revokes(app, settings):
    """The filesystem broker would keep a file per revoke for every worker that ever
    listened, dead or alive: no revokes there (its tasks then run and stop at one read)."""
    from intake import create_app

    embedded = create_app(settings.replace(redis_url=None, smtp_url=None))
    publisher = embedded.extensions["intake.publisher"]
    control = embedded.extensions["intake.settings"].data_dir / "broker" / "control"
    before = sorted(control.rglob("*"))
    started = {thread.name for thread in threading.enumerate()}

    assert not publisher.revokes
    assert publisher.revoke(["route_request-1-x"]) is False
    assert "intake-revoke" not in {t.name for t in threading.enumerate()} - started
    assert sorted(control.rglob("*")) == before


def test_a_task_id_is_its_outbox_row_and_subject_never_the_request_data(app, patient):
    """The id is what a revoke names: the same for every publish of a row, different for
    every row and subject (a restored database reusing row numbers names other requests), and
    ids only: no reference, no PHI."""
    reference = reference_from(patient.contact(topic="copay"))
    with app.app_context():
        row = db.session.execute(
            sa.select(OutboxMessage.id, OutboxMessage.request_id).where(
                OutboxMessage.task == "route_request"
            )
        ).one()
    first = task_id("route_request", row.request_id, row.id)

    assert first == task_id("route_request", row.request_id, row.id)
    assert first != task_id("route_request", "another-request", row.id)
    assert first != task_id("notify_team", row.request_id, row.id)
    assert reference not in first and "Maria" not in first
