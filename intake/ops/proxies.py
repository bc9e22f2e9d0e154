"""Honour ``X-Forwarded-*`` only from the reverse proxies the operator named by address.

Why: the client address is an identity here. It keys the rate limits and the failed-login
throttle, and its keyed hash goes into every audit event. Trusting forwarded headers by hop count
(werkzeug's ``ProxyFix``) believes whoever connects, so a client that reaches the app server
directly could set ``X-Forwarded-For`` to a new address on every attempt and escape every
throttle, or forge another person's pseudonym in the audit trail. This middleware believes the
headers only when the connecting peer is inside ``INTAKE_TRUSTED_PROXIES`` (addresses or
networks), walks ``X-Forwarded-For`` from the right past further trusted proxies, and takes the
first untrusted address as the client. From anyone else the headers are removed before the app
sees them. It works the same under gunicorn and waitress, so ``intake serve`` behind a proxy
and the production stack tell clients apart by one rule.

Assumes each trusted proxy overwrites or appends to ``X-Forwarded-For`` with the address it saw
(nginx: ``$remote_addr`` or ``$proxy_add_x_forwarded_for``) and sets ``X-Forwarded-Proto``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from config.settings import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

FORWARDED_HEADERS = (
    "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_PROTO",
    "HTTP_X_FORWARDED_HOST",
    "HTTP_X_FORWARDED_PORT",
    "HTTP_X_FORWARDED_PREFIX",
    "HTTP_FORWARDED",
)


def _address(text: str) -> IPAddress | None:
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _last_value(header: str) -> str:
    return header.rsplit(",", 1)[-1].strip()


class TrustedProxies:
    """WSGI middleware: take the client's address and scheme from trusted proxies only."""

    def __init__(self, app: Any, networks: Iterable[IPNetwork]) -> None:
        self.app = app
        self.networks = tuple(networks)

    def trusted(self, address: IPAddress | None) -> bool:
        if address is None:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address.version == net.version and address in net for net in self.networks)

    def client_address(self, peer: IPAddress, forwarded_for: str) -> IPAddress:
        """The first address, from the right, that is not one of our proxies."""
        client = peer
        for hop in reversed(forwarded_for.split(",")):
            if not self.trusted(client):
                break
            address = _address(hop)
            if address is None:
                break  # garbage in the header: stop at the last proxy we believe
            client = address
        return client

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        peer = _address(environ.get("REMOTE_ADDR", ""))
        if peer is not None and self.trusted(peer):
            forwarded_for = environ.get("HTTP_X_FORWARDED_FOR", "")
            if forwarded_for:
                environ["REMOTE_ADDR"] = str(self.client_address(peer, forwarded_for))
            proto = _last_value(environ.get("HTTP_X_FORWARDED_PROTO", "")).lower()
            if proto in ("http", "https"):
                environ["wsgi.url_scheme"] = proto
            host = _last_value(environ.get("HTTP_X_FORWARDED_HOST", ""))
            if host:
                environ["HTTP_HOST"] = host
            port = _last_value(environ.get("HTTP_X_FORWARDED_PORT", ""))
            if port.isdigit():
                environ["SERVER_PORT"] = port
        for name in FORWARDED_HEADERS:
            environ.pop(name, None)
        return self.app(environ, start_response)
