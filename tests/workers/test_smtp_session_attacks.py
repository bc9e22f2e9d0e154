"""Attacks on the notifier's kept SMTP session (intake.requests.notifications.send_email).

Each test drives a real aiosmtpd server that misbehaves the way a relay, a network or a worker
does in production, and checks what the pharmacy would notice: a notice lost, a notice sent
twice (or more often than the task's retries already send it), a notice sent to a server whose
certificate was not verified or in clear text, a password or recipient in an error, a forked or
timed-out worker talking on a session it must not use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult
from celery.exceptions import SoftTimeLimitExceeded

from intake.requests import notifications
from intake.requests.notifications import NotificationError, close_smtp_sessions
from tests.workers.conftest import TlsFiles, free_port, issue_tls_files, running_smtp
from tests.workers.test_smtp_sessions import SessionMailbox, send, subject
from tests.workers.test_transport_tls import (  # noqa: F401 - fixtures
    impostor,
    pharmacy_ca,
    rogue_ca,
    server_context,
    trusted,
)

# A short client timeout for the slow-server attacks (the real one is 10 s).
QUICK_TIMEOUT = 0.4


@pytest.fixture(autouse=True)
def no_session_left_behind() -> Iterator[None]:
    """Every test starts without a kept session and leaves none behind."""
    close_smtp_sessions()
    yield
    close_smtp_sessions()


def tls_options(scheme: str, files: TlsFiles) -> dict[str, Any]:
    """aiosmtpd options for a server speaking ``scheme`` with ``files``' certificate."""
    if scheme == "smtp+starttls":
        # Clear text stays allowed: a client that skipped TLS would be served.
        return {"tls_context": server_context(files), "require_starttls": False}
    if scheme == "smtps":
        return {"ssl_context": server_context(files), "server_hostname": "127.0.0.1"}
    return {}


def keep_across_restart() -> Any:
    """Take this thread's kept session out of the way of ``running_smtp``'s cleanup, so that
    only the server goes away (a relay restarted between two notices)."""
    kept, notifications._kept.session = notifications._kept.session, None
    return kept


def attempts(url: str, number: int, tries: int = 2, **options: Any) -> list[str]:
    """Send a notice as the task would, retrying after a NotificationError; the errors."""
    errors = []
    for _ in range(tries):
        try:
            send(url, number, **options)
        except NotificationError as error:
            errors.append(str(error))
        else:
            break
    return errors


def message_ids(mailbox: SessionMailbox, number: int) -> list[str]:
    return [m["Message-ID"] for m in mailbox.messages if m["Subject"] == subject(number)]


# -- the server takes the message, then does not answer -------------------------------------------


@dataclass
class TakesThenHangsUp(SessionMailbox):
    """Queues every message, but hangs up on the first session's second one before answering
    it (once: a relay restarted just then)."""

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        reply = await super().handle_DATA(server, session, envelope)
        if self.peers == [1, 1]:
            server.transport.close()
        return reply


def test_a_message_the_relay_took_before_hanging_up_arrives_at_most_twice_with_one_message_id():
    """The ambiguity the task's retry already had: the relay queued the message, then the
    session ended before its 250. The new session sends it again; that may mean two copies, but
    never more, both with the outbox row's Message-ID (mail clients show one), and the notice
    is not reported failed after it went."""
    mailbox = TakesThenHangsUp()
    with running_smtp(mailbox) as controller:
        url = f"smtp://127.0.0.1:{controller.port}"
        send(url, 1)
        # A NotificationError is acceptable too: the task retries, with the same Message-ID.
        with contextlib.suppress(NotificationError):
            send(url, 2)
        send(url, 3)
    assert 1 <= len(message_ids(mailbox, 2)) <= 2
    assert set(message_ids(mailbox, 2)) == {"<intake.outbox.2@pharmacy.test>"}
    assert len(message_ids(mailbox, 1)) == 1
    assert len(message_ids(mailbox, 3)) == 1


