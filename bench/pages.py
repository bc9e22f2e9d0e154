"""Measure the staff queue, request and audit pages on a large PostgreSQL database.

Creates a throwaway database on the local server (``--postgres``, dropped afterwards, on
Ctrl-C and failure too), migrates it with ``intake db upgrade``, creates the demo teams and
users with the real account services, then bulk-loads ``--requests`` requests and
``--events`` audit events with PostgreSQL COPY:

- each request sealed exactly as ``intake.requests.submit`` seals it (a fresh data key
  wrapped by the keyring's KEK, the PHI document and the display name sealed under it, the
  blind indexes of phone, e-mail, last name + DOB and of the form's one-time key), routed by
  the real rules of ``config/routing.toml`` (team, priority, due time), with its consents, its
  outbox rows and, now and then, a sealed note; spread over about two years, most of them
  completed or cancelled, the newest an open backlog of about ``--open-per-team`` per team;
- each event hashed into the chain with ``intake.audit.chain``'s own canonical form, after the
  events the set-up wrote, and its (seq, hash) written to the audit anchor as
  ``record_event`` would, so ``intake audit verify`` holds the whole trail.

Indexes and constraints of the loaded tables are dropped for the load and rebuilt from their
own definitions afterwards (the schema is checked to be the same), then VACUUM (ANALYZE): a
bulk load leaves the visibility map unset (autovacuum would set it, some time later, on a
live insert-mostly table), and without it every index-only scan reads the heap. Then it runs
gunicorn with the production settings (as ``bench/pipeline.py`` does), logs in as the
pharmacist (staff) and the compliance officer with password and TOTP, and times each page
``--samples`` times, one request at a time after a warm-up. The same is done first on a small
database (``--small-requests``/``--small-events``), the baseline the big one is compared with.
With ``--explain``, the SQL each page issues is captured in-process and every statement slower
than ``--slow-ms`` is shown with ``EXPLAIN (ANALYZE, BUFFERS)``.

    .venv/bin/python bench/pages.py                                   # 100,000 / 1,000,000
    .venv/bin/python bench/pages.py --requests 1000000 --events 10000000 --explain
    .venv/bin/python bench/pages.py --requests 2000 --events 20000 --samples 5 --check

Results go to ``bench/results/pages-<time>.md`` and ``.json`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import heapq
import html
import http.client
import json
import multiprocessing
import os
import random
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the other benches as ``bench.*``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa

from bench.pipeline import (
    BIN,
    DEFAULT_POSTGRES,
    ROOT,
    Process,
    free_port,
    gunicorn_argv,
    http_ok,
    intake_env,
    machine,
    postgres_database,
    start_redis,
    versions,
    wait_until,
)
from intake.audit.chain import GENESIS_HASH, _canonical
from intake.audit.listings import backfill_listings
from intake.crypto import phi
from intake.models import KINDS, OPEN_STATUSES, PRIORITIES
from intake.ops.demo import ALPHABET, DEMO_USERS, FIRST, LAST, MESSAGES
from intake.requests.consents import accepted_consents
from intake.requests.references import ALPHABET as REFERENCE_ALPHABET
from intake.requests.routing import load_routing, needed_language
from intake.requests.submit import display_name, submission_key_index

CHUNK = 5_000  # requests per generated chunk (one COPY transaction each)
EVENT_BATCH = 100_000  # events per COPY transaction and anchor write
HISTORY_DAYS = 730
OPEN_WINDOW_SHARE = 0.6  # of the newest requests, the share still open
BULK_TABLES = ("requests", "consent_acceptances", "outbox", "notes", "audit_events")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NULL = "\\N"  # COPY text's NULL
AREA_CODES = ("202", "312", "512", "617", "713")
WARMUP = 20

# Where each kind of request comes from (shares of the whole), as a busy specialty pharmacy sees.
KIND_WEIGHTS = {"refill": 0.7, "contact": 0.3}
TOPIC_WEIGHTS = {
    "question": 0.3,
    "copay": 0.15,
    "specialist": 0.15,
    "insurance": 0.15,
    "transfer": 0.1,
    "side_effect": 0.15,
}
OPEN_WEIGHTS = {
    "queued": 0.45,
    "in_progress": 0.3,
    "waiting_on_patient": 0.15,
    "waiting_on_prescriber": 0.1,
}
NOTE_TEXTS = (
    "Called the prescriber's office; waiting for a call back.",
    "Patient confirmed the delivery address and the infusion date.",
    "Insurance needs a prior authorization; faxed the form.",
    "Left a voicemail, will try again tomorrow morning.",
)


# --- the plan: what every request is, the same in every process ----------------------------


@dataclass(frozen=True)
class Plan:
    """What the generator makes; each process rebuilds any chunk from it alone."""

    requests: int
    events: int
    seed: str
    end_us: int  # the newest request's time, microseconds since the epoch
    open_from: int  # requests from this index on may still be open
    staff_by_team: dict[str, list[int]]  # team -> user ids who work it
    # (kind, language) -> the consent texts its form accepts: (document, version, language, sha256)
    consents: dict[tuple[str, str], list[tuple[str, str, str, str]]]
    supervisor_id: int
    keyring_json: str
    database_url: str

    @property
    def span_us(self) -> int:
        return HISTORY_DAYS * 86_400_000_000

    @property
    def chunks(self) -> int:
        return -(-self.requests // CHUNK)


@dataclass
class Planned:
    """One request's plain fields and its life (no PHI)."""

    index: int
    id: str
    reference: str
    kind: str
    topic: str | None
    location: str | None
    language: str
    interpreter_language: str | None
    created_us: int
    team: str
    priority: str
    rule: str
    sla_due_at: datetime
    status: str
    assignee_id: int | None
    # (microseconds, actor user id, action, details) of the staff's work on it.
    work: list[tuple[int, int, str, dict[str, Any]]] = field(default_factory=list)
    note_id: str | None = None
    note_us: int = 0


_ROUTING: Any = None


def routing_table() -> Any:
    global _ROUTING
    if _ROUTING is None:
        _ROUTING = load_routing()
    return _ROUTING


def moment(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def reference_for(index: int, kind: str) -> str:
    """A unique reference per index: an odd multiplier is a bijection on 40 bits."""
    number = (index * 0x9E3779B97F + 0x5DEECE66D) & ((1 << 40) - 1)
    symbols = "".join(REFERENCE_ALPHABET[(number >> (5 * k)) & 31] for k in range(8))
    return f"{'R' if kind == 'refill' else 'C'}-{symbols[:4]}-{symbols[4:]}"


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), list(weights.values()))[0]


