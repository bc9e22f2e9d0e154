"""Tell a team that a request is waiting: by e-mail, webhook or the log. Never any PHI.

A notification holds the reference, kind, topic, priority, SLA and a link to the staff page: what
a pharmacist needs to pick the request up, and nothing a lost e-mail could leak. The staff page
behind the link asks for a login and audits every view.

A break-glass alert (``notify_break_glass``) tells the supervisors' channel, the moment it
happens, that someone whose break-glass the policy watches opened a request: the username and
role, the reference and a link to the review page. Not the typed reason, not the patient.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import smtplib
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from sqlalchemy import select

from intake.extensions import DbSession
from intake.ops.transport import tls_client_context
from intake.requests.outbox import NOTIFY_TIMEOUT_SECONDS
from intake.requests.routing import LANGUAGE_NOTICE_TASK, RoutingTable, Team

log = structlog.get_logger(__name__)

BREAK_GLASS = "break_glass"
BREAK_GLASS_TASK = "notify_break_glass"


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
    # For a language-need notice: the language still needed and the team the request is with.
    language: str | None = None
    language_name: str | None = None
    queue_team_name: str | None = None
    # For a break-glass alert: who broke the glass, as "username (role)".
    accessed_by: str | None = None

    def subject(self) -> str:
        if self.reason == BREAK_GLASS:
            return f"Break-glass access to {self.reference} by {self.accessed_by or 'someone'}"
        what = "Refill request" if self.kind == "refill" else "Contact request"
        flag = f"[{self.priority.upper()}] " if self.priority in ("urgent", "high") else ""
        if self.reason == "language_need":
            return f"{flag}Needs {self.language_name}: {what} {self.reference}"
        return f"{flag}{what} {self.reference} for {self.team_name}"

    def body(self) -> str:
        if self.reason == BREAK_GLASS:
            return (
                f"{self.accessed_by or 'Someone'} broke the glass to open request "
                f"{self.reference}, outside their teams.\n\n"
                f"Reference: {self.reference}\n\n"
                f"The access waits for review (login required): {self.link}\n\n"
                "This message deliberately contains no patient information.\n"
            )
        due = self.sla_due_at.strftime("%Y-%m-%d %H:%M UTC") if self.sla_due_at else "none"
        if self.reason == "language_need":
            lines = [
                f"A {self.kind} request needs someone who speaks {self.language_name}, and",
                f"nobody who does could take it in {self.queue_team_name}. It is flagged",
                f'"needs {self.language_name}" on the queue: transfer it to a team that serves',
                f"{self.language_name}, or have a colleague who speaks it claim it.",
                "",
            ]
        else:
            lines = [f"A {self.kind} request is waiting in the {self.team_name} queue.", ""]
        lines += [
            f"Reference: {self.reference}",
            f"Kind:      {self.kind}" + (f" ({self.topic})" if self.topic else ""),
            f"Priority:  {self.priority}",
            *([f"Team:      {self.queue_team_name}"] if self.reason == "language_need" else []),
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
            "language": self.language,
            **({"accessed_by": self.accessed_by} if self.reason == BREAK_GLASS else {}),
        }

    def log_fields(self) -> dict[str, str | None]:
        return {
            "reference": self.reference,
            "priority": self.priority,
            "kind": self.kind,
            "link": self.link,
            "reason": self.reason,
            "language": self.language,
        }


# What the supervisors are told about a staff account, and what they can do about it.
ACCOUNT_ALERTS = {
    "mfa_frozen": (
        "second factor frozen",
        "The right password was typed for this account, followed by too many wrong "
        "authenticator codes in a row. Someone may know the password. Nobody can log in to "
        "the account until an administrator clears it.",
        "Call the person. If it was not them, have an administrator change the password "
        "(intake users set-password {username}) and give a new authenticator secret "
        "(intake users reset-mfa {username}). If it was them, an administrator clears the "
        "freeze with: intake users unfreeze {username}",
    ),
    "account_locked": (
        "login attempts locked",
        "So many wrong logins were tried for this account, from any computer, that further "
        "attempts are refused for a while (the delay doubles while they go on). The person "
        "may not be able to log in until it passes.",
        "If the person needs to log in now, an administrator can lift the delay with: "
        "intake users unfreeze {username}. Many attempts from unknown computers mean someone "
        "is guessing the password; tell the security officer.",
    ),
}


@dataclass(frozen=True)
class AccountNotice:
    """An alert to the supervisors about a staff account: whose, what happened, what to do.

    Staff usernames are not patient information; the alert names no request and no client
    address (the audit trail holds the pseudonyms for an investigation).
    """

    username: str
    alert: str
    at: datetime
    link: str

    def subject(self) -> str:
        return f"Staff account {self.username}: {ACCOUNT_ALERTS[self.alert][0]}"

    def body(self) -> str:
        _title, what, action = ACCOUNT_ALERTS[self.alert]
        lines = [
            f"Staff account: {self.username}",
            f"When:          {self.at.strftime('%Y-%m-%d %H:%M UTC')}",
            "",
            what,
            "",
            action.format(username=self.username),
            "",
            f"Compliance officers find the attempts in the audit trail: {self.link}",
            "",
            "This message deliberately contains no patient information.",
        ]
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, str | None]:
        return {
            "event": f"account.{self.alert}",
            "username": self.username,
            "at": self.at.isoformat(),
            "link": self.link,
        }

    def log_fields(self) -> dict[str, str | None]:
        return {"alert": self.alert, "username": self.username, "link": self.link}


Deliverable = Notice | AccountNotice


# The port each INTAKE_SMTP_URL scheme uses when the URL names none.
SMTP_DEFAULT_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


def message_id(sender: str, outbox_id: int) -> str:
    """The e-mail's Message-ID, the same every time its outbox row is sent.

    A send the worker could not record (it died after the server took the message) is sent
    again; with the same Message-ID, mail clients and servers that de-duplicate show it once.
    """
    domain = sender.rpartition("@")[2] or "intake.invalid"
    return f"<intake.outbox.{outbox_id}@{domain}>"


# A worker keeps its SMTP session open between notices, so a burst does not pay a TCP and TLS
# handshake, EHLO and login for each e-mail. A session idle longer than this is not used again
# (the next notice ends it with QUIT), well within the five minutes RFC 5321 lets a server wait;
# Postfix waits 10 s under stress: a session it dropped is noticed before DATA and replaced.
SMTP_IDLE_SECONDS = 30.0
SMTP_MESSAGES_PER_SESSION = 100


@dataclass
class _Session:
    client: _SMTP | _SMTPS
    pid: int
    opened_for: tuple[str, str]
    last_used: float
    messages: int = 0


class _KeptSessions(threading.local):
    session: _Session | None = None


_kept = _KeptSessions()


class _BodyTracked:
    """Records when a session started on the message itself (DATA): a failure before it
    left nothing of the message at the server, and the message may go on a new session."""

    body_started = False

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.body_started = True
        return super().data(msg)  # type: ignore[misc, no-any-return]


class _SMTP(_BodyTracked, smtplib.SMTP):
    pass


class _SMTPS(_BodyTracked, smtplib.SMTP_SSL):
    pass


def _open_smtp(smtp_url: str, ca_file: Path | None) -> _SMTP | _SMTPS:
    """A new SMTP session, with TLS verified and logged in, ready for MAIL."""
    parts = urlsplit(smtp_url)
    host, port = parts.hostname or "", parts.port or SMTP_DEFAULT_PORTS[parts.scheme]
    client: _SMTP | _SMTPS
    if parts.scheme == "smtps":
        client = _SMTPS(
            host, port, timeout=NOTIFY_TIMEOUT_SECONDS, context=tls_client_context(ca_file)
        )
    else:
        client = _SMTP(host, port, timeout=NOTIFY_TIMEOUT_SECONDS)
    try:
        if parts.scheme == "smtp+starttls":
            client.starttls(context=tls_client_context(ca_file))
        if parts.username:
            client.login(unquote(parts.username), unquote(parts.password or ""))
    except BaseException:
        _close(client, polite=False)
        raise
    return client


# How long a QUIT to a session being let go may wait: a connection the network dropped
# silently would otherwise hold the next notice for a whole timeout.
SMTP_QUIT_SECONDS = 1.0


def _close(client: smtplib.SMTP, *, polite: bool = True) -> None:
    """End a session: QUIT if it may still be talking, else just drop the socket."""
    try:
        if polite and client.sock is not None:
            client.sock.settimeout(SMTP_QUIT_SECONDS)
            client.quit()
    except (OSError, smtplib.SMTPException):
        pass
    finally:
        client.close()


def _take_session(key: tuple[str, str]) -> _Session | None:
    """This thread's open session to ``key``'s server, if it may carry one more message."""
    kept, _kept.session = _kept.session, None
    if kept is None:
        return None
    if kept.pid != os.getpid():
        return None  # inherited across a fork: the parent's socket, not ours to talk on or QUIT
    fresh = time.monotonic() - kept.last_used < SMTP_IDLE_SECONDS
    if kept.opened_for != key or not fresh or kept.messages >= SMTP_MESSAGES_PER_SESSION:
        _close(kept.client)
        return None
    return kept


def close_smtp_sessions() -> None:
    """Close this thread's kept SMTP session (a worker shutting down, a test's mail server
    about to stop)."""
    kept, _kept.session = _kept.session, None
    if kept is not None and kept.pid == os.getpid():
        _close(kept.client)


def _dropped(client: _SMTP | _SMTPS, error: BaseException) -> bool:
    """Whether a kept session failed because the server had let it go (idle timeout, restart,
    "421 closing", a session that no longer answers) before the message's DATA: nothing of the
    message reached the server, and it goes on a new session. After DATA began the server may
    hold the message, so the failure is the task's to retry, once per attempt as before."""
    if client.body_started:
        return False
    if isinstance(error, smtplib.SMTPServerDisconnected | ConnectionError):
        return True
    return isinstance(error, smtplib.SMTPResponseException) and error.smtp_code == 421