@dataclass
class SlowToAnswer(SessionMailbox):
    """Queues each message at once, but answers the end of DATA only after ``delay`` seconds
    (a relay whose disk or after-queue scanner is slow), from the second message on."""

    delay: float = 1.0

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        reply = await super().handle_DATA(server, session, envelope)
        if len(self.messages) > 1:
            await asyncio.sleep(self.delay)
        return reply


def test_a_relay_slower_than_the_timeout_gets_a_notice_once_per_attempt(monkeypatch):
    """BUG. A relay slower to answer the end of DATA than the client's timeout has already
    queued the message. smtplib reports the read timeout as SMTPServerDisconnected ("Connection
    unexpectedly closed: timed out"), which ``_dropped`` takes for a session the relay let go
    "before it took the message": the notice is sent again at once on a new session. The team
    gets it twice from one failed attempt (and again at each retry), and the notifier process
    waits two timeouts instead of one. Before the change each attempt sent it once."""
    monkeypatch.setattr(notifications, "NOTIFY_TIMEOUT_SECONDS", QUICK_TIMEOUT)
    mailbox = SlowToAnswer()
    with running_smtp(mailbox) as controller:
        url = f"smtp://127.0.0.1:{controller.port}"
        send(url, 1)
        started = time.monotonic()
        with pytest.raises(NotificationError):
            send(url, 2)  # the task will retry it
        waited = time.monotonic() - started
        time.sleep(mailbox.delay + 0.3)  # whatever the relay took is in its queue by now
    assert len(message_ids(mailbox, 2)) == 1, "one failed attempt, the notice queued twice"
    assert waited < 2 * QUICK_TIMEOUT, f"the attempt waited {waited:.2f}s: two timeouts"


@dataclass
class FreezesAtMail(SessionMailbox):
    """Does not answer the second MAIL of the first session (a hung session, nothing sent)."""

    freeze: float = 1.0

    async def handle_MAIL(self, server, session, envelope, address, options):  # noqa: N802
        if self.number(session) == 1 and self.mails[1] >= 1:
            self.mails[1] += 1
            await asyncio.sleep(self.freeze)
            return "451 4.3.0 Too late"
        return await super().handle_MAIL(server, session, envelope, address, options)


def test_a_kept_session_that_hangs_before_the_message_still_gets_the_notice_once(monkeypatch):
    """The session hangs at MAIL, before anything of the message was sent: the notice arrives
    once (on a new session, now or at the task's retry), and the hung session is not used
    again."""
    monkeypatch.setattr(notifications, "NOTIFY_TIMEOUT_SECONDS", QUICK_TIMEOUT)
    mailbox = FreezesAtMail()
    with running_smtp(mailbox) as controller:
        url = f"smtp://127.0.0.1:{controller.port}"
        send(url, 1)
        assert len(attempts(url, 2)) <= 1
        send(url, 3)
    assert mailbox.subjects() == [subject(1), subject(2), subject(3)]
    assert mailbox.peers[0] == 1
    assert mailbox.peers[1] == mailbox.peers[2] != 1


# -- 421 to everything ---------------------------------------------------------------------------


@dataclass
class ClosingForGood(SessionMailbox):
    """Takes one message, then answers every MAIL, on any session, with 421 (shutting down)."""

    async def handle_MAIL(self, server, session, envelope, address, options):  # noqa: N802
        if sum(self.mails.values()) >= 1:
            self.mails[self.number(session)] += 1
            return "421 4.3.2 Service shutting down, closing transmission channel"
        return await super().handle_MAIL(server, session, envelope, address, options)


def test_a_relay_that_answers_421_to_every_mail_fails_the_notice_without_looping():
    """The replacement is tried once: the notice fails (the task retries it with backoff), and
    the relay sees two MAILs for it, not a loop of new sessions."""
    mailbox = ClosingForGood()
    with running_smtp(mailbox) as controller:
        url = f"smtp://127.0.0.1:{controller.port}"
        send(url, 1)
        with pytest.raises(NotificationError, match="SMTPSenderRefused"):
            send(url, 2)
        assert sum(mailbox.mails.values()) == 1 + 2
        assert mailbox.sessions == 2
        with pytest.raises(NotificationError, match="SMTPSenderRefused"):
            send(url, 3)  # nothing was kept: one new session, one MAIL
        assert sum(mailbox.mails.values()) == 1 + 2 + 1
        assert mailbox.sessions == 3
    assert mailbox.subjects() == [subject(1)]


