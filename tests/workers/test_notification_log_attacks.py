"""Attacks on the notification log lines (notification_sent / notification_failed).

A request full of PHI canaries goes through the real notify_team task, on the log channel and
by e-mail to a real SMTP server (aiosmtpd); a team's webhook URL and the SMTP URL carry
credentials. Neither the PHI nor a password may reach any log line, structlog's or the
stdlib's (Celery's own "raised unexpected" lines included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage
from intake.requests.routing import RoutingError, load_routing
from tests.intake.crypto.test_phi_canary import CONTACT_CANARIES, leaked
from tests.workers.conftest import email_routing_file
from tests.workers.test_tasks import routed

WEBHOOK_SECRET = "Hook-Secret-77"
SMTP_SECRET = "Mail-Secret-55"


def webhook_routing_file(folder: Path, url: str) -> Path:
    """The sample routing rules, with every team notified by a webhook at ``url``."""
    path = email_routing_file(folder)
    lines = []
    for line in path.read_text().splitlines():
        if line == 'notify = ["email"]':
            line = f'notify = ["webhook"]\nwebhook = "{url}"'
        elif line.startswith("email = ") and line.endswith('@pharmacy.test"'):
            continue
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


CHANNELS = ("log", "smtp", "smtp with credentials", "webhook with credentials")


@pytest.fixture(params=CHANNELS)
def channel(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(base_settings, database_url, tmp_path, channel, request):
    settings = base_settings.replace(database_url=database_url, data_dir=tmp_path / "data")
    if channel.startswith("smtp"):
        url, _mailbox = request.getfixturevalue("smtp_server")
        if channel == "smtp with credentials":
            # aiosmtpd offers no AUTH here: the login fails, naming the password nowhere.
            url = url.replace("smtp://", f"smtp://mailuser:{SMTP_SECRET}@")
        return settings.replace(smtp_url=url, routing_file=email_routing_file(tmp_path))
    if channel == "webhook with credentials":
        # No port: urllib would read "Hook-Secret-77@127.0.0.1" as host and port. Nothing
        # listens on 127.0.0.1:443 here, so every delivery fails.
        url = f"https://hookuser:{WEBHOOK_SECRET}@127.0.0.1/hook"
        return settings.replace(routing_file=webhook_routing_file(tmp_path, url))
    return settings


def notify_canary(app, patient) -> tuple[str, str, list[dict[str, Any]]]:
    """Submit the canary contact request, route it, run notify_team to its end; the logs."""
    from workers.tasks import NOTIFY_MAX_RETRIES, notify_team

    reference, request_id, outbox_id = routed(app, patient, **CONTACT_CANARIES)
    # As in a worker: the task runs in its own app context, holding no lock of the test's.
    with app.app_context():
        with capture_logs() as logs:
            notify_team.apply(
                args=[request_id], kwargs={"outbox_id": outbox_id}, retries=NOTIFY_MAX_RETRIES
            )
        status = db.session.scalar(
            sa.select(OutboxMessage.status).where(OutboxMessage.id == outbox_id)
        )
    return reference, str(status), logs


def test_no_phi_and_no_password_in_any_notification_log_line(
    app, patient, channel, caplog, request
) -> None:
    reference, status, logs = notify_canary(app, patient)
    outcome = "sent" if channel in ("log", "smtp") else "failed"
    assert status == ("done" if outcome == "sent" else "failed")
    [line] = [line for line in logs if line["event"] == f"notification_{outcome}"]
    assert line["reference"] == reference and line["task"] == "notify_team"
    if outcome == "failed":
        expected = "webhook: " if channel.startswith("webhook") else "smtp: "
        assert line["error"].startswith(expected), line
    everything = json.dumps(logs, default=str) + caplog.text
    assert leaked(everything) == []
    assert WEBHOOK_SECRET not in everything and SMTP_SECRET not in everything
    assert "raised unexpected" not in caplog.text  # the task ended as designed
    with app.app_context():
        details = db.session.scalars(
            sa.select(AuditEvent.details).where(AuditEvent.action.like("notification.%"))
        ).all()
    assert details and WEBHOOK_SECRET not in str(details) and SMTP_SECRET not in str(details)
    if channel == "smtp":
        _url, mailbox = request.getfixturevalue("smtp_server")
        assert len(mailbox.messages) == 1
        assert leaked(mailbox.messages[0].as_string()) == []


@pytest.mark.parametrize("team_id", ["ops\nfake_line", "ops\x1b[31m", "Ops", "../ops"])
def test_a_hostile_team_id_never_reaches_a_log_line(tmp_path: Path, team_id: str) -> None:
    """Team ids are written to every notification line: the routing file refuses odd ones."""
    path = email_routing_file(tmp_path)
    text = path.read_text()
    first = text.split('id = "', 1)[1].split('"', 1)[0]
    path.write_text(text.replace(f'id = "{first}"', f"id = {json.dumps(team_id)}", 1))
    with pytest.raises(RoutingError, match="team"):
        load_routing(path)