def send_email(
    smtp_url: str,
    sender: str,
    recipient: str,
    notice: Deliverable,
    *,
    ca_file: Path | None = None,
    message_id: str | None = None,
) -> None:
    """Send ``notice`` by e-mail: ``smtp+starttls://`` or ``smtps://`` verify the server.

    ``smtp+starttls://`` refuses a server that does not offer STARTTLS (a downgrade by whoever
    sits in between) instead of carrying on in clear text; a certificate that does not verify
    against the system's trust store (or ``ca_file``) stops the message before it is sent.

    The session stays open for the thread's next message (``SMTP_IDLE_SECONDS``,
    ``SMTP_MESSAGES_PER_SESSION``). A kept session the server dropped before the message's
    DATA is replaced once, at once; any other failure closes it and raises, and the task
    retries as before.
    """
    parts = urlsplit(smtp_url)
    if parts.scheme not in SMTP_DEFAULT_PORTS or not parts.hostname:
        raise NotificationError("INTAKE_SMTP_URL must look like smtp+starttls://host:587")
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, recipient, notice.subject()
    if message_id:
        message["Message-ID"] = message_id
    message.set_content(notice.body())
    key = (smtp_url, str(ca_file or ""))
    kept = _take_session(key)
    try:
        if kept is not None:
            kept.client.body_started = False
            try:
                kept.client.send_message(message)
            except BaseException as error:
                # Whatever stopped it (a refusal, a time limit) left the session mid-message.
                _close(kept.client, polite=False)
                if not _dropped(kept.client, error):
                    raise
                kept = None
        if kept is None:
            kept = _Session(_open_smtp(smtp_url, ca_file), os.getpid(), key, 0.0)
            try:
                kept.client.send_message(message)
            except BaseException:
                _close(kept.client, polite=False)
                raise
    except (OSError, smtplib.SMTPException) as error:
        raise NotificationError(f"smtp: {type(error).__name__}") from error
    kept.messages += 1
    kept.last_used = time.monotonic()
    _kept.session = kept


