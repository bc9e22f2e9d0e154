"""Language routing through the real pipeline: patient forms, redis-server, a Celery worker
process and an SMTP server receiving the teams' and the supervisors' e-mails."""

from __future__ import annotations

import time

import pytest

from intake.extensions import db
from tests.intake.crypto.test_phi_canary import CONTACT_CANARIES, leaked
from tests.workers.conftest import pipeline_settings, wait_until
from tests.workers.test_language_routing import (
    SUPERVISORS_EMAIL,
    add_user,
    language_routing_file,
    state,
    submit,
)
from tests.workers.test_pipeline import all_queued, routed_events, rows


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server, smtp_server):
    smtp_url, _mailbox = smtp_server
    return pipeline_settings(
        base_settings,
        database_url,
        tmp_path,
        redis_server.url,
        smtp_url,
        routing_file=language_routing_file(tmp_path),
    )


def test_spanish_and_interpreter_requests_reach_speakers_or_the_supervisors(
    app, patient, celery_processes, settings, smtp_server
):
    from tests.intake.staff.conftest import create_teams

    _url, mailbox = smtp_server
    create_teams(app)
    add_user(app, "ben", ["benefits", "ivig"], ["en"])
    add_user(app, "rosa", ["ivig"], ["en", "es"])
    spanish_copay = submit(patient, "contact", lang="es", **{**CONTACT_CANARIES, "topic": "copay"})
    spanish_ivig = submit(
        patient, "contact", lang="es", **{**CONTACT_CANARIES, "topic": "specialist"}
    )
    vietnamese = submit(
        patient,
        "contact",
        lang="en",
        interpreter="y",
        interpreter_language="vi",
        **{**CONTACT_CANARIES, "topic": "insurance"},
    )
    references = [spanish_copay, spanish_ivig, vietnamese]
    # A redelivered routing task (a worker died, the sweep republished) must change nothing.
    with app.app_context():
        for _ in range(2):
            app.extensions["celery"].send_task(
                "workers.tasks.route_request", args=[rows(app)[spanish_copay].id]
            )
        db.session.remove()

    worker = celery_processes(settings).wait_ready()
    wait_until(lambda: all_queued(app, references), 30, message="all routed")
    # Three team e-mails and two to the supervisors.
    wait_until(lambda: len(mailbox.messages) >= 5, 30, message="the e-mails")
    time.sleep(2)

    assert state(app, spanish_ivig)["assignee"] == "rosa"
    assert state(app, spanish_copay)["language_need"] == "es"
    assert state(app, vietnamese)["language_need"] == "vi"
    assert routed_events(app) == {r: 1 for r in references}
    to_supervisors = {
        next(r for r in references if r in m.get_payload(decode=True).decode()): m
        for m in mailbox.messages
        if m["To"] == SUPERVISORS_EMAIL
    }
    assert set(to_supervisors) == {spanish_copay, vietnamese}
    assert len(mailbox.messages) == 5, [m["Subject"] for m in mailbox.messages]
    assert (
        to_supervisors[spanish_copay]["Subject"]
        == f"Needs Spanish: Contact request {spanish_copay}"
    )
    assert (
        to_supervisors[vietnamese]["Subject"] == f"Needs Vietnamese: Contact request {vietnamese}"
    )
    for message in mailbox.messages:
        body = message.get_payload(decode=True).decode()
        assert leaked(body) == [] and leaked(message["Subject"]) == []
    assert (
        f"/staff/requests/{spanish_copay}"
        in to_supervisors[spanish_copay].get_payload(decode=True).decode()
    )
    log = worker.log_path.read_bytes()
    assert leaked(log) == [] and b'"language_outcome": "unmet"' in log
