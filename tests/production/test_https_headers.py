"""HSTS on every answer that leaves the proxy, including those nginx writes itself.

The app adds ``Strict-Transport-Security`` to its own responses; nginx answers some requests
without asking the app: a body over its 2 MiB limit (413), a malformed request (400), and
502/504 while gunicorn restarts. A browser whose first visit meets one of those learns no HSTS,
so its next ``http://`` visit can be stripped. Requests here are written byte for byte (raw
sockets), since no well-behaved client sends them.
"""

from __future__ import annotations

import contextlib
import re
import socket
from urllib.parse import urlsplit

import pytest

from tests.production.conftest import ProductionStack

pytestmark = pytest.mark.postgres

ONE_YEAR = 365 * 24 * 3600


def raw_https(stack: ProductionStack, head: list[str], body: bytes = b"") -> list[str]:
    """Send ``head`` (request line and headers) and ``body`` through nginx; the answer's head."""
    parts = urlsplit(stack.base_url)
    assert parts.hostname and parts.port
    with (
        socket.create_connection((parts.hostname, parts.port), timeout=30) as plain,
        stack.ssl_context().wrap_socket(plain, server_hostname=parts.hostname) as tls,
    ):
        lines = [*head, f"Content-Length: {len(body)}", "Connection: close", "", ""]
        # nginx may answer (and close) before the whole body is sent.
        with contextlib.suppress(OSError):
            tls.sendall("\r\n".join(lines).encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = tls.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")


def hsts_values(head: list[str]) -> list[str]:
    return [
        line.split(":", 1)[1].strip()
        for line in head[1:]
        if line.lower().startswith("strict-transport-security:")
    ]


def test_every_answer_through_the_proxy_carries_hsts_once(production_stack: ProductionStack):
    host = urlsplit(production_stack.base_url).netloc
    form = "Content-Type: application/x-www-form-urlencoded"
    cases = {
        "a page": (["GET / HTTP/1.1", f"Host: {host}"], b"", 200),
        "the app's 404": (["GET /no-such-page HTTP/1.1", f"Host: {host}"], b"", 404),
        "nginx's 413": (
            ["POST /contact HTTP/1.1", f"Host: {host}", form],
            b"message=" + b"x" * (3 * 1024 * 1024),
            413,
        ),
        "nginx's 400": (["GET / HTTP/1.1", "Host: "], b"", 400),
    }
    wrong = {}
    for what, (head, body, status) in cases.items():
        answer = raw_https(production_stack, head, body)
        assert answer[0].split(" ")[1] == str(status), (what, answer[0])
        values = hsts_values(answer)
        age = re.match(r"max-age=(\d+)", values[0]) if len(values) == 1 else None
        if age is None or int(age.group(1)) < ONE_YEAR:
            wrong[what] = values
    assert wrong == {}, f"answers without exactly one year-long HSTS header: {wrong}"
