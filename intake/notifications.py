"""Tell a team that a request is waiting: by e-mail, webhook or the log. Never any PHI.

A notification holds the reference, kind, topic, priority, SLA and a link to the staff page: what
a pharmacist needs to pick the request up, and nothing a lost e-mail could leak. The staff page
behind the link asks for a login and audits every view.
"""

from __future__ import annotations

import json
import smtplib
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from urllib.parse import urlsplit

import structlog

from intake.routing import Team

log = structlog.get_logger(__name__)


class NotificationError(Exception):
    """A channel could not deliver; the task retries with backoff."""


@dataclass(frozen=True)
class Notice:
    reference: str
    kind: str
    topic: str | None
    priority: str
    team: str
    team_name: str
    sla_due_at: datetime | None
    link: str
    reason: str = "new"

    def subject(self) -> str:
        what = "Refill request" if self.kind == "refill" else "Contact request"
        flag = f"[{self.priority.upper()}] " if self.priority in ("urgent", "high") else ""
        return f"{flag}{what} {self.reference} for {self.team_name}"

    def body(self) -> str:
        due = self.sla_due_at.strftime("%Y-%m-%d %H:%M UTC") if self.sla_due_at else "none"
        lines = [
            f"A {self.kind} request is waiting in the {self.team_name} queue.",
            "",
            f"Reference: {self.reference}",
            f"Kind:      {self.kind}" + (f" ({self.topic})" if self.topic else ""),
            f"Priority:  {self.priority}",
            f"Due by:    {due}",
            "",
            f"Open it (login required): {self.link}",
            "",
            "This message deliberately contains no patient information.",
        ]
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, str | None]:
        return {
            "event": f"request.{self.reason}",
            "reference": self.reference,
            "kind": self.kind,
            "topic": self.topic,
            "priority": self.priority,
            "team": self.team,
            "sla_due_at": self.sla_due_at.isoformat() if self.sla_due_at else None,
            "link": self.link,
        }


def send_email(smtp_url: str, sender: str, recipient: str, notice: Notice) -> None:
    parts = urlsplit(smtp_url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise NotificationError("INTAKE_SMTP_URL must look like smtp://host:port")
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, recipient, notice.subject()
    message.set_content(notice.body())
    client_class = smtplib.SMTP_SSL if parts.scheme == "smtps" else smtplib.SMTP
    try:
        with client_class(parts.hostname, parts.port or 25, timeout=10) as client:
            if parts.username:
                client.login(parts.username, parts.password or "")
            client.send_message(message)
    except (OSError, smtplib.SMTPException) as error:
        raise NotificationError(f"smtp: {type(error).__name__}") from error


def send_webhook(url: str, notice: Notice) -> None:
    if not url.startswith("https://"):
        raise NotificationError("webhooks must use https")
    data = json.dumps(notice.as_json()).encode()
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            if response.status >= 300:
                raise NotificationError(f"webhook answered {response.status}")
    except OSError as error:
        raise NotificationError(f"webhook: {type(error).__name__}") from error


def deliver(team: Team, notice: Notice, smtp_url: str | None, sender: str) -> list[str]:
    """Send ``notice`` on each of the team's channels; return the channels used."""
    used: list[str] = []
    for channel in team.notify:
        if channel == "email" and team.email:
            if smtp_url:
                send_email(smtp_url, sender, team.email, notice)
                used.append("email")
                continue
            channel = "log"  # embedded profile: no SMTP server configured
        if channel == "webhook" and team.webhook:
            send_webhook(team.webhook, notice)
            used.append("webhook")
        elif channel == "log":
            log.info(
                "team_notified",
                team=team.id,
                reference=notice.reference,
                priority=notice.priority,
                kind=notice.kind,
                link=notice.link,
            )
            used.append("log")
    return used
