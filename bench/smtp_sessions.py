"""Measure the team e-mail's cost with the SMTP session kept, against bare smtplib.

A notifier worker keeps its SMTP session open between notices
(``intake.requests.notifications.send_email``). This measures what that saves, on clear-text
``smtp://`` and on ``smtp+starttls://`` (what production uses), sending N notices to a real
aiosmtpd server run in its own process (so only the sender's CPU is counted here):

- **bare**: smtplib on one session (STARTTLS once), ``send_message`` N times: the floor;
- **per message**: Intake's ``send_email`` with one message per session, as it sent before
  sessions were kept: connect, EHLO, STARTTLS, MAIL, RCPT, DATA, QUIT for every notice;
- **kept**: Intake's ``send_email`` as it runs.

Checks (the run fails if any does not hold): the server received N messages for each variant,
over one session for bare, N for per message, and for kept one per
``SMTP_MESSAGES_PER_SESSION`` messages (the cap a worker sets itself).

    .venv/bin/python bench/smtp_sessions.py                    # 2,000 messages
    .venv/bin/python bench/smtp_sessions.py --messages 20 --out /tmp/x   # what the test runs

Results go to ``bench/results/smtp-sessions-<time>.md`` and ``.json`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``intake`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
SENDER, RECIPIENT = "intake@pharmacy.test", "refills@pharmacy.test"


class CountingSink:
    """aiosmtpd handler (``-c bench.smtp_sessions.CountingSink <file>``): one line per message
    with the number of the client session it came on, so the bench counts messages and
    sessions (a client's port can come back on a later session: it cannot tell them apart)."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the server's life
        self.sessions = 0

    @classmethod
    def from_cli(cls, _parser: Any, *args: str) -> CountingSink:
        return cls(args[0])

    async def handle_DATA(self, _server: Any, session: Any, _envelope: Any) -> str:  # noqa: N802
        if not hasattr(session, "bench_number"):
            self.sessions += 1
            session.bench_number = self.sessions
        self.file.write(f"{session.bench_number}\n")
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(folder: Path, tls: tuple[Path, Path] | None) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    received = folder / f"received-{port}.txt"
    received.touch()
    command = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}"]
    if tls:
        command += ["--tlscert", str(tls[0]), "--tlskey", str(tls[1]), "--no-requiretls"]
    command += ["-c", "bench.smtp_sessions.CountingSink", str(received)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(command, env=env, cwd=ROOT)  # noqa: S603
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server, port, received
        time.sleep(0.05)
    server.kill()
    raise SystemExit("the SMTP server did not start")


def bare(url: str, count: int, ca_file: Path | None) -> None:
    from intake.ops.transport import tls_client_context

    port = int(url.rsplit(":", 1)[1])
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        if url.startswith("smtp+starttls"):
            client.starttls(context=tls_client_context(ca_file))
        for number in range(count):
            message = EmailMessage()
            message["From"], message["To"] = SENDER, RECIPIENT
            message["Subject"] = f"Refill request R-7K3M-{number:04d} for Refills (Main St)"
            message["Message-ID"] = f"<intake.outbox.{number}@pharmacy.test>"
            message.set_content("A refill request is waiting.\n")
            client.send_message(message)


def intake_sender(per_session: int | None) -> Callable[[str, int, Path | None], None]:
    def send(url: str, count: int, ca_file: Path | None) -> None:
        from intake.requests import notifications

        notice = notifications.Notice(
            reference="R-7K3M-Q9P2",
            kind="refill",
            topic=None,
            priority="normal",
            team="refills-main",
            team_name="Refills (Main St)",
            sla_due_at=datetime(2026, 12, 1, 18, 0, tzinfo=UTC),
            link="https://intake.example/staff/requests/R-7K3M-Q9P2",
        )
        default = notifications.SMTP_MESSAGES_PER_SESSION
        notifications.SMTP_MESSAGES_PER_SESSION = per_session or default
        try:
            for number in range(count):
                notifications.send_email(
                    url,
                    SENDER,
                    RECIPIENT,
                    notice,
                    ca_file=ca_file,
                    message_id=notifications.message_id(SENDER, number),
                )
            notifications.close_smtp_sessions()
        finally:
            notifications.SMTP_MESSAGES_PER_SESSION = default

    return send


VARIANTS: dict[str, Callable[[str, int, Path | None], None]] = {
    "bare": bare,
    "per message": intake_sender(1),
    "kept": intake_sender(None),
}


def wait_received(path: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines()
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    return path.read_text().splitlines()


def run(count: int, folder: Path) -> list[dict[str, Any]]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    rows = []
    for scheme, tls in (("smtp", None), ("smtp+starttls", (cert_file, key_file))):
        for variant, send in VARIANTS.items():
            server, port, received = start_server(folder, tls)
            try:
                url = f"{scheme}://127.0.0.1:{port}"
                send(url, 1, ca_file if tls else None)  # imports and first handshake not counted
                wait_received(received, 1)
                received.write_text("")
                cpu, wall = time.process_time(), time.perf_counter()
                send(url, count, ca_file if tls else None)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                lines = wait_received(received, count)
            finally:
                server.terminate()
                server.wait(10)
            rows.append(
                {
                    "scheme": scheme,
                    "variant": variant,
                    "messages": len(lines),
                    "sessions": len(set(lines)),
                    "per_s": count / wall,
                    "cpu_ms_per_message": 1000 * cpu / count,
                }
            )
    return rows


def check(rows: list[dict[str, Any]], count: int) -> list[str]:
    problems = []
    for row in rows:
        where = f"{row['scheme']} {row['variant']}"
        if row["messages"] != count:
            problems.append(f"{where}: the server received {row['messages']} of {count}")
        from intake.requests.notifications import SMTP_MESSAGES_PER_SESSION as cap

        wanted = {"bare": 1, "per message": count}.get(row["variant"], -(-count // cap))
        if row["sessions"] != wanted:
            problems.append(f"{where}: {row['sessions']} sessions, expected {wanted}")
    return problems


def table(rows: list[dict[str, Any]]) -> str:
    bare = {row["scheme"]: row for row in rows if row["variant"] == "bare"}
    lines = [
        "| scheme | variant | sessions | messages/s | × bare | sender CPU ms/message | × bare |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = bare[row["scheme"]]
        lines.append(
            f"| {row['scheme']} | {row['variant']} | {row['sessions']} | {row['per_s']:,.0f} | "
            f"{row['per_s'] / base['per_s']:.2f} | {row['cpu_ms_per_message']:.3f} | "
            f"{row['cpu_ms_per_message'] / base['cpu_ms_per_message']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        rows = run(args.messages, Path(scratch))
    problems = check(rows, args.messages)
    stamp = datetime.now(UTC)
    report = {
        "date": stamp.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
        },
        "messages": args.messages,
        "rows": rows,
        "problems": problems,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"smtp-sessions-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    text = f"# SMTP sessions, {report['date']}, {args.messages} messages\n\n{table(rows)}"
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