# -- TLS on the replacement session -----------------------------------------------------------


def test_a_replacement_session_to_a_relay_that_stopped_offering_starttls_sends_nothing(
    trusted,  # noqa: F811
):
    """The relay restarts and comes back without STARTTLS (someone in between strips it): the
    kept session is dead, and its replacement refuses to go on in clear text."""
    port = free_port()
    url = f"smtp+starttls://127.0.0.1:{port}"
    before, after = SessionMailbox(), SessionMailbox()
    with running_smtp(before, port=port, **tls_options("smtp+starttls", trusted)):
        send(url, 1, ca_file=trusted.ca_file)
        kept = keep_across_restart()
    notifications._kept.session = kept
    with running_smtp(after, port=port):  # clear text only
        errors = attempts(url, 2, ca_file=trusted.ca_file)
    assert errors[-1:] == ["smtp: SMTPNotSupportedError"]
    assert before.subjects() == [subject(1)]
    assert after.messages == []


@pytest.mark.parametrize("scheme", ["smtp+starttls", "smtps"])
def test_a_replacement_session_to_an_impostor_certificate_sends_nothing(
    trusted,  # noqa: F811
    impostor,  # noqa: F811
    scheme,
):
    """Between two notices the relay's address starts answering with a certificate from
    another CA: the replacement session verifies it, as a first session would, and stops."""
    port = free_port()
    url = f"{scheme}://127.0.0.1:{port}"
    before, after = SessionMailbox(), SessionMailbox()
    with running_smtp(before, port=port, **tls_options(scheme, trusted)):
        send(url, 1, ca_file=trusted.ca_file)
        kept = keep_across_restart()
    notifications._kept.session = kept
    with running_smtp(after, port=port, **tls_options(scheme, impostor)):
        errors = attempts(url, 2, ca_file=trusted.ca_file)
    assert errors[-1:] == ["smtp: SSLCertVerificationError"]
    assert after.messages == []


def test_a_session_verified_with_one_ca_file_is_not_reused_under_another(
    trusted,  # noqa: F811
    rogue_ca,  # noqa: F811
    tmp_path,
):
    """The same URL with a CA file that does not vouch for the relay: no riding the session
    the other CA file verified; the new one is checked and refused."""
    other = issue_tls_files(rogue_ca, tmp_path / "other-ca")
    mailbox = SessionMailbox()
    with running_smtp(mailbox, **tls_options("smtp+starttls", trusted)) as controller:
        url = f"smtp+starttls://127.0.0.1:{controller.port}"
        send(url, 1, ca_file=trusted.ca_file)
        with pytest.raises(NotificationError, match="SSLCertVerificationError"):
            send(url, 2, ca_file=other.ca_file)
        send(url, 3, ca_file=trusted.ca_file)
    assert mailbox.subjects() == [subject(1), subject(3)]


@pytest.mark.parametrize("scheme", ["smtp", "smtp+starttls", "smtps"])
def test_a_session_the_relay_timed_out_is_replaced_at_once(
    trusted,  # noqa: F811
    scheme,
):
    """The relay closes an idle session on its own (its idle timeout, shorter than ours), over
    TLS too: the next notice goes on a new session at once instead of failing and waiting for
    the task's retry."""
    mailbox = SessionMailbox()
    options = {**tls_options(scheme, trusted), "timeout": 0.3}
    with running_smtp(mailbox, **options) as controller:
        url = f"{scheme}://127.0.0.1:{controller.port}"
        send(url, 1, ca_file=trusted.ca_file)
        time.sleep(0.7)
        send(url, 2, ca_file=trusted.ca_file)
    assert mailbox.subjects() == [subject(1), subject(2)]
    assert mailbox.peers == [1, 2]