def send_webhook(url: str, notice: Deliverable) -> None:
    """POST ``notice`` to an https webhook; ``https://user:password@host/...`` is Basic auth.

    Why the credentials are taken out of the URL: urllib would take ``password@host`` for the
    host and fail with an InvalidURL quoting it, into the worker's log. Errors are reported by
    class only, never with the URL.
    """
    if not url.startswith("https://"):
        raise NotificationError("webhooks must use https")
    headers = {"Content-Type": "application/json"}
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    data = json.dumps(notice.as_json()).encode()
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, data=data, method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=NOTIFY_TIMEOUT_SECONDS) as response:  # noqa: S310
            if response.status >= 300:
                raise NotificationError(f"webhook answered {response.status}")
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise NotificationError(f"webhook: {type(error).__name__}") from error


def deliver(
    team: Team,
    notice: Deliverable,
    smtp_url: str | None,
    sender: str,
    *,
    smtp_ca_file: Path | None = None,
    message_id: str | None = None,
) -> list[str]:
    """Send ``notice`` on each of the team's channels; return the channels used."""
    used: list[str] = []
    for channel in team.notify:
        if channel == "email" and team.email:
            if smtp_url:
                send_email(
                    smtp_url,
                    sender,
                    team.email,
                    notice,
                    ca_file=smtp_ca_file,
                    message_id=message_id,
                )
                used.append("email")
                continue
            channel = "log"  # embedded profile: no SMTP server configured
        if channel == "webhook" and team.webhook:
            send_webhook(team.webhook, notice)
            used.append("webhook")
        elif channel == "log":
            log.info("team_notified", team=team.id, **notice.log_fields())
            used.append("log")
    return used