def plan_chunk(plan: Plan, chunk: int) -> list[Planned]:
    """The requests of ``chunk``, in time order; the same in every process."""
    rng = random.Random(f"{plan.seed}:{chunk}")
    table = routing_table()
    locations = list(table.locations)
    interpreters = list(table.languages)
    step = plan.span_us / plan.requests
    start_us = plan.end_us - plan.span_us
    out = []
    for index in range(chunk * CHUNK, min(plan.requests, (chunk + 1) * CHUNK)):
        kind = _pick(rng, KIND_WEIGHTS)
        topic = _pick(rng, TOPIC_WEIGHTS) if kind == "contact" else None
        location = (
            rng.choices(locations, [6, 2.5, 1.5][: len(locations)])[0] if kind == "refill" else None
        )
        language = "es" if rng.random() < 0.2 else "en"
        interpreter = rng.choice(interpreters) if rng.random() < 0.03 else None
        created_us = int(start_us + (index + rng.random()) * step)
        created = moment(created_us)
        need = needed_language(language, interpreter)
        decision = table.decide(
            {"kind": kind, "topic": topic, "location": location, "language": need}, created
        )
        team = decision.team
        people = plan.staff_by_team.get(team) or [plan.supervisor_id]
        if index >= plan.open_from and rng.random() < OPEN_WINDOW_SHARE:
            status = _pick(rng, OPEN_WEIGHTS)
        else:
            status = "completed" if rng.random() < 0.92 else "cancelled"
        planned = Planned(
            index=index,
            id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            reference=reference_for(index, kind),
            kind=kind,
            topic=topic,
            location=location,
            language=language,
            interpreter_language=interpreter,
            created_us=created_us,
            team=team,
            priority=decision.priority,
            rule=decision.rule.name,
            sla_due_at=decision.sla_due_at,
            status=status,
            assignee_id=None,
        )
        if status != "queued":
            worker = rng.choice(people)
            planned.assignee_id = worker if status not in ("completed", "cancelled") else None
            t = created_us + rng.randint(60, 6 * 3600) * 1_000_000
            planned.work.append((t, worker, "request.claimed", {"previous_assignee": None}))
            t += rng.randint(5, 120) * 1_000_000
            planned.work.append((t, worker, "phi.viewed", {"break_glass": False, "notes": 0}))
            t += rng.randint(5, 600) * 1_000_000
            planned.work.append(
                (t, worker, "request.status_changed", {"from": "queued", "to": "in_progress"})
            )
            if rng.random() < 0.3:
                t += rng.randint(60, 3600) * 1_000_000
                planned.note_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                planned.note_us = t
                text = rng.choice(NOTE_TEXTS)
                planned.work.append(
                    (t, worker, "note.added", {"note_id": planned.note_id, "length": len(text)})
                )
            if status != "in_progress":
                t += rng.randint(600, 5 * 86_400) * 1_000_000
                planned.work.append(
                    (
                        t,
                        worker,
                        "phi.viewed",
                        {"break_glass": False, "notes": int(bool(planned.note_id))},
                    )
                )
                planned.work.append(
                    (
                        t + 30_000_000,
                        worker,
                        "request.status_changed",
                        {"from": "in_progress", "to": status},
                    )
                )
        out.append(planned)
    return out