# -- credentials ----------------------------------------------------------------------------------


@dataclass
class AuthMailbox(SessionMailbox):
    """Logs clients in with any of ``passwords``; keeps the password each message came under."""

    passwords: set[bytes] = field(default_factory=set)
    logged_in_with: list[bytes] = field(default_factory=list)

    def authenticator(self, _server, session, _envelope, _mechanism, auth_data) -> AuthResult:
        self.number(session)
        if getattr(auth_data, "password", None) in self.passwords:
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        self.logged_in_with.append(session.auth_data.password)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def auth_server() -> Iterator[tuple[int, AuthMailbox]]:
    mailbox = AuthMailbox()
    options = {
        "authenticator": mailbox.authenticator,
        "auth_require_tls": False,
    }
    with running_smtp(mailbox, **options) as controller:
        yield controller.port, mailbox


def test_new_credentials_in_the_url_log_in_again_on_a_new_session(auth_server):
    """The operator rotates the relay password: a notice for the new URL never goes over the
    session the old password opened."""
    port, mailbox = auth_server
    mailbox.passwords = {b"old-secret", b"new-secret"}
    send(f"smtp://notifier:old-secret@127.0.0.1:{port}", 1)
    send(f"smtp://notifier:new-secret@127.0.0.1:{port}", 2)
    send(f"smtp://notifier:new-secret@127.0.0.1:{port}", 3)
    assert mailbox.subjects() == [subject(1), subject(2), subject(3)]
    assert mailbox.logged_in_with == [b"old-secret", b"new-secret", b"new-secret"]
    assert mailbox.peers[0] != mailbox.peers[1] == mailbox.peers[2]


def test_a_refused_login_on_a_replacement_session_names_no_password_or_recipient(auth_server):
    """The kept session is closed by the relay (421) and the replacement's login is refused
    (the password was revoked): the error the worker logs and audits names the class only."""
    port, mailbox = auth_server
    mailbox.passwords = {b"p@ss/w0rd"}
    mailbox.per_session = 1
    url = f"smtp://notifier:p%40ss%2Fw0rd@127.0.0.1:{port}"
    secrets = ("p@ss/w0rd", "p%40ss%2Fw0rd", "refills@pharmacy.test", url)
    send(url, 1)
    mailbox.passwords = set()
    with pytest.raises(NotificationError) as raised:
        send(url, 2)
    assert str(raised.value) == "smtp: SMTPAuthenticationError"
    rendered = "".join(traceback.format_exception(raised.value))
    for secret in secrets[:2]:
        assert secret not in rendered, "the password in the worker's traceback"
    for secret in secrets:
        assert secret not in str(raised.value)
    assert mailbox.subjects() == [subject(1)]


# -- a time limit mid-send -----------------------------------------------------------------------


def test_a_soft_time_limit_mid_send_never_leaves_the_half_used_session_for_the_next_notice():
    """Celery's SoftTimeLimitExceeded (not an OSError) arrives while the relay is still
    answering DATA. Reusing that session, the next notice would read the old 250 as the answer
    to its MAIL and fail or be taken for sent; it must go on a new session and arrive."""
    mailbox = SlowToAnswer(delay=1.0)

    def time_is_up(_signum, _frame):
        raise SoftTimeLimitExceeded

    with running_smtp(mailbox) as controller:
        url = f"smtp://127.0.0.1:{controller.port}"
        send(url, 1)
        previous = signal.signal(signal.SIGALRM, time_is_up)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(SoftTimeLimitExceeded):
                send(url, 2)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        mailbox.delay = 0.0
        send(url, 3)
    assert message_ids(mailbox, 3) == ["<intake.outbox.3@pharmacy.test>"]
    by_subject = dict(zip(mailbox.subjects(), mailbox.peers, strict=True))
    assert by_subject[subject(3)] != by_subject[subject(1)]


# -- processes and threads ---------------------------------------------------------------------