# -- sending one outbox notification -------------------------------------------------------------


def _logged(outcome: str, task: str, outbox_id: int, **fields: Any) -> str:
    """Log an outbox notification's final outcome as ``notification_<outcome>``; return it.

    One line per notice sent or given up on, so a trace id followed from the web request ends
    at its notification. Ids, the team, the channels and the error class only: never the
    notice's text, never a recipient address.
    """
    emit = log.info if outcome == "sent" else log.error
    emit(f"notification_{outcome}", task=task, outbox_id=outbox_id, **fields)
    return outcome


class RetryLater(Exception):
    """A channel failed and retries remain: the task should run again after ``countdown``."""

    def __init__(self, error: NotificationError, countdown: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.countdown = countdown


def send_outbox_notice(
    session: DbSession,
    *,
    task: str,
    request_id: str,
    outbox_id: int | None,
    settings: Any,
    table: RoutingTable,
    attempt: int,
    max_retries: int,
) -> str:
    """Send the notification an outbox row stands for, at most once, and record the outcome.

    ``notify_team`` tells the request's current team; ``notify_supervisors`` tells the
    supervisors' channel that it is overdue, ``notify_language_need`` that nobody who speaks
    its language could take it (skipped if someone has since), ``notify_break_glass`` that
    someone broke the glass to open it. An already-sent row is skipped, so a redelivered task
    notifies nobody twice. Returns what happened: sent, skipped, failed; raises
    :class:`RetryLater` while retries remain.
    """
    from intake.audit.chain import record_event
    from intake.models import AuditEvent, OutboxMessage, Request
    from intake.requests import outbox

    # The open row and what the notice says, in one read; the sealed PHI columns are not read.
    pending = (
        select(
            OutboxMessage.id,
            Request.id.label("request_found"),
            Request.reference,
            Request.kind,
            Request.topic,
            Request.priority,
            Request.team,
            Request.sla_due_at,
            Request.language_need,
        )
        .outerjoin(Request, Request.id == OutboxMessage.request_id)
        .where(
            OutboxMessage.request_id == request_id,
            OutboxMessage.task == task,
            OutboxMessage.status.in_(outbox.OPEN),
        )
    )
    if outbox_id is not None:
        pending = pending.where(OutboxMessage.id == outbox_id)
    open_row = session.execute(pending.order_by(OutboxMessage.id).limit(1)).first()
    if open_row is None:
        return "skipped"
    outbox_id = int(open_row.id)
    request = open_row if open_row.request_found is not None else None
    overdue = task == "notify_supervisors"
    language_need = task == LANGUAGE_NOTICE_TASK
    glass = task == BREAK_GLASS_TASK
    team = (
        table.supervisors
        if overdue or language_need or glass
        else table.teams.get(request.team or "")
        if request
        else None
    )
    if request is None or team is None:
        outbox.mark_done(session, request_id, task, outbox_id, status="failed")
        session.commit()
        return _logged("failed", task, outbox_id, request_id=request_id, error="no request or team")
    if language_need and request.language_need is None:
        # Someone who speaks the language took it before the notice went out.
        outbox.mark_done(session, request_id, task, outbox_id)
        session.commit()
        return "skipped"
    queue_team = table.teams.get(request.team or "")
    reason = (
        BREAK_GLASS
        if glass
        else "overdue"
        if overdue
        else "language_need"
        if language_need
        else "new"
    )
    link = f"{settings.public_url}/staff/requests/{request.reference}"
    accessed_by = None
    if glass:
        # The break-glass this alert is about: the latest one recorded with or before its row.
        queued = session.get(OutboxMessage, outbox_id) if outbox_id is not None else None
        found = select(AuditEvent.details, AuditEvent.actor_role).where(
            AuditEvent.action == "phi.break_glass",
            AuditEvent.reference == request.reference,
            AuditEvent.outcome == "success",
        )
        if queued is not None:
            found = found.where(AuditEvent.created_at <= queued.created_at)
        event = session.execute(found.order_by(AuditEvent.seq.desc()).limit(1)).first()
        if event is not None:
            username = json.loads(event.details).get("username", "?")
            accessed_by = f"{username} ({event.actor_role})"
        link = f"{settings.public_url}/compliance/break-glass"
    notice = Notice(
        reference=request.reference,
        kind=request.kind,
        topic=request.topic,
        priority=request.priority,
        team=team.id,
        team_name=team.name,
        sla_due_at=request.sla_due_at,
        link=link,
        reason=reason,
        accessed_by=accessed_by,
        language=request.language_need if language_need else None,
        language_name=table.language_name(request.language_need) if language_need else None,
        queue_team_name=queue_team.name if queue_team else request.team,
    )
    session.rollback()  # hold no lock while talking to the outside world
    if not outbox.claim(session, outbox_id):
        return "skipped"  # sent already, or another worker is sending it right now
    actor = f"system:{task}"
    try:
        channels = deliver(
            team,
            notice,
            settings.smtp_url,
            settings.smtp_from,
            smtp_ca_file=settings.smtp_ca_file,
            message_id=message_id(settings.smtp_from, outbox_id),
        )
    except NotificationError as error:
        if attempt < max_retries:
            outbox.release(session, outbox_id)
            log.warning(
                "notify_retry",
                reference=notice.reference,
                team=team.id,
                attempt=attempt + 1,
                error=str(error),
            )
            raise RetryLater(error, countdown=min(2**attempt * 5, 600)) from None
        record_event(
            session,
            actor=actor,
            action="notification.failed",
            reference=notice.reference,
            outcome="failure",
            details={"team": team.id, "error": str(error), "reason": notice.reason},
        )
        outbox.mark_done(session, request_id, task, outbox_id, status="failed")
        session.commit()
        return _logged(
            "failed",
            task,
            outbox_id,
            request_id=request_id,
            reference=notice.reference,
            team=team.id,
            error=str(error),
        )
    record_event(
        session,
        actor=actor,
        action="notification.sent",
        reference=notice.reference,
        details={"team": team.id, "channels": channels, "reason": notice.reason},
    )
    outbox.mark_done(session, request_id, task, outbox_id)
    session.commit()
    return _logged(
        "sent",
        task,
        outbox_id,
        request_id=request_id,
        reference=notice.reference,
        team=team.id,
        channels=channels,
    )


def send_account_alert(
    session: DbSession,
    *,
    outbox_id: int,
    settings: Any,
    table: RoutingTable,
    attempt: int,
    max_retries: int,
) -> str:
    """Tell the supervisors' channel about a staff account (an outbox row with an ``alert``),
    at most once, and record the outcome; like :func:`send_outbox_notice` otherwise."""
    from intake.audit.chain import record_event
    from intake.models import OutboxMessage, User
    from intake.requests import outbox

    row = session.get(OutboxMessage, outbox_id)
    if row is None or row.status not in outbox.OPEN or row.user_id is None:
        return "skipped"
    user = session.get(User, row.user_id)
    team = table.supervisors
    if user is None or row.alert not in ACCOUNT_ALERTS:
        _mark_alert(session, outbox_id, "failed")
        session.commit()
        return "failed"
    notice = AccountNotice(
        username=user.username,
        alert=str(row.alert),
        at=row.created_at,
        link=f"{settings.public_url}/compliance/audit?actor=user:{user.id}",
    )
    session.rollback()  # hold no lock while talking to the outside world
    if not outbox.claim(session, outbox_id):
        return "skipped"
    task = "notify_account_alert"
    actor = f"system:{task}"
    details = {"team": team.id, "alert": notice.alert, "user_id": user.id}
    try:
        channels = deliver(
            team,
            notice,
            settings.smtp_url,
            settings.smtp_from,
            smtp_ca_file=settings.smtp_ca_file,
            message_id=message_id(settings.smtp_from, outbox_id),
        )
    except NotificationError as error:
        if attempt < max_retries:
            outbox.release(session, outbox_id)
            log.warning("account_alert_retry", alert=notice.alert, attempt=attempt + 1)
            raise RetryLater(error, countdown=min(2**attempt * 5, 600)) from None
        record_event(
            session,
            actor=actor,
            action="notification.failed",
            outcome="failure",
            details={**details, "error": str(error)},
        )
        _mark_alert(session, outbox_id, "failed")
        session.commit()
        return _logged("failed", task, outbox_id, **details, error=str(error))
    record_event(
        session, actor=actor, action="notification.sent", details={**details, "channels": channels}
    )
    _mark_alert(session, outbox_id, "done")
    session.commit()
    return _logged("sent", task, outbox_id, **details, channels=channels)


def _mark_alert(session: DbSession, outbox_id: int, status: str) -> None:
    from sqlalchemy import update

    from intake.clock import utcnow
    from intake.models import OutboxMessage

    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == outbox_id, OutboxMessage.status.in_(("pending", "sending")))
        .values(status=status, done_at=utcnow())
    )
