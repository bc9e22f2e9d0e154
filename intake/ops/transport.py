"""TLS to the services Intake talks to: the mail server and Redis.

Why: notifications and task messages carry no PHI, but they do carry references, staff links and
passwords (SMTP login, Redis AUTH), and a broker an attacker can impersonate could feed workers
forged task messages. Every TLS connection here checks the server's certificate chain and its
name: against the system's trust store, or only against the CA bundle the operator names
(``INTAKE_SMTP_CA_FILE``, ``INTAKE_REDIS_CA_FILE``) for a private CA. Nothing falls back to clear
text when TLS fails.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from config import Settings


def tls_client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A client context that verifies the chain and the host name (TLS 1.2 or later)."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def redis_uses_tls(settings: Settings) -> bool:
    return bool(settings.redis_url and settings.redis_url.startswith("rediss://"))


def redis_ssl_options(settings: Settings) -> dict[str, Any]:
    """redis-py connection options for a ``rediss://`` URL: verify the certificate and name.

    Used by the Celery broker (``broker_use_ssl``: kombu would otherwise accept any certificate
    for a ``rediss://`` URL) and by the rate limiter's storage. Empty for ``redis://``.
    """
    if not redis_uses_tls(settings):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    if settings.redis_ca_file:
        options["ssl_ca_certs"] = str(settings.redis_ca_file)
    return options