def phi_document(rng: random.Random, planned: Planned) -> dict[str, Any]:
    """What the patient's form gives ``submit_request`` (its ``cleaned`` fields)."""
    first, last = rng.choice(FIRST), rng.choice(LAST)
    created = moment(planned.created_us)
    document: dict[str, Any] = {
        "first_name": first,
        "last_name": last,
        "date_of_birth": (
            f"{rng.randint(1938, 2008)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        ),
        "phone": f"+1{rng.choice(AREA_CODES)}555{rng.randint(0, 9999):04d}",
        "contact_method": rng.choice(["phone", "phone", "sms", "email"]),
    }
    if rng.random() < 0.6:
        document["email"] = f"{first.lower()[:1]}{rng.randint(10, 9999)}@example.org"
    if planned.kind == "refill":
        document["rx_numbers"] = [
            str(rng.randint(1000000, 9999999)) for _ in range(rng.choice([1, 1, 1, 2, 3]))
        ]
        document["fulfillment"] = rng.choice(["pickup", "delivery", "ship"])
        if document["fulfillment"] != "pickup":
            document["address"] = f"{rng.randint(1, 9999)} Example Street, Springfield"
        if rng.random() < 0.4:
            document["medication"] = rng.choice(["Gamunex-C", "Privigen", "Hizentra", "Octagam"])
        if rng.random() < 0.3:
            document["needed_by"] = (
                (created + timedelta(days=rng.randint(2, 14))).date().isoformat()
            )
    else:
        document["message"] = MESSAGES[planned.topic or "question"]
    return document


def chunk_documents(plan: Plan, chunk: int, planned: list[Planned]) -> list[dict[str, Any]]:
    rng = random.Random(f"{plan.seed}:{chunk}:phi")
    return [phi_document(rng, p) for p in planned]


# --- COPY text ---------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bytes):
        return "\\\\x" + value.hex()
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
    text = str(value)
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        text = (
            text.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return text


def _line(values: tuple[Any, ...]) -> str:
    return "\t".join(map(_text, values)) + "\n"


REQUEST_COLUMNS = (
    "id",
    "reference",
    "kind",
    "topic",
    "location",
    "language",
    "interpreter_language",
    "language_need",
    "status",
    "priority",
    "priority_rank",
    "team",
    "assignee_id",
    "returned_by_id",
    "claimed_at",
    "last_activity_at",
    "escalated_at",
    "created_at",
    "updated_at",
    "routed_at",
    "sla_due_at",
    "kek_id",
    "wrapped_key_encrypted",
    "phi_encrypted",
    "display_name_encrypted",
    "phone_index",
    "email_index",
    "name_dob_index",
    "submission_key_index",
)
EVENT_COLUMNS = (
    "seq",
    "created_at",
    "actor",
    "actor_role",
    "action",
    "reference",
    "outcome",
    "details",
    "ip_hmac",
    "prev_hash",
    "hash",
)


def _copy(cursor: Any, table: str, columns: tuple[str, ...], lines: list[str]) -> None:
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for start in range(0, len(lines), 2000):
            copy.write("".join(lines[start : start + 2000]))


_CONNECTION: Any = None


def _open(url: str) -> Any:
    import psycopg

    dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = psycopg.connect(dsn)
    conn.execute("SET synchronous_commit = off")  # a bulk load: nothing to lose but the run
    return conn


def _connection(url: str) -> Any:
    """This process's connection for loading requests (each pool worker has its own)."""
    global _CONNECTION
    if _CONNECTION is None:
        _CONNECTION = _open(url)
    return _CONNECTION


def load_request_chunk(plan: Plan, chunk: int) -> int:
    """Seal and COPY the requests of ``chunk`` with their consents, outbox rows and notes."""
    keyring = phi.Keyring.from_json(plan.keyring_json)
    planned = plan_chunk(plan, chunk)
    documents = chunk_documents(plan, chunk, planned)
    requests, consents, outbox, notes = [], [], [], []
    rng = random.Random(f"{plan.seed}:{chunk}:notes")
    for p, document in zip(planned, documents, strict=True):
        # As submit_request: one data key per request, the PHI and the display name under it.
        data_key, wrapped = phi.new_data_key(keyring, p.id)
        sealed = phi.seal(data_key, p.id, phi.PHI_PURPOSE, document)
        display = phi.seal(data_key, p.id, phi.DISPLAY_PURPOSE, {"name": display_name(document)})
        dob = document.get("date_of_birth")
        created = moment(p.created_us)
        routed = created + timedelta(milliseconds=50 + p.index % 900)
        last = moment(p.work[-1][0]) if p.work else routed
        claimed = moment(p.work[0][0]) if p.assignee_id else None
        need = needed_language(p.language, p.interpreter_language)
        unmet = need != "en" and not routing_table().teams[p.team].serves(need)
        requests.append(
            _line(
                (
                    p.id,
                    p.reference,
                    p.kind,
                    p.topic,
                    p.location,
                    p.language,
                    p.interpreter_language,
                    need if unmet and p.status == "queued" else None,
                    p.status,
                    p.priority,
                    PRIORITIES.index(p.priority),
                    p.team,
                    p.assignee_id,
                    None,
                    claimed,
                    last if p.assignee_id else None,
                    None,
                    created,
                    last,
                    routed,
                    p.sla_due_at,
                    wrapped.kek_id,
                    wrapped.blob,
                    sealed,
                    display,
                    phi.phone_index(keyring, document["phone"]),
                    phi.email_index(keyring, document["email"]) if document.get("email") else None,
                    phi.name_dob_index(keyring, document["last_name"], dob) if dob else None,
                    submission_key_index(keyring, secrets.token_urlsafe(24)),
                )
            )
        )
        for document_name, version, language, digest in plan.consents[p.kind, p.language]:
            consents.append(_line((p.id, document_name, version, language, digest, created)))
        done = routed + timedelta(seconds=1)
        outbox.append(_line((p.id, "route_request", "done", 1, created, created, routed, routed)))
        outbox.append(_line((p.id, "notify_team", "done", 1, routed, routed, done, done)))
        if p.note_id:
            text = NOTE_TEXTS[rng.randrange(len(NOTE_TEXTS))]
            body = phi.seal(data_key, p.id, f"note:{p.note_id}", {"text": text})
            author = next(w[1] for w in p.work if w[2] == "note.added")
            notes.append(_line((p.note_id, p.id, author, moment(p.note_us), body)))
    conn = _connection(plan.database_url)
    with conn.cursor() as cursor:
        _copy(cursor, "requests", REQUEST_COLUMNS, requests)
        _copy(
            cursor,
            "consent_acceptances",
            ("request_id", "document", "version", "language", "sha256", "accepted_at"),
            consents,
        )
        _copy(
            cursor,
            "outbox",
            (
                "request_id",
                "task",
                "status",
                "attempts",
                "created_at",
                "published_at",
                "claimed_at",
                "done_at",
            ),
            outbox,
        )
        _copy(
            cursor,
            "notes",
            ("id", "request_id", "author_id", "created_at", "text_encrypted"),
            notes,
        )
    conn.commit()
    return len(planned)


def _note_text_for(plan: Plan, chunk: int) -> dict[str, str]:
    """The note each request of ``chunk`` got (for the tests: what its page must show)."""
    rng = random.Random(f"{plan.seed}:{chunk}:notes")
    return {
        p.id: NOTE_TEXTS[rng.randrange(len(NOTE_TEXTS))]
        for p in plan_chunk(plan, chunk)
        if p.note_id
    }


# --- the audit trail ----------------------------------------------------------------------------


class Chain:
    """Appends events in time order: seq, canonical form and hash as record_event makes them."""

    def __init__(
        self, plan: Plan, head: tuple[int, str], anchor: Any, ip_pool: list[str | None]
    ) -> None:
        self.plan, self.seq, self.prev = plan, head[0], head[1]
        self.anchor, self.ip_pool = anchor, ip_pool
        self.pending: list[tuple[int, int, tuple[Any, ...]]] = []  # heap of (us, n, event)
        self.counter = 0
        self.lines: list[str] = []
        self.entries: list[tuple[int, str]] = []
        self.written = 0
        self.conn = _open(plan.database_url)

    def add(self, us: int, *event: Any) -> None:
        self.counter += 1
        heapq.heappush(self.pending, (us, self.counter, event))

    def flush_before(self, us: int) -> None:
        """Write every pending event older than ``us``: no later request can precede it."""
        pending = self.pending
        while pending and pending[0][0] < us:
            at, _n, event = heapq.heappop(pending)
            self._append(at, *event)

    def _append(
        self,
        us: int,
        actor: str,
        role: str | None,
        action: str,
        reference: str | None,
        details: dict[str, Any],
        ip: str | None,
    ) -> None:
        self.seq += 1
        # format_time's text, built from the integer microseconds (no datetime per event).
        second, micro = divmod(us, 1_000_000)
        text_time = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(second))}.{micro:06d}Z"
        body = json.dumps(details, sort_keys=True, separators=(",", ":"))
        canonical = _canonical(
            self.seq, text_time, actor, role, action, reference, "success", body, ip
        )
        digest = hashlib.sha256(f"{self.prev}\n{canonical}".encode()).hexdigest()
        copy_time = f"{text_time[:10]} {text_time[11:26]}+00"
        # COPY text: only the JSON may hold a backslash (its escapes); the rest are plain words.
        copy_body = body.replace("\\", "\\\\") if "\\" in body else body
        self.lines.append(
            f"{self.seq}\t{copy_time}\t{actor}\t{role or NULL}\t{action}\t{reference or NULL}"
            f"\tsuccess\t{copy_body}\t{ip or NULL}\t{self.prev}\t{digest}\n"
        )
        self.entries.append((self.seq, digest))
        self.prev = digest
        if len(self.lines) >= EVENT_BATCH:
            self.write()

    def write(self) -> None:
        if not self.lines:
            return
        with self.conn.cursor() as cursor:
            _copy(cursor, "audit_events", EVENT_COLUMNS, self.lines)
        # The anchor gets (seq, hash) prepared before the commit and committed after it,
        # as record_event and the session's commit hook write them.
        self.anchor.prepare(self.entries)
        self.conn.commit()
        self.anchor.commit(self.entries)
        self.written += len(self.lines)
        self.lines, self.entries = [], []


