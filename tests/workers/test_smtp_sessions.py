"""A worker keeps its SMTP session open between notices (intake.requests.notifications).

What a pharmacy would notice if this broke: a notice that never arrives because the session it
was sent on had been dropped by the server (idle timeout, restart, "421 too many messages"), a
notice that arrives twice, an e-mail sent over a session to a server the settings no longer
name, a forked process talking on its parent's socket; and, what the session is kept for, a
burst of notices paying a TCP and TLS handshake and a login for every e-mail. Real aiosmtpd
servers count the client sessions each message came on.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from email import message_from_bytes
from typing import Any

import pytest

from intake.requests import notifications
from intake.requests.notifications import Notice, NotificationError, send_email
from tests.conftest import reference_from
from tests.workers.conftest import free_port, pipeline_settings, running_smtp, wait_until
from tests.workers.test_transport_tls import (  # noqa: F401 - fixtures
    NOTICE,
    pharmacy_ca,
    smtp_servers,
    trusted,
)


@dataclass
class SessionMailbox:
    """Keeps each message with the number of the client session it came over (a client's
    port can come back on a later session, so sessions are numbered as they first speak)."""

    messages: list[Any] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)
    # Refuse with 421 ("closing") every MAIL after this many in one session; 0: never, -1:
    # every one.
    per_session: int = 0
    mails: Counter[int] = field(default_factory=Counter)
    sessions: int = 0
    # Recipients the server refuses (550).
    refuse: set[str] = field(default_factory=set)

    def number(self, session: Any) -> int:
        if not hasattr(session, "intake_test_number"):
            self.sessions += 1
            session.intake_test_number = self.sessions
        return int(session.intake_test_number)

    async def handle_MAIL(self, _server, session, envelope, address, options):  # noqa: N802
        self.mails[self.number(session)] += 1
        if self.per_session < 0 or (
            self.per_session and self.mails[self.number(session)] > self.per_session
        ):
            return "421 4.7.0 Too many messages in this session, closing"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, _server, _session, envelope, address, options):  # noqa: N802
        if address in self.refuse:
            return "550 5.1.1 No such mailbox"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, _server, session, envelope) -> str:  # noqa: N802
        self.messages.append(message_from_bytes(envelope.content))
        self.peers.append(self.number(session))
        return "250 Message accepted for delivery"

    def subjects(self) -> list[str]:
        return [message["Subject"] for message in self.messages]


def notice(number: int) -> Notice:
    reference = f"R-7K3M-Q{number:03d}"
    return replace(NOTICE, reference=reference, link=f"{NOTICE.link[:-11]}{reference}")


def subject(number: int) -> str:
    return f"Refill request R-7K3M-Q{number:03d} for Refills (Main St)"


def send(url: str, number: int, **options: Any) -> None:
    send_email(
        url,
        "intake@pharmacy.test",
        "refills@pharmacy.test",
        notice(number),
        message_id=f"<intake.outbox.{number}@pharmacy.test>",
        **options,
    )


@pytest.fixture
def mail_server() -> Iterator[tuple[str, SessionMailbox]]:
    mailbox = SessionMailbox()
    with running_smtp(mailbox) as controller:
        yield f"smtp://127.0.0.1:{controller.port}", mailbox


def test_a_burst_of_notices_goes_over_one_session(mail_server):
    url, mailbox = mail_server
    for number in range(12):
        send(url, number)
    assert mailbox.subjects() == [subject(number) for number in range(12)]
    assert len(set(mailbox.peers)) == 1, "a new SMTP session for each e-mail"


def test_a_session_left_idle_is_closed_and_a_new_one_opened(mail_server, monkeypatch):
    url, mailbox = mail_server
    monkeypatch.setattr(notifications, "SMTP_IDLE_SECONDS", 0.0)
    send(url, 1)
    send(url, 2)
    assert mailbox.subjects() == [subject(1), subject(2)]
    assert len(set(mailbox.peers)) == 2


def test_a_server_that_closes_the_session_after_some_messages_still_gets_every_one_once(
    mail_server,
):
    """Mail providers cap the messages per session with a 421 at the next MAIL. The message
    refused that way goes at once on a new session: every notice arrives, none twice."""
    url, mailbox = mail_server
    mailbox.per_session = 3
    for number in range(8):
        send(url, number)
    assert mailbox.subjects() == [subject(number) for number in range(8)]
    assert Counter(Counter(mailbox.peers).values()) == Counter({3: 2, 2: 1})


def test_a_restarted_mail_server_gets_the_next_notice_on_a_new_session():
    """The server restarts between two notices (a relay upgraded at night): the kept session
    is dead. The next notice goes on a new one, and arrives once."""
    port = free_port()
    url = f"smtp://127.0.0.1:{port}"
    before, after = SessionMailbox(), SessionMailbox()
    with running_smtp(before, port=port):
        send(url, 1)
        # Only the server goes away: the client's session is kept out of the stop's cleanup.
        kept, notifications._kept.session = notifications._kept.session, None
    notifications._kept.session = kept
    with running_smtp(after, port=port):
        send(url, 2)
    assert before.subjects() == [subject(1)]
    assert after.subjects() == [subject(2)]


def test_a_session_goes_only_to_the_server_the_settings_name():
    """After a message to one relay, a message for another never rides the first one's
    session: an operator who moves the relay (or a test's second server) gets the mail."""
    first, second = SessionMailbox(), SessionMailbox()
    with running_smtp(first) as one, running_smtp(second) as two:
        send(f"smtp://127.0.0.1:{one.port}", 1)
        send(f"smtp://127.0.0.1:{two.port}", 2)
        send(f"smtp://127.0.0.1:{one.port}", 3)
    assert first.subjects() == [subject(1), subject(3)]
    assert second.subjects() == [subject(2)]


def test_a_refused_message_fails_and_the_next_one_gets_a_new_session(mail_server):
    """A server that refuses the recipient: the notice fails (and the task retries), the
    session it failed on is not kept, and the next notice is sent."""
    url, mailbox = mail_server
    mailbox.refuse.add("gone@pharmacy.test")
    send(url, 1)
    with pytest.raises(NotificationError, match="SMTPRecipientsRefused"):
        send_email(url, "intake@pharmacy.test", "gone@pharmacy.test", notice(2))
    send(url, 3)
    assert mailbox.subjects() == [subject(1), subject(3)]
    assert len(set(mailbox.peers)) == 2


def test_a_forked_process_opens_its_own_session_and_leaves_its_parents(mail_server):
    """A session inherited across a fork is the parent's socket: the child talking on it (or
    saying QUIT) would break the parent's next message or interleave two messages."""
    url, mailbox = mail_server
    send(url, 1)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's outcome is read from its exit status
        try:
            send(url, 2)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    send(url, 3)
    assert sorted(mailbox.subjects()) == [subject(1), subject(2), subject(3)]
    by_subject = dict(zip(mailbox.subjects(), mailbox.peers, strict=True))
    assert by_subject[subject(1)] == by_subject[subject(3)], "the parent's session was broken"
    assert by_subject[subject(2)] != by_subject[subject(1)], "the child used its parent's socket"


def test_notices_over_starttls_share_one_handshake_and_each_is_encrypted(
    smtp_servers,  # noqa: F811
    trusted,  # noqa: F811
    monkeypatch,
):
    port, mailbox = smtp_servers(starttls=trusted)
    url = f"smtp+starttls://127.0.0.1:{port}"
    connections = []
    original = notifications._open_smtp

    def counting(*args: Any) -> Any:
        connections.append(args[0])
        return original(*args)

    monkeypatch.setattr(notifications, "_open_smtp", counting)
    for number in range(5):
        send(url, number, ca_file=trusted.ca_file)
    assert [m["Subject"] for m in mailbox.messages] == [subject(n) for n in range(5)]
    assert all(version in ("TLSv1.2", "TLSv1.3") for version in mailbox.tls_versions)
    assert connections == [url], "one STARTTLS handshake for the five"


@pytest.fixture
def pipeline_mail() -> Iterator[tuple[str, SessionMailbox]]:
    mailbox = SessionMailbox()
    with running_smtp(mailbox) as controller:
        yield f"smtp://127.0.0.1:{controller.port}", mailbox


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server, pipeline_mail):
    """The web app and the worker share the database, Redis and the mail server."""
    return pipeline_settings(
        base_settings, database_url, tmp_path, redis_server.url, pipeline_mail[0]
    )


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_worker_tells_every_team_once_over_at_most_one_session_per_process(
    app, patient, settings, pipeline_mail, celery_processes
):
    """A real worker (two pool processes) and a burst of twelve requests: each team is
    e-mailed once per request, over no more sessions than the worker has processes."""
    _url, mailbox = pipeline_mail
    worker = celery_processes(settings).wait_ready()
    references = [reference_from(patient.contact(topic="copay")) for _ in range(12)]
    wait_until(lambda: len(mailbox.messages) >= 12, 60, message="every team e-mailed")
    told = Counter(
        reference
        for message in mailbox.messages
        for reference in references
        if reference in message["Subject"]
    )
    assert told == Counter({reference: 1 for reference in references})
    assert len(set(mailbox.peers)) <= 2, f"{len(set(mailbox.peers))} sessions for 12"
    assert worker.process.poll() is None, worker.tail()


def test_a_server_that_refuses_every_message_with_421_fails_the_notice_without_looping(
    mail_server,
):
    """A relay that answers every MAIL with 421 (overloaded): the kept session is replaced
    once, the new one is refused too, and the notice fails (its task retries with backoff)
    instead of opening session after session."""
    url, mailbox = mail_server
    send(url, 1)
    mailbox.per_session = -1  # from now on, every MAIL gets 421
    with pytest.raises(NotificationError, match="SMTPSenderRefused"):
        send(url, 2)
    assert mailbox.subjects() == [subject(1)]
    assert mailbox.sessions == 2, "the kept session and one new one, no more"
