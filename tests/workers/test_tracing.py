"""One trace id from the web request to the worker's lines for the request it stored, through a
real worker process, carried as a message header."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from intake.ops import tracing
from tests.conftest import reference_from, valid_refill
from tests.intake.crypto.test_phi_canary import REFILL_CANARIES, leaked
from tests.workers.conftest import pipeline_settings, wait_until
from tests.workers.test_pipeline import all_queued


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server, smtp_server):
    smtp_url, _mailbox = smtp_server
    return pipeline_settings(base_settings, database_url, tmp_path, redis_server.url, smtp_url)


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
    return lines


def traced(path: Path, trace: str) -> set[str]:
    return {line["event"] for line in json_lines(path) if line.get(tracing.LOG_KEY) == trace}


def test_the_trace_id_follows_a_request_into_its_tasks(
    app, patient, celery_processes, settings, smtp_server
):
    _url, mailbox = smtp_server
    worker = celery_processes(settings).wait_ready()
    _page, hidden = patient.get_form("refill")
    response = patient.client.post("/refill", data={**hidden, **valid_refill(**REFILL_CANARIES)})
    reference = reference_from(response)
    trace = response.headers[tracing.RESPONSE_HEADER]
    assert len(trace) == 32 and int(trace, 16) >= 0

    wait_until(lambda: all_queued(app, [reference]), 30, message="routed")
    wait_until(lambda: len(mailbox.messages) >= 1, 30, message="the team's e-mail")
    wait_until(
        lambda: {"request_routed", "notification_sent"} <= traced(worker.log_path, trace),
        15,
        message="the worker's lines carry the trace id, up to the notification sent",
    )
    web_log = Path(settings.data_dir) / "logs" / "intake.log"
    assert "submission_decision" in traced(web_log, trace)
    # The routed line is the request's: its reference, with the trace of the web request.
    routed = [
        line
        for line in json_lines(worker.log_path)
        if line["event"] == "request_routed" and line.get(tracing.LOG_KEY) == trace
    ]
    assert [line["reference"] for line in routed] == [reference]
    # The trace ends at the team's e-mail: one line for the notice sent, with its ids and
    # channel, and not the team's address.
    [sent] = [
        line
        for line in json_lines(worker.log_path)
        if line["event"] == "notification_sent" and line.get(tracing.LOG_KEY) == trace
    ]
    assert sent["task"] == "notify_team" and sent["channels"] == ["email"]
    assert sent["reference"] == reference and sent["request_id"] == routed[0]["request_id"]
    assert isinstance(sent["outbox_id"], int) and sent["level"] == "info"
    assert "@" not in json.dumps(sent)
    # The canary's PHI is in neither side's lines, trace ids or not.
    for path in (web_log, worker.log_path):
        assert not leaked(path.read_text(errors="replace")), path


def test_each_request_gets_its_own_trace_and_a_client_cannot_choose_it(client):
    sent = "0" * 32
    first = client.get("/refill", headers={tracing.RESPONSE_HEADER: sent})
    second = client.get("/refill")
    traces = {first.headers[tracing.RESPONSE_HEADER], second.headers[tracing.RESPONSE_HEADER]}
    assert len(traces) == 2 and sent not in traces


def test_a_forged_trace_header_is_not_bound_in_a_task():
    class Request:
        intake_trace_id = 'x" injected="1'

    tracing.bind_from_task(Request())
    assert tracing.current() is None
    Request.intake_trace_id = "a" * 32
    tracing.bind_from_task(Request())
    assert tracing.current() == "a" * 32
    tracing.bind_from_task(None)
    assert tracing.current() is None


def test_requests_routed_in_one_batch_keep_their_own_traces(
    app, patient, celery_processes, settings, smtp_server
):
    """Submitted while no worker runs, the requests are routed together by whichever task comes
    first; each one's routed line and e-mail notice are still under its own submission's trace."""
    _url, mailbox = smtp_server
    traces = {}
    for _ in range(4):
        response = patient.contact(topic="copay")
        traces[reference_from(response)] = response.headers[tracing.RESPONSE_HEADER]
    worker = celery_processes(settings).wait_ready()
    wait_until(lambda: all_queued(app, list(traces)), 60, message="routed")
    wait_until(lambda: len(mailbox.messages) >= 4, 60, message="the teams' e-mails")

    def by_reference(event: str) -> dict[str, str | None]:
        wait_until(
            lambda: sum(line["event"] == event for line in json_lines(worker.log_path)) >= 4,
            15,
            message=f"four {event} lines",
        )
        found = [line for line in json_lines(worker.log_path) if line["event"] == event]
        assert len(found) == 4, found
        return {line["reference"]: line.get(tracing.LOG_KEY) for line in found}

    routed = [line for line in json_lines(worker.log_path) if line["event"] == "request_routed"]
    assert any(line.get("batched") for line in routed), "one task routed several requests"
    assert by_reference("request_routed") == traces
    assert by_reference("notification_sent") == traces