def add_request_events(chain: Chain, p: Planned, rng: random.Random, names: dict[str, str]) -> None:
    t = p.created_us + rng.randint(1_000, 40_000)
    consents = [f"{d}-{v}.{lang}" for d, v, lang, _sha in chain.plan.consents[p.kind, p.language]]
    chain.add(
        t,
        "patient",
        None,
        "request.submitted",
        p.reference,
        {
            "kind": p.kind,
            "topic": p.topic,
            "location": p.location,
            "language": p.language,
            "interpreter_language": p.interpreter_language,
            "consents": consents,
        },
        rng.choice(chain.ip_pool),
    )
    routed = p.created_us + 50_000 + (p.index % 900) * 1000
    chain.add(
        routed + 2_000,
        "system:route_request",
        None,
        "request.routed",
        p.reference,
        {
            "team": p.team,
            "priority": p.priority,
            "rule": p.rule,
            "sla_due_at": p.sla_due_at.isoformat(),
        },
        None,
    )
    chain.add(
        routed + 1_100_000,
        "system:notify_team",
        None,
        "notification.sent",
        p.reference,
        {"team": p.team, "channels": ["email"], "reason": "new"},
        None,
    )
    for at, user, action, details in p.work:
        role = "supervisor" if user == chain.plan.supervisor_id else "staff"
        if action == "phi.viewed":
            details = {**details, "team": p.team, "team_name": names.get(p.team)}
        chain.add(at, f"user:{user}", role, action, p.reference, details, rng.choice(chain.ip_pool))


def add_filler(
    chain: Chain, us: int, rng: random.Random, recent: list[str], staff: list[int]
) -> None:
    """Events about no one request: queue views (listing the references shown), logins, look-ups."""
    user = rng.choice(staff)
    ip = rng.choice(chain.ip_pool)
    roll = rng.random()
    if roll < 0.6 and recent:
        shown = recent[-50:]
        chain.add(
            us,
            f"user:{user}",
            "staff",
            "phi.viewed",
            None,
            {"view": "queue", "rows": len(shown), "after": False, "references": shown},
            ip,
        )
    elif roll < 0.75:
        chain.add(us, f"user:{user}", "staff", "user.login", None, {"username": f"user{user}"}, ip)
    elif roll < 0.9 and recent:
        chain.add(us, "patient", None, "status.looked_up", rng.choice(recent), {"found": True}, ip)
    else:
        chain.add(
            us,
            f"user:{user}",
            "staff",
            "request.searched",
            None,
            {"by": "phone", "results": 1, "references": recent[-1:]},
            ip,
        )


# --- loading ------------------------------------------------------------------------------------


def _schema(conn: Any) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """The bulk tables' constraints (but primary keys) and the indexes that back none."""
    tables = list(BULK_TABLES)
    constraints = conn.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE contype IN ('f', 'u') AND conrelid::regclass::text = ANY(%s) ORDER BY 1, 2",
        (tables,),
    ).fetchall()
    indexes = conn.execute(
        "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = 'public' "
        "AND i.tablename = ANY(%s) AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
        "WHERE c.conindid = (quote_ident(i.indexname))::regclass) "
        # A partial index stays: its predicate, deparsed and parsed again, reads differently.
        "AND i.indexdef NOT LIKE '%% WHERE %%' ORDER BY 1",
        (tables,),
    ).fetchall()
    return [tuple(r) for r in constraints], [tuple(r) for r in indexes]


@contextlib.contextmanager
def without_indexes(url: str) -> Iterator[dict[str, Any]]:
    """Drop the bulk tables' indexes and constraints for the load; rebuild them from their
    definitions; check the schema came back the same."""
    import psycopg

    dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    timing: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        constraints, indexes = _schema(conn)
        for table, name, _definition in constraints:
            conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for name, _definition in indexes:
            conn.execute(f'DROP INDEX "{name}"')
    yield timing
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        for _name, definition in indexes:
            conn.execute(definition)
        # Unique constraints before the foreign keys that may lean on them.
        for table, name, definition in sorted(
            constraints, key=lambda c: c[2].startswith("FOREIGN")
        ):
            conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        timing["rebuild_s"] = round(time.perf_counter() - started, 1)
        now_constraints, now_indexes = _schema(conn)
        if (set(now_constraints), set(now_indexes)) != (set(constraints), set(indexes)):
            differ = set(now_constraints) ^ set(constraints) | set(now_indexes) ^ set(indexes)
            raise RuntimeError(f"the rebuilt indexes or constraints differ: {sorted(differ)}")
        started = time.perf_counter()
        conn.execute("VACUUM (ANALYZE)")
        timing["vacuum_s"] = round(time.perf_counter() - started, 1)


def generate(
    plan: Plan, anchor: Any, head: tuple[int, str], names: dict[str, str], jobs: int
) -> dict[str, Any]:
    """Load the plan's requests (in a pool) and its events (here, in time order) at once."""
    keyring = phi.Keyring.from_json(plan.keyring_json)
    ip_pool = [phi.ip_pseudonym(keyring, f"10.{n // 250}.{n % 250}.7") for n in range(2000)]
    staff = sorted({u for users in plan.staff_by_team.values() for u in users})
    rng = random.Random(f"{plan.seed}:events")
    recent: list[str] = []
    started = time.perf_counter()
    timing: dict[str, Any] = {}
    # Forked before this process opens its connection: the workers open their own.
    context = multiprocessing.get_context("fork")
    pool = context.Pool(jobs, initializer=_forget_connection) if jobs > 0 else None
    chain = Chain(plan, head, anchor, ip_pool)
    try:
        finished: list[float] = []  # when the pool's last chunk was committed
        if pool is not None:
            pooled = pool.map_async(
                _load_chunk,
                [(plan, k) for k in range(plan.chunks)],
                chunksize=1,
                callback=lambda _counts: finished.append(time.perf_counter()),
            )
        else:
            loads = (load_request_chunk(plan, k) for k in range(plan.chunks))
        for k in range(plan.chunks):
            for p in plan_chunk(plan, k):
                chain.flush_before(p.created_us)
                add_request_events(chain, p, rng, names)
                recent.append(p.reference)
                if len(recent) > 200:
                    del recent[:100]
                # Filler keeps the count on course: about events * (i + 1) / requests so far.
                due = plan.events * (p.index + 1) // plan.requests
                while chain.counter < due:
                    add_filler(
                        chain, p.created_us + rng.randint(0, 600_000_000), rng, recent, staff
                    )
            if pool is None:
                next(loads)
        chain.flush_before(1 << 62)
        chain.write()
        timing["events_s"] = round(time.perf_counter() - started, 1)
        if pool is not None:
            pooled.get()  # raises what a worker raised
            pooled.wait()
        done = finished[0] if finished else time.perf_counter()
        timing["requests_s"] = round(done - started, 1)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        chain.conn.close()
        if _CONNECTION is not None:
            _CONNECTION.close()
        _forget_connection()
    timing["events"] = chain.written
    timing["head"] = (chain.seq, chain.prev)
    return timing


