"""TLS to the mail server and to Redis, with real servers and certificates from a test CA.

A redis-server listening on TLS only and aiosmtpd with STARTTLS (or TLS from the first byte) use
certificates from ``trustme``. What must hold: with the operator's CA a request is routed over
``rediss://`` by a real worker and its notification arrives encrypted; a certificate from any
other CA is refused, and nothing is sent in clear text instead.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request
from intake.requests.notifications import Notice, NotificationError, send_email
from tests.conftest import Patient, reference_from
from tests.workers.conftest import (
    RedisServer,
    TlsFiles,
    email_routing_file,
    issue_tls_files,
    running_smtp,
    wait_until,
)

trustme = pytest.importorskip("trustme")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


@pytest.fixture(scope="session")
def pharmacy_ca() -> Any:
    """The CA the operator trusts (INTAKE_SMTP_CA_FILE, INTAKE_REDIS_CA_FILE)."""
    return trustme.CA()


@pytest.fixture(scope="session")
def rogue_ca() -> Any:
    """Anyone else's CA: an impostor's server presents a certificate from it."""
    return trustme.CA()


@pytest.fixture
def trusted(pharmacy_ca, tmp_path) -> TlsFiles:
    return issue_tls_files(pharmacy_ca, tmp_path / "trusted")


@pytest.fixture
def impostor(rogue_ca, tmp_path) -> TlsFiles:
    return issue_tls_files(rogue_ca, tmp_path / "impostor")


@dataclass
class TlsMailbox:
    """Keeps each message with the TLS version it came over (None: clear text)."""

    messages: list[Any] = field(default_factory=list)
    tls_versions: list[str | None] = field(default_factory=list)

    async def handle_DATA(self, server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802
        ssl_object = server.transport.get_extra_info("ssl_object")
        self.tls_versions.append(ssl_object.version() if ssl_object else None)
        self.messages.append(message_from_bytes(envelope.content))
        return "250 Message accepted for delivery"


def server_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert_file, files.key_file)
    return context


@pytest.fixture
def smtp_servers() -> Iterator[Callable[..., tuple[int, TlsMailbox]]]:
    """Start aiosmtpd servers: ``starttls=files`` offers STARTTLS, ``implicit=files`` is SMTPS."""
    with contextlib.ExitStack() as servers:

        def start(
            *, starttls: TlsFiles | None = None, implicit: TlsFiles | None = None
        ) -> tuple[int, TlsMailbox]:
            mailbox = TlsMailbox()
            options: dict[str, Any] = {}
            if starttls:
                # Clear text stays allowed on purpose: a client that skipped TLS would be served.
                options.update(tls_context=server_context(starttls), require_starttls=False)
            if implicit:
                options.update(ssl_context=server_context(implicit), server_hostname="127.0.0.1")
            controller = servers.enter_context(running_smtp(mailbox, **options))
            return controller.port, mailbox

        yield start


NOTICE = Notice(
    reference="R-7K3M-Q9P2",
    kind="refill",
    topic=None,
    priority="normal",
    team="refills-main",
    team_name="Refills (Main St)",
    sla_due_at=datetime(2026, 12, 1, 18, 0, tzinfo=UTC),
    link="https://intake.example/staff/requests/R-7K3M-Q9P2",
)


def serve(smtp_servers: Callable[..., tuple[int, TlsMailbox]], scheme: str, files: TlsFiles):
    """A server for ``scheme``: STARTTLS on a clear-text port, or TLS from the first byte."""
    return smtp_servers(**{"starttls" if scheme == "smtp+starttls" else "implicit": files})


def send(url: str, ca_file: Path | None) -> None:
    send_email(url, "intake@pharmacy.test", "refills@pharmacy.test", NOTICE, ca_file=ca_file)


@pytest.mark.parametrize("scheme", ["smtp+starttls", "smtps"])
def test_mail_goes_over_tls_to_a_server_the_ca_file_vouches_for(smtp_servers, trusted, scheme):
    port, mailbox = (
        smtp_servers(starttls=trusted)
        if scheme == "smtp+starttls"
        else smtp_servers(implicit=trusted)
    )
    send(f"{scheme}://127.0.0.1:{port}", trusted.ca_file)
    assert [m["Subject"] for m in mailbox.messages] == [
        "Refill request R-7K3M-Q9P2 for Refills (Main St)"
    ]
    assert mailbox.tls_versions[0] in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("scheme", ["smtp+starttls", "smtps"])
@pytest.mark.parametrize("trust", ["the operator's CA", "the system's trust store"])
def test_an_impostor_certificate_stops_the_mail_and_nothing_goes_in_clear(
    smtp_servers, trusted, impostor, scheme, trust
):
    port, mailbox = (
        smtp_servers(starttls=impostor)
        if scheme == "smtp+starttls"
        else smtp_servers(implicit=impostor)
    )
    ca_file = trusted.ca_file if trust == "the operator's CA" else None
    with pytest.raises(NotificationError, match="SSLCertVerificationError"):
        send(f"{scheme}://127.0.0.1:{port}", ca_file)
    assert mailbox.messages == []


def test_a_certificate_for_another_host_name_is_refused(smtp_servers, pharmacy_ca, tmp_path):
    elsewhere = issue_tls_files(pharmacy_ca, tmp_path / "elsewhere", "mail.elsewhere.test")
    port, mailbox = smtp_servers(starttls=elsewhere)
    with pytest.raises(NotificationError, match="SSLCertVerificationError"):
        send(f"smtp+starttls://127.0.0.1:{port}", elsewhere.ca_file)
    assert mailbox.messages == []


def test_a_server_that_does_not_offer_starttls_gets_no_mail(smtp_servers, trusted):
    port, mailbox = smtp_servers()  # clear text only: a downgrade by someone in between
    with pytest.raises(NotificationError, match="SMTPNotSupportedError"):
        send(f"smtp+starttls://127.0.0.1:{port}", trusted.ca_file)
    assert mailbox.messages == []


# -- the pipeline over rediss:// and STARTTLS ----------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path, trusted) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password="tls-test-" + tmp_path.name[-8:], tls=trusted)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def impostor_redis(tmp_path, impostor) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password="tls-test-" + tmp_path.name[-8:], tls=impostor)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_worker_routes_over_rediss_and_mails_the_team_over_starttls(
    base_settings, database_url, tmp_path, tls_redis, trusted, smtp_servers, celery_processes
):
    from intake import create_app

    port, mailbox = smtp_servers(starttls=trusted)
    settings = base_settings.replace(
        database_url=database_url,
        data_dir=tmp_path / "data",
        redis_url=tls_redis.url,
        redis_ca_file=trusted.ca_file,
        smtp_url=f"smtp+starttls://127.0.0.1:{port}",
        smtp_ca_file=trusted.ca_file,
        routing_file=email_routing_file(tmp_path),
    )
    settings.check_transport()
    app = create_app(settings)
    app.config["TESTING"] = True
    try:
        assert app.extensions["intake.broker_check"]()
        celery_processes(settings).wait_ready()
        reference = reference_from(Patient(app.test_client()).refill())
        wait_until(lambda: mailbox.messages, 30, message="the team's e-mail")

        def sent_event():
            # The worker records the sending after the server has taken the message.
            with app.app_context():
                return db.session.execute(
                    sa.select(AuditEvent).where(AuditEvent.action == "notification.sent")
                ).scalar_one_or_none()

        sent = wait_until(sent_event, 30, message="notification.sent in the audit trail")
        with app.app_context():
            row = db.session.execute(
                sa.select(Request).where(Request.reference == reference)
            ).scalar_one()
        assert row.status == "queued" and sent.reference == reference
        assert reference in mailbox.messages[0]["Subject"]
        assert len(mailbox.tls_versions) == 1 and mailbox.tls_versions[0] in TLS_VERSIONS
    finally:
        app.extensions["celery"].close()
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_broker_with_an_impostor_certificate_gets_no_task(
    base_settings, database_url, tmp_path, impostor_redis, trusted, make_app
):
    settings = base_settings.replace(
        database_url=database_url,
        data_dir=tmp_path / "data",
        redis_url=impostor_redis.url,
        redis_ca_file=trusted.ca_file,
    )
    app = make_app(settings)
    app.config["TESTING"] = True
    try:
        assert not app.extensions["intake.broker_check"]()
        # The patient is not turned away: the request waits in the outbox for a trusted broker.
        reference = reference_from(Patient(app.test_client()).refill())
        with app.app_context():
            pending = db.session.execute(
                sa.select(OutboxMessage.status, OutboxMessage.published_at)
                .join(Request, Request.id == OutboxMessage.request_id)
                .where(Request.reference == reference)
            ).one()
        assert pending == ("pending", None)
        with impostor_redis.client() as client:
            assert client.keys("*") == []
    finally:
        app.extensions["celery"].close()