def test_a_forked_child_never_talks_on_its_parents_tls_session(
    trusted,  # noqa: F811
):
    """Over TLS one record written by the child on the parent's session would break the
    parent's next message (a bad record MAC): the child opens its own, even when the parent's
    looks stale to it, and the parent's next notice goes on its own session."""
    mailbox = SessionMailbox()
    with running_smtp(mailbox, **tls_options("smtp+starttls", trusted)) as controller:
        url = f"smtp+starttls://127.0.0.1:{controller.port}"
        send(url, 1, ca_file=trusted.ca_file)
        child = os.fork()
        if child == 0:  # pragma: no cover - the child's outcome is read from its exit status
            try:
                notifications.SMTP_IDLE_SECONDS = 0.0  # the parent's session looks stale
                send(url, 2, ca_file=trusted.ca_file)
                close_smtp_sessions()
            except BaseException:
                os._exit(1)
            os._exit(0)
        _pid, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        send(url, 3, ca_file=trusted.ca_file)
    by_subject = dict(zip(mailbox.subjects(), mailbox.peers, strict=True))
    assert sorted(by_subject) == [subject(1), subject(2), subject(3)]
    assert by_subject[subject(1)] == by_subject[subject(3)], "the parent's session was broken"
    assert by_subject[subject(2)] != by_subject[subject(1)]


def test_threads_sending_at_once_each_keep_their_own_session():
    """Four threads, five notices each, at the same moment: no two messages interleave on one
    session, every notice arrives once, and each thread keeps to one session."""
    mailbox = SessionMailbox()
    errors: list[BaseException] = []
    with running_smtp(mailbox) as controller:
        url = f"smtp://127.0.0.1:{controller.port}"
        start = threading.Barrier(4)

        def burst(first: int) -> None:
            try:
                start.wait(5)
                for number in range(first, first + 5):
                    send(url, number)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
            finally:
                close_smtp_sessions()

        threads = [threading.Thread(target=burst, args=(10 * n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert errors == []
    expected = [subject(10 * n + k) for n in range(4) for k in range(5)]
    assert sorted(mailbox.subjects()) == sorted(expected)
    by_subject = dict(zip(mailbox.subjects(), mailbox.peers, strict=True))
    sessions = [{by_subject[subject(10 * n + k)] for k in range(5)} for n in range(4)]
    assert all(len(used) == 1 for used in sessions), sessions
    assert len(set.union(*sessions)) == 4


# -- what the documentation promises the relay -----------------------------------------------------


@dataclass
class WatchedSessions(SessionMailbox):
    """Keeps the server side of each session, to see whether the client has ended it."""

    servers: list[Any] = field(default_factory=list)
    quits: int = 0

    async def handle_QUIT(self, _server, _session, _envelope) -> str:  # noqa: N802
        self.quits += 1
        return "221 Bye"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        self.servers.append(server)
        return await super().handle_DATA(server, session, envelope)

    def open_sessions(self) -> int:
        return sum(
            1 for s in self.servers if s.transport is not None and not s.transport.is_closing()
        )


def test_a_session_left_idle_is_ended_with_quit_by_the_next_notice(monkeypatch):
    """docs/operations.md: a session unused for SMTP_IDLE_SECONDS is not used again; the next
    notice says QUIT on it (the relay logs a clean end, not a lost connection) and goes on a
    new session."""
    monkeypatch.setattr(notifications, "SMTP_IDLE_SECONDS", 0.2)
    mailbox = WatchedSessions()
    with running_smtp(mailbox) as controller:
        url = f"smtp://127.0.0.1:{controller.port}"
        send(url, 1)
        time.sleep(0.4)  # twice the idle time, and no notice meanwhile
        assert mailbox.open_sessions() == 1, "nothing closes a session between notices"
        send(url, 2)
        deadline = time.monotonic() + 2
        while mailbox.open_sessions() > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        still_open, quits = mailbox.open_sessions(), mailbox.quits
    assert mailbox.subjects() == [subject(1), subject(2)]
    assert mailbox.peers == [1, 2]
    assert quits == 1, "the idle session was dropped without a QUIT"
    assert still_open == 1, "the idle session was left open beside the new one"