def _forget_connection() -> None:
    """In a forked worker: open a connection of its own, never the parent's socket."""
    global _CONNECTION
    _CONNECTION = None


def _load_chunk(args: tuple[Plan, int]) -> int:
    return load_request_chunk(*args)


# --- the app ------------------------------------------------------------------------------------


def app_for(env: dict[str, str]) -> Any:
    from config import Settings
    from intake import create_app

    return create_app(Settings.from_env(env))


def set_up_people(env: dict[str, str]) -> dict[str, Any]:
    """Teams from the routing file and the demo's users, with the real account services."""
    from intake.accounts import services as accounts
    from intake.extensions import db
    from intake.models import Team

    app = app_for(env)
    people: dict[str, Any] = {"users": {}}
    with app.app_context():
        session = db.session
        table = app.extensions["intake.routing"]
        for team in table.teams.values():
            if session.get(Team, team.id) is None:
                accounts.create_team(session, team.id, team.name, team.spanish, "system:bench")
        session.commit()
        for username, role, teams in DEMO_USERS:
            password = "-".join(
                "".join(secrets.choice(ALPHABET) for _ in range(4)) for _ in range(4)
            )
            created = accounts.create_user(
                session,
                app.extensions["intake.keyring"],
                username=username,
                password=password,
                role=role,
                teams=teams,
                actor="system:bench",
                languages=["en", "es"] if username in ("clinician", "supervisor") else ["en"],
            )
            session.commit()
            people["users"][username] = {
                "id": created.user.id,
                "password": password,
                "totp": created.totp_secret,
                "role": role,
                "teams": teams,
            }
        people["team_names"] = {t.id: t.name for t in table.teams.values()}
        people["consents"] = {
            (kind, language): [
                (c.document, c.version, c.language, c.sha256)
                for c in accepted_consents(kind, language)
            ]
            for kind in KINDS
            for language in ("en", "es")
        }
        db.engine.dispose()
    return people


def chain_head(url: str) -> tuple[int, str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            ).first()
    finally:
        engine.dispose()
    return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)


class Browser:
    """One staff member's browser over one keep-alive connection, as the TLS proxy forwards it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.cookies: dict[str, str] = {}
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(
        self, method: str, path: str, body: str | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, str]:
        sent = {"Host": self.host, "X-Forwarded-Proto": "https", "X-Forwarded-For": "127.0.0.1"}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        sent |= headers or {}
        try:
            self.connection.request(method, path, body=body, headers=sent)
            answer = self.connection.getresponse()
        except (http.client.HTTPException, OSError):
            self.connection.close()  # gunicorn closed the idle connection: once more
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self.connection.request(method, path, body=body, headers=sent)
            answer = self.connection.getresponse()
        text = answer.read().decode("utf-8", "replace")
        for raw in answer.headers.get_all("Set-Cookie") or []:
            name, _, rest = raw.partition("=")
            self.cookies[name.strip()] = rest.split(";", 1)[0]
        return answer.status, text

    def log_in(self, username: str, password: str, totp: str) -> None:
        import pyotp

        status, page = self.request("GET", "/staff/login")
        match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page) or re.search(
            r'value="([^"]+)"[^>]*name="csrf_token"', page
        )
        if status != 200 or match is None:
            raise RuntimeError(f"no login form ({status})")
        fields = {
            "csrf_token": html.unescape(match.group(1)),
            "username": username,
            "password": password,
            "otp": pyotp.TOTP(totp).now(),
            "next": "",
        }
        origin = f"https://{self.host}"
        status, page = self.request(
            "POST",
            "/staff/login",
            urllib.parse.urlencode(fields),
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": origin,
                "Referer": origin + "/staff/login",
            },
        )
        if status != 303:
            raise RuntimeError(f"login as {username} failed ({status}): {page[:400]}")


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def time_page(browser: Browser, paths: list[str], samples: int, budget_s: float) -> dict[str, Any]:
    """Warm up, then GET ``samples`` times one after another (cycling through ``paths``);
    stop early, after at least 20, when ``budget_s`` seconds are spent (a very slow page)."""
    began = time.perf_counter()
    for n in range(min(WARMUP, samples)):
        browser.request("GET", paths[n % len(paths)])
        if time.perf_counter() - began > budget_s / 4:
            break  # a page this slow is warm after a few
    times: list[float] = []
    statuses: dict[int, int] = {}
    began = time.perf_counter()
    for n in range(samples):
        started = time.perf_counter()
        status, _page = browser.request("GET", paths[n % len(paths)])
        times.append((time.perf_counter() - started) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        if n >= 19 and time.perf_counter() - began > budget_s:
            break
    return {
        "samples": len(times),
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(percentile(times, 95), 1),
        "p99_ms": round(percentile(times, 99), 1),
        "max_ms": round(max(times), 1),
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def sample_references(url: str, teams: list[str], count: int, seed: str) -> dict[str, list[str]]:
    """Random open references of ``teams`` and random ones closed over a year ago."""
    engine = sa.create_engine(url)
    rng = random.Random(seed)
    try:
        with engine.connect() as conn:
            open_refs = (
                conn.execute(
                    sa.text(
                        "SELECT reference FROM requests WHERE status = ANY(:s) AND team = ANY(:t)"
                    ),
                    {"s": list(OPEN_STATUSES), "t": teams},
                )
                .scalars()
                .all()
            )
            old = (
                conn.execute(
                    sa.text(
                        "SELECT reference FROM requests WHERE team = ANY(:t) AND status IN "
                        "('completed', 'cancelled') AND created_at < now() - interval '1 year'"
                        " ORDER BY reference LIMIT 20000"
                    ),
                    {"t": teams},
                )
                .scalars()
                .all()
                or conn.execute(
                    sa.text(
                        "SELECT reference FROM requests WHERE team = ANY(:t) AND status = "
                        "'completed' ORDER BY created_at LIMIT 2000"
                    ),
                    {"t": teams},
                )
                .scalars()
                .all()
            )
            window = conn.execute(
                sa.text(
                    "SELECT min(created_at) + (max(created_at) - min(created_at)) / 2 FROM requests"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    return {
        "open": rng.sample(list(open_refs), min(count, len(open_refs))),
        "old": rng.sample(list(old), min(count, len(old))),
        "window": [window.strftime("%Y-%m-%d")],
    }


PAGES = (
    ("queue", "staff"),
    ("queue, filtered", "staff"),
    ("request, open", "staff"),
    ("request, old", "staff"),
    ("audit", "compliance"),
    ("audit by action", "compliance"),
    ("audit by reference", "compliance"),
    ("audit since/until", "compliance"),
)


def page_paths(refs: dict[str, list[str]]) -> dict[str, list[str]]:
    day = refs["window"][0]
    until = (datetime.fromisoformat(day) + timedelta(days=1)).strftime("%Y-%m-%d")
    return {
        "queue": ["/staff/queue"],
        "queue, filtered": ["/staff/queue?status=queued&team=refills-main&kind=refill"],
        "request, open": [f"/staff/requests/{r}" for r in refs["open"]],
        "request, old": [f"/staff/requests/{r}" for r in refs["old"]],
        "audit": ["/compliance/audit"],
        "audit by action": ["/compliance/audit?action=request.status_changed"],
        "audit by reference": [
            f"/compliance/audit?reference={r}" for r in refs["open"][:50] + refs["old"][:50]
        ],
        "audit since/until": [f"/compliance/audit?since={day}&until={until}"],
    }


# --- statement profile ----------------------------------------------------------------------


def explain_pages(
    env: dict[str, str], people: dict[str, Any], paths: dict[str, list[str]], slow_ms: float
) -> list[dict[str, Any]]:
    """Run each page's domain calls in-process, time every statement, EXPLAIN the slow ones."""
    from intake.compliance import forms as compliance_forms
    from intake.compliance import reports
    from intake.extensions import db
    from intake.requests import casework

    app = app_for(env)
    found: list[dict[str, Any]] = []
    statements: list[tuple[str, Any, float]] = []

    def before(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        conn.info["started"] = time.perf_counter()

    def after(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        statements.append(
            (statement, parameters, (time.perf_counter() - conn.info["started"]) * 1000)
        )

    pharmacist = people["users"]["pharmacist"]
    actor = casework.Actor(pharmacist["id"], "pharmacist", "staff", tuple(pharmacist["teams"]))
    with app.app_context():
        engine = db.engine
        sa.event.listen(engine, "before_cursor_execute", before)
        sa.event.listen(engine, "after_cursor_execute", after)
        keyring = app.extensions["intake.keyring"]
        names = {t.id: t.name for t in app.extensions["intake.routing"].teams.values()}
        now = datetime.now(UTC)

        def queue(**filters: Any) -> None:
            full = {
                "status": None,
                "team": None,
                "kind": None,
                "language_need": None,
                "assignee": None,
            } | filters
            # As the queue view runs them: the page's rows and counts (its version stamp is
            # derived from them), then the audited view.
            view = casework.queue_view(db.session, keyring, actor, now, sort="priority", **full)
            actor.record(
                db.session,
                "phi.viewed",
                None,
                view="queue",
                rows=len(view.rows),
                after=False,
                references=[r.reference for r in view.rows],
            )
            db.session.commit()

        def audit(args: str) -> None:
            with app.test_request_context(args):
                from flask import request as flask_request

                form = compliance_forms.AuditFilterForm(flask_request.args, meta={"csrf": False})
                form.validate()
                reports.audit_page(db.session, form.to_filter())
                db.session.rollback()

        def opened(path: str) -> None:
            casework.open_request(
                db.session, keyring, path.rsplit("/", 1)[1], actor, now, team_names=names
            )

        jobs = {
            "queue": lambda: queue(),
            "queue, filtered": lambda: queue(status="queued", team="refills-main", kind="refill"),
            "request, open": lambda: opened(paths["request, open"][0]),
            "request, old": lambda: opened(paths["request, old"][0]),
        }
        for name in ("audit", "audit by action", "audit by reference", "audit since/until"):
            query_string = paths[name][0].partition("?")[2]
            jobs[name] = functools.partial(audit, "/compliance/audit?" + query_string)
        for name, job in jobs.items():
            job()  # warm
            statements.clear()
            job()
            mine = list(statements)
            statements.clear()
            for statement, parameters, ms in mine:
                entry = {"page": name, "ms": round(ms, 1), "sql": statement}
                if ms >= slow_ms and statement.lstrip().upper().startswith("SELECT"):
                    raw = engine.raw_connection()
                    try:
                        cursor = raw.cursor()
                        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
                        entry["plan"] = "\n".join(r[0] for r in cursor.fetchall())
                        entry["parameters"] = {
                            k: str(v)[:80] for k, v in dict(parameters or {}).items()
                        }
                    finally:
                        raw.rollback()
                        raw.close()
                found.append(entry)
        db.engine.dispose()
    return found


# --- one database, measured ------------------------------------------------------------------


def run_size(
    label: str, requests: int, events: int, args: argparse.Namespace, folder: Path, redis_url: str
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"label": label, "requests": requests, "events_asked": events}
    port = free_port()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database(args.postgres))
        env = intake_env("postgresql", folder, redis_url, url, port)
        env["INTAKE_LOGIN_RATE_LIMIT"] = "1000/minute"
        env["INTAKE_AUDIT_ANCHOR"] = str(folder / "data" / "audit-anchor.log")
        migrate = intake_command(env, folder, "db", "upgrade")
        if migrate.returncode != 0:
            raise RuntimeError(f"intake db upgrade failed:\n{migrate.stderr[-3000:]}")
        people = set_up_people(env)
        users = people["users"]
        staff_by_team: dict[str, list[int]] = {}
        for user in users.values():
            for team in user["teams"]:
                staff_by_team.setdefault(team, []).append(user["id"])
        teams = len(routing_table().teams)
        open_target = min(args.open_per_team * teams, max(1, requests // 20))
        plan = Plan(
            requests=requests,
            events=events,
            seed=f"{args.seed}:{label}",
            end_us=int((datetime.now(UTC) - timedelta(minutes=5) - EPOCH).total_seconds() * 1e6),
            open_from=max(0, requests - int(open_target / OPEN_WINDOW_SHARE)),
            staff_by_team=staff_by_team,
            consents=people["consents"],
            supervisor_id=users["supervisor"]["id"],
            keyring_json=env["INTAKE_KEYRING"],
            database_url=url,
        )
        from intake.audit.anchor import FileAnchor

        print(
            f"{label}: generating {requests:,} requests, {events:,} events ...",
            file=sys.stderr,
            flush=True,
        )
        started = time.perf_counter()
        with without_indexes(url) as rebuild:
            timing = generate(
                plan,
                FileAnchor(Path(env["INTAKE_AUDIT_ANCHOR"])),
                chain_head(url),
                people["team_names"],
                args.jobs,
            )
            # The loader writes events, not their index of listed references: derive it as
            # migration 0014 does for an existing trail.
            listed = time.perf_counter()
            listings_engine = sa.create_engine(url)
            with listings_engine.begin() as conn:
                backfill_listings(conn)
            listings_engine.dispose()
            timing["listings_s"] = round(time.perf_counter() - listed, 1)
        total_s = time.perf_counter() - started
        result["generation"] = {
            **{k: v for k, v in timing.items() if k != "head"},
            **rebuild,
            "total_s": round(total_s, 1),
            "requests_per_s": round(requests / max(timing["requests_s"], 0.1)),
            "events_per_s": round(timing["events"] / max(timing["events_s"], 0.1)),
            "rows_per_s": round((requests + timing["events"]) / total_s),
            "jobs": args.jobs,
        }
        print(json.dumps(result["generation"]), file=sys.stderr, flush=True)
        engine = sa.create_engine(url)
        stack.callback(engine.dispose)
        with engine.connect() as conn:
            events_before = int(conn.scalar(sa.text("SELECT count(*) FROM audit_events")) or 0)
            result["stored"] = {
                t: int(conn.scalar(sa.text(f"SELECT count(*) FROM {t}")) or 0)
                for t in ("requests", "audit_events", "consent_acceptances", "outbox", "notes")
            }
            result["stored"]["open"] = int(
                conn.scalar(
                    sa.text("SELECT count(*) FROM requests WHERE status = ANY(:s)"),
                    {"s": list(OPEN_STATUSES)},
                )
                or 0
            )
            result["open_by_team"] = dict(
                conn.execute(
                    sa.text(
                        "SELECT team, count(*) FROM requests WHERE status = ANY(:s) "
                        "GROUP BY team ORDER BY team"
                    ),
                    {"s": list(OPEN_STATUSES)},
                ).all()
            )
            result["database_mb"] = round(
                int(conn.scalar(sa.text("SELECT pg_database_size(current_database())"))) / 2**20
            )
        result["plan"] = plan
        result["people"] = people

        # The production web app, as compose runs it.
        argv = gunicorn_argv("intake:create_app()", port, args.web_workers, folder / "access.log")
        web = Process("web", argv, env, folder)
        stack.callback(web.stop)
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{port}/readyz") or not web.alive(), 90, "gunicorn"
        )
        if not web.alive():
            raise RuntimeError(f"gunicorn exited:\n{web.tail()}")
        staff, officer = Browser(port), Browser(port)
        staff.log_in("pharmacist", users["pharmacist"]["password"], users["pharmacist"]["totp"])
        officer.log_in("compliance", users["compliance"]["password"], users["compliance"]["totp"])
        refs = sample_references(url, users["pharmacist"]["teams"], args.samples, plan.seed)
        paths = page_paths(refs)
        result["pages"] = {}
        for name, who in PAGES:
            if not paths[name]:
                continue
            browser = staff if who == "staff" else officer
            result["pages"][name] = time_page(browser, paths[name], args.samples, args.page_seconds)
            print(f"  {name}: {result['pages'][name]}", file=sys.stderr, flush=True)
        result["load_during"] = os.getloadavg()[0]
        result["paths"] = {k: v[:3] for k, v in paths.items()}
        result["web_rss_mib"] = web.peak_rss_mib()
        if args.explain:
            result["statements"] = explain_pages(env, people, paths, args.slow_ms)
        if args.check:
            result["check"] = check_generated(
                plan, url, staff, users["pharmacist"]["teams"], args.samples
            )
            result["check"]["events_generated"] = timing["events"]
            result["check"]["events_before_web"] = events_before
            result["check"]["head_before_web"] = timing["head"][0]
            result["verify"] = verify_trail(env, folder)
        result["env"] = env
    return result


def check_generated(
    plan: Plan, url: str, browser: Browser, teams: list[str], count: int
) -> dict[str, Any]:
    """Sampled requests: stored as planned, their PHI opens to the generated document, their
    blind indexes match it, and the staff page of those in the pharmacist's teams shows it."""
    keyring = phi.Keyring.from_json(plan.keyring_json)
    rng = random.Random(f"{plan.seed}:check")
    checked = opened = pages = notes_shown = 0
    problems: list[str] = []
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            for chunk in sorted({rng.randrange(plan.chunks) for _ in range(4)} | {plan.chunks - 1}):
                planned = plan_chunk(plan, chunk)
                documents = chunk_documents(plan, chunk, planned)
                note_texts = _note_text_for(plan, chunk)
                for n in rng.sample(range(len(planned)), min(count, len(planned))):
                    p, document = planned[n], documents[n]
                    row = conn.execute(
                        sa.text(
                            "SELECT id, kek_id, wrapped_key_encrypted AS wrapped, "
                            "phi_encrypted AS sealed, status, team, phone_index, name_dob_index "
                            "FROM requests WHERE reference = :r"
                        ),
                        {"r": p.reference},
                    ).first()
                    checked += 1
                    if row is None or (row.id, row.status, row.team) != (p.id, p.status, p.team):
                        problems.append(f"{p.reference}: stored as {row}")
                        continue
                    sealed = phi.SealedPHI(phi.WrappedKey(row.kek_id, row.wrapped), row.sealed)
                    if phi.open_phi(keyring, row.id, sealed) != document:
                        problems.append(f"{p.reference}: PHI opens to another document")
                        continue
                    if row.phone_index != phi.phone_index(keyring, document["phone"]) or (
                        row.name_dob_index
                        != phi.name_dob_index(
                            keyring, document["last_name"], document["date_of_birth"]
                        )
                    ):
                        problems.append(f"{p.reference}: blind indexes differ")
                        continue
                    opened += 1
                    if p.team not in teams:
                        continue
                    status, page = browser.request("GET", f"/staff/requests/{p.reference}")
                    wanted = [
                        html.escape(document["first_name"]),
                        html.escape(document["last_name"]),
                        document["phone"][-4:],
                    ]
                    if status != 200 or not all(w in page for w in wanted):
                        problems.append(f"{p.reference}: page {status} lacks {wanted}")
                        continue
                    pages += 1
                    if p.id in note_texts:
                        if html.escape(note_texts[p.id]) not in page:
                            problems.append(f"{p.reference}: note not shown")
                            continue
                        notes_shown += 1
        with engine.connect() as conn:
            # The share of each bulk table's pages marked all-visible (what index-only scans
            # skip the heap for): set by the VACUUM after the load, not by the load itself.
            all_visible = {
                row.relname: round(row.relallvisible / row.relpages, 3) if row.relpages else None
                for row in conn.execute(
                    sa.text(
                        "SELECT relname, relpages, relallvisible FROM pg_class "
                        "WHERE relname IN ('requests', 'audit_events', 'audit_listings')"
                    )
                )
            }
    finally:
        engine.dispose()
    return {
        "checked": checked,
        "opened": opened,
        "pages": pages,
        "notes": notes_shown,
        "problems": problems[:20],
        "all_visible": all_visible,
    }


def intake_command(env: dict[str, str], folder: Path, *argv: str) -> Any:
    """Run ``intake ARGV...`` with ``env``, its output captured."""
    return subprocess.run(  # noqa: S603 - our own command
        [str(BIN / "intake"), *argv],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


def verify_trail(env: dict[str, str], folder: Path) -> dict[str, Any]:
    """Sign a checkpoint (the signer's key), then ``intake audit verify --json``."""
    signer = {k: v for k, v in env.items() if k != "BENCH_SIGNING_KEY"}
    signer["INTAKE_AUDIT_SIGNING_KEY"] = env["BENCH_SIGNING_KEY"]
    checkpoint = intake_command(signer, folder, "audit", "checkpoint")
    started = time.perf_counter()
    verify = intake_command(env, folder, "audit", "verify", "--json")
    lines = [x for x in verify.stdout.splitlines() if x.startswith("{")]
    return {
        "checkpoint_rc": checkpoint.returncode,
        "checkpoint_output": (checkpoint.stdout + checkpoint.stderr)[-1500:],
        "rc": verify.returncode,
        "report": json.loads(lines[-1]) if lines else None,
        "stderr": verify.stderr[-1500:],
        "seconds": round(time.perf_counter() - started, 1),
    }


# --- report --------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    small, big = report["results"][0], report["results"][-1]
    settings = report["settings"]
    lines = [
        f"Page benchmark, {report['date']}: {report['machine']['cpus']} CPUs "
        f"({report['machine']['cpu']}, shared with other work: load average "
        f"{report['machine']['load_before']:.1f} before, {big.get('load_during', 0):.1f} during), "
        f"PostgreSQL on localhost, gunicorn --workers {settings['web_workers']}, "
        f"{settings['samples']} sequential GETs per page after a warm-up.",
        "",
        "| page | "
        + " | ".join(
            f"{r['label']} ({r['stored']['requests']:,} requests, "
            f"{r['stored']['audit_events']:,} events) p50 / p95 / p99 ms"
            for r in report["results"]
        )
        + " | p95 ratio |",
        "|---|" + "---|" * len(report["results"]) + "---|",
    ]
    for name, _who in PAGES:
        cells = []
        for r in report["results"]:
            page = r["pages"].get(name)
            cells.append(f"{page['p50_ms']} / {page['p95_ms']} / {page['p99_ms']}" if page else "–")
        a, b = small["pages"].get(name), big["pages"].get(name)
        ratio = f"{b['p95_ms'] / a['p95_ms']:.2f}" if a and b and a["p95_ms"] else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    lines += [
        "",
        "| generation | " + " | ".join(r["label"] for r in report["results"]) + " |",
        "|---|" + "---|" * len(report["results"]),
    ]
    for key in (
        "requests_per_s",
        "events_per_s",
        "rows_per_s",
        "rebuild_s",
        "vacuum_s",
        "total_s",
    ):
        lines.append(
            f"| {key} | "
            + " | ".join(str(r["generation"].get(key)) for r in report["results"])
            + " |"
        )
    lines.append(
        "| database MiB | " + " | ".join(str(r["database_mb"]) for r in report["results"]) + " |"
    )
    lines.append(
        "| open requests | "
        + " | ".join(f"{r['stored']['open']:,}" for r in report["results"])
        + " |"
    )
    slow = [s for r in report["results"][-1:] for s in r.get("statements", []) if s.get("plan")]
    if slow:
        lines += ["", "Slow statements at the larger size (EXPLAIN ANALYZE, BUFFERS):", ""]
        for s in slow:
            lines += [
                f"- **{s['page']}**, {s['ms']} ms:",
                "",
                "```sql",
                s["sql"],
                "```",
                "",
                "```",
                s["plan"],
                "```",
                "",
            ]
    return "\n".join(lines) + "\n"


def public(result: dict[str, Any]) -> dict[str, Any]:
    """A run's result without its secrets (keys, passwords) for the JSON file."""
    return {k: v for k, v in result.items() if k not in ("plan", "people", "env")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--small-requests", type=int, default=1_000, help="the baseline's size")
    parser.add_argument("--small-events", type=int, default=10_000)
    parser.add_argument("--no-baseline", action="store_true", help="measure the big database only")
    parser.add_argument(
        "--open-per-team",
        type=int,
        default=3_000,
        help="open backlog per team (at most 5%% of the requests)",
    )
    parser.add_argument("--samples", type=int, default=200, help="timed GETs per page")
    parser.add_argument(
        "--page-seconds",
        type=float,
        default=90.0,
        help="stop timing a page after this long (at least 20 samples)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes sealing requests (0: none)")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--seed", default="intake-pages")
    parser.add_argument(
        "--postgres", default=DEFAULT_POSTGRES, help="server URL (a database is created)"
    )
    parser.add_argument(
        "--explain", action="store_true", help="EXPLAIN the slow statements of each page"
    )
    parser.add_argument("--slow-ms", type=float, default=5.0)
    parser.add_argument(
        "--check",
        action="store_true",
        help="check sampled requests decrypt and open, then intake audit verify",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.samples < 1:
        parser.error("--requests and --samples must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # drop the databases on kill too
    sizes = [] if args.no_baseline else [("small", args.small_requests, args.small_events)]
    sizes.append(("large", args.requests, args.events))
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "postgres")},
        "results": [],
    }
    with (
        tempfile.TemporaryDirectory(prefix="intake-pages-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        folder = Path(tmp)
        redis_url = start_redis(folder, stack)
        for label, requests, events in sizes:
            try:
                result = run_size(label, requests, events, args, folder / label, redis_url)
            except Exception:
                for log in sorted((folder / label).glob("*.log")):
                    print(
                        f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}",
                        file=sys.stderr,
                    )
                raise
            report["results"].append(result)
        table = markdown(report)
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        (args.out / f"pages-{stamp}.md").write_text(table)
        public_report = {**report, "results": [public(r) for r in report["results"]]}
        (args.out / f"pages-{stamp}.json").write_text(
            json.dumps(public_report, indent=2, default=str) + "\n"
        )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
