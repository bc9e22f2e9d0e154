"""The audit anchor: every event's (seq, hash) leaves the database the moment it is written.

Why: the hash chain and the signed checkpoints protect everything up to the last checkpoint,
but someone who can write to the database (a DB owner, a stolen superuser password) could still
delete, change, reorder or forge the events written since then, or rebuild the whole chain, and
the next checkpoint would sign the result. So ``record_event`` (intake.audit.chain), while it
holds the chain writers' lock, appends a durable "prepared" entry (seq, hash) to an append-only
sink outside the database before its transaction may commit, and after the commit a "committed"
entry. The database attacker cannot reach the sink, so :func:`compare` finds any event the
anchor does not vouch for and any committed event that vanished from the database. Signing a
checkpoint and ``intake audit verify`` both compare.

A transaction that rolls back leaves prepared-only entries: harmless, its seq is used again by
the next writer. A crash between the commit and the committed entry leaves a prepared-only
entry for a real event: the prepared entry still vouches for it, which is why a hash in a
prepared entry counts (only a committed entry, though, proves an event must still be there).

The sink is an interface (:class:`AnchorSink`). The file sink is the one built in
(``INTAKE_AUDIT_ANCHOR``, default ``<data dir>/audit-anchor.log``, opened O_APPEND, mode 0600, on
a volume the database server does not mount). Another sink (remote syslog, an object store with
object lock, a second host) implements the same four methods; one that cannot be read back
(syslog) keeps a reader on the receiving side that yields the same entries.

File format, one entry per line, about 72 bytes: ``p <seq> <hash>`` (prepared), ``c <seq>
<hash>`` (committed), and once at the start ``b <seq> <hash>`` (the chain's head when anchoring
began, for a trail older than the anchor: events up to it rely on the checkpoints alone).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import structlog
from sqlalchemy import event as sa_event
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config import Settings
from intake.extensions import DbSession
from intake.models import AuditEvent
from intake.ops import metrics

log = structlog.get_logger(__name__)

ANCHOR_FILE = "audit-anchor.log"
PREPARED, COMMITTED, BASELINE = "p", "c", "b"
# session.info key: the (seq, hash) entries prepared in the session's current transaction.
PENDING_KEY = "intake.audit.anchor.pending"
SINK_KEY = "intake.audit.anchor.sink"
READ_CHUNK = 1 << 20
ZERO = bytes(32)

Entry = tuple[int, str]


class AnchorError(RuntimeError):
    """The anchor cannot be written or read."""


class AnchorEntry(NamedTuple):
    kind: str  # PREPARED, COMMITTED or BASELINE ("?" for an unreadable line)
    seq: int
    hash: str


class AnchorSink(Protocol):
    """An append-only place outside the database that remembers every event's (seq, hash).

    ``prepare`` must be durable when it returns (it runs before the transaction may commit);
    ``commit`` is best effort (after the commit, nothing can be undone). ``scan`` yields every
    entry from ``offset`` in the order written; ``end`` is the offset after the last entry, so a
    reader that remembers it (the signer, at each checkpoint) reads only what is new.
    """

    def describe(self) -> str:
        """Where the anchor is, for messages (a path, a URL)."""
        ...

    def exists(self) -> bool:
        """Whether anything was ever written to it."""
        ...

    def prepare(self, entries: Sequence[Entry], baseline: Entry | None = None) -> None: ...

    def commit(self, entries: Sequence[Entry]) -> None: ...

    def scan(self, offset: int = 0) -> Iterator[tuple[int, AnchorEntry]]:
        """Each entry from ``offset`` on, with the offset just after it."""
        ...

    def end(self) -> int: ...


class FileAnchor:
    """The anchor as a file opened O_APPEND (mode 0600): each write is one whole batch of lines."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_file()

    def _append(self, text: str, durable: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # One write: O_APPEND puts it whole at the end, never interleaved with another's.
            os.write(fd, text.encode())
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def prepare(self, entries: Sequence[Entry], baseline: Entry | None = None) -> None:
        lines = [f"{BASELINE} {baseline[0]} {baseline[1]}\n"] if baseline else []
        lines += [f"{PREPARED} {seq} {digest}\n" for seq, digest in entries]
        self._append("".join(lines), durable=True)

    def commit(self, entries: Sequence[Entry]) -> None:
        self._append("".join(f"{COMMITTED} {seq} {digest}\n" for seq, digest in entries), False)

    def end(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def scan(self, offset: int = 0) -> Iterator[tuple[int, AnchorEntry]]:
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            handle.seek(offset)
            position, rest = offset, b""
            while chunk := handle.read(READ_CHUNK):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    position += len(line) + 1
                    yield position, _parse(line)
            if rest:
                # A line being written right now (or cut by a crash): not an entry yet.
                return


_KINDS = {b"p": PREPARED, b"c": COMMITTED, b"b": BASELINE}


def _parse(line: bytes) -> AnchorEntry:
    parts = line.split(b" ")
    if len(parts) == 3 and len(parts[2]) == 64 and parts[0] in _KINDS and parts[1].isdigit():
        return AnchorEntry(_KINDS[parts[0]], int(parts[1]), parts[2].decode("ascii"))
    return AnchorEntry("?", 0, line.decode("ascii", "replace")[:80])


def anchor_path(settings: Settings) -> Path:
    return Path(settings.audit_anchor or Path(settings.data_dir) / ANCHOR_FILE)


def anchor_for(settings: Settings) -> AnchorSink:
    """The configured anchor sink."""
    return FileAnchor(anchor_path(settings))


# -- writing: record_event prepares, the session's commit confirms --------------------------


def _sink(session: DbSession) -> AnchorSink | None:
    sink = session.info.get(SINK_KEY)
    if sink is not None:
        return sink  # type: ignore[no-any-return]
    from flask import current_app, has_app_context

    if has_app_context():
        found = current_app.extensions.get("intake.audit.anchor")
        return found  # type: ignore[no-any-return]
    return None


def prepare_event(session: DbSession, seq: int, digest: str, prev: Entry) -> None:
    """Make (seq, hash) durable in the anchor before the event's transaction can commit."""
    prepare_events(session, [(seq, digest)], prev)


def prepare_events(session: DbSession, entries: Sequence[Entry], prev: Entry) -> None:
    """Make each (seq, hash) of ``entries`` durable in the anchor, in one write, before their
    transaction can commit.

    Called by record_events with the chain writers' lock held, so prepared entries go out in
    chain order. ``prev`` is the chain head before the first of them: written as the baseline
    when the anchor is new, so a trail older than the anchor is not reported as unanchored.
    """
    sink = _sink(session)
    if sink is None or not entries:
        return
    baseline = None if sink.exists() else prev
    if baseline is not None:
        log.warning("audit_anchor_started", anchor=sink.describe(), after_seq=prev[0])
    sink.prepare(entries, baseline)
    session.info.setdefault(PENDING_KEY, []).extend(entries)


@sa_event.listens_for(Session, "after_commit")
def _confirm(session: Session) -> None:
    pending = session.info.pop(PENDING_KEY, None)
    if not pending:
        return
    sink = _sink(session)
    if sink is None:
        return
    try:
        sink.commit(pending)
    except OSError as error:
        # The prepared entries still vouch for these events; say so, do not fail a commit
        # that already happened.
        log.error("audit_anchor_commit_failed", anchor=sink.describe(), error=str(error))
        metrics.AUDIT_WRITE_FAILURES.labels("anchor").inc()


@sa_event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop(PENDING_KEY, None)


# -- reading: hold the database's chain against the anchor ------------------------------------


@dataclass
class _Vouched:
    """What the anchor vouches for, one 32-byte slot per seq (a million events: 64 MB at most)."""

    committed: bytearray = field(default_factory=bytearray)
    prepared: bytearray = field(default_factory=bytearray)
    # Seqs prepared more than once (rolled back, then written again): every hash they had.
    extra: dict[int, set[bytes]] = field(default_factory=dict)
    # Seqs committed with two different hashes.
    reused: set[int] = field(default_factory=set)
    baseline: Entry | None = None
    bad_line: str | None = None
    first_seq: int = 0
    # The highest seq stored, and the first entry that went beyond it by more than one.
    top: int = -1
    jump: tuple[int, int] | None = None

    def add(self, entry: AnchorEntry) -> None:
        kind, seq, hexdigest = entry
        if kind == BASELINE:
            if self.baseline is None:
                self.baseline = (seq, hexdigest)
                if self.top < self.first_seq:  # nothing stored yet: the table starts after it
                    self.first_seq = max(self.first_seq, seq + 1)
            return
        if kind == "?":
            self.bad_line = self.bad_line or hexdigest
            return
        if seq < self.first_seq or seq < 1:
            return
        if seq > max(self.top, self.first_seq - 1) + 1:
            # record_event takes the head's seq + 1 under the writers' lock, so Intake's seqs
            # never skip one: a jump means the database held an event Intake never wrote (a
            # seq forged far ahead). Stop storing rather than grow the table to that seq (a
            # seq of 10**9 would be 32 GB): the signer and verify must refuse, not crash.
            self.jump = self.jump or (max(self.top, self.first_seq - 1), seq)
            return
        self.top = max(self.top, seq)
        digest = bytes.fromhex(hexdigest)
        table = self.committed if kind == COMMITTED else self.prepared
        index = (seq - self.first_seq) * 32
        if index + 32 > len(table):
            table.extend(bytes(max(index + 32 - len(table), len(table))))
        before = table[index : index + 32]
        if before == digest:
            return
        if before != ZERO:
            if kind == COMMITTED:
                # Committed twice: the first event was deleted and its seq written again.
                self.reused.add(seq)
                return
            self.extra.setdefault(seq, {bytes(before)}).add(digest)
        table[index : index + 32] = digest

    def _get(self, table: bytearray, seq: int) -> bytes | None:
        index = (seq - self.first_seq) * 32
        value = bytes(table[index : index + 32]) if index >= 0 else b""
        return value if len(value) == 32 and value != bytes(32) else None

    def problem(self, seq: int, digest: str) -> str | None:
        """Why the anchor does not vouch for event ``seq`` with ``digest`` (None if it does)."""
        wanted = bytes.fromhex(digest) if len(digest) == 64 else b""
        if seq in self.reused:
            return (
                "event replaced: the anchor shows this seq committed twice with different "
                "hashes (the first event was deleted from the database and its seq used again)"
            )
        committed = self._get(self.committed, seq)
        if committed is not None:
            if committed == wanted:
                return None
            return (
                "event changed or replaced: the anchor recorded another hash for this seq "
                "when it was committed"
            )
        prepared = self._get(self.prepared, seq)
        if prepared == wanted or wanted in self.extra.get(seq, ()):
            return None
        if prepared is None:
            return "event not in the anchor: Intake never wrote an event with this seq"
        return "event not in the anchor: Intake never wrote this event (its hash is unknown there)"


@dataclass(frozen=True)
class AnchorReport:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    problem: str | None = None
    anchor: str = ""
    # The chain head when anchoring began (events up to it rely on the checkpoints alone).
    baseline_seq: int = 0
    end: int = 0


@dataclass(frozen=True)
class AnchorMark:
    """A place in the anchor already compared: the chain up to ``seq`` and the sink's offset."""

    seq: int
    offset: int


def compare(
    session: DbSession, anchor: AnchorSink, *, since: AnchorMark | None = None
) -> AnchorReport:
    """Find the first event the anchor does not vouch for, or committed events now missing.

    ``since``: only events after ``since.seq`` and anchor entries after ``since.offset`` are
    read (the signer remembers where its last checkpoint was made); a chain up to there is
    already covered by a signed checkpoint.
    """
    where = anchor.describe()
    # Order matters, as other processes keep writing: the anchor's end first, then the
    # database's head, then the anchor itself. Every event in the database up to that head
    # was prepared before it committed, so before the head was read: the scan sees it. Every
    # committed entry before that end was committed before the head was read: the database
    # must still hold it. Committed entries after that end may be newer than the head.
    end = anchor.end()
    head = session.scalar(select(func.max(AuditEvent.seq))) or 0
    events = session.scalar(select(func.count()).select_from(AuditEvent)) or 0
    if not anchor.exists():
        if events:
            return AnchorReport(
                False,
                events,
                1,
                f"anchor missing: {where} does not exist, yet the database holds {events} "
                "events",
                where,
            )
        return AnchorReport(True, 0, anchor=where)
    after = since.seq if since else 0
    vouched = _Vouched(first_seq=after + 1)
    last_committed = 0
    for position, entry in anchor.scan(since.offset if since else 0):
        vouched.add(entry)
        if entry.kind == COMMITTED and position <= end:
            last_committed = max(last_committed, entry.seq)
    if vouched.bad_line is not None:
        return AnchorReport(
            False, events, None, f"anchor damaged: unreadable line {vouched.bad_line!r}", where
        )
    if vouched.jump is not None:
        before, after_jump = vouched.jump
        return AnchorReport(
            False,
            events,
            before + 1,
            f"event inserted outside Intake: the anchor jumps from seq {before} to seq "
            f"{after_jump}, so Intake wrote seq {after_jump} after an event it never wrote "
            f"(seq {after_jump - 1}, forged far ahead)",
            where,
            vouched.baseline[0] if vouched.baseline else 0,
            end,
        )
    base_seq, base_hash = vouched.baseline or (0, "")
    if since is None and base_seq:
        stored = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == base_seq))
        if stored != base_hash:
            problem = (
                "missing event: the anchor began after this event, the database no longer has it"
                if stored is None
                else "event changed: it no longer has the hash the anchor began with"
            )
            return AnchorReport(False, events, base_seq, problem, where, base_seq, end)
    start = max(after, base_seq)
    rows = session.execute(
        select(AuditEvent.seq, AuditEvent.hash)
        .where(AuditEvent.seq > start, AuditEvent.seq <= head)
        .order_by(AuditEvent.seq)
        .execution_options(yield_per=10_000)
    )
    with rows:  # a server-side cursor on PostgreSQL: closed however the loop ends
        found = _first_unvouched(rows, start, vouched)
    if isinstance(found, tuple):
        return AnchorReport(False, events, found[0], found[1], where, base_seq, end)
    last = found
    if last_committed > last:
        return AnchorReport(
            False,
            events,
            last + 1,
            f"missing event: the anchor shows events up to seq {last_committed} committed, "
            f"the database ends at seq {last} (deleted or truncated)",
            where,
            base_seq,
            end,
        )
    return AnchorReport(True, events, None, None, where, base_seq, end)


def _first_unvouched(
    rows: Iterable[Any], start: int, vouched: _Vouched
) -> int | tuple[int, str]:
    """The last seq read when every event is vouched for, else (seq, problem) of the first not."""
    last = start
    for seq, digest in rows:
        if not isinstance(seq, int) or not isinstance(digest, str):
            return last + 1, "event changed"
        if seq != last + 1:
            # A gap: the events in between are gone (the chain check names it too).
            return last + 1, _missing(last + 1, vouched)
        unvouched = vouched.problem(seq, digest)
        if unvouched is not None:
            return seq, unvouched
        last = seq
    return last


def _missing(seq: int, vouched: _Vouched) -> str:
    if vouched._get(vouched.committed, seq) is not None:  # noqa: SLF001 - same module
        return "missing event: the anchor shows it committed, the database no longer has it"
    return "missing event"


def install(app: Any, settings: Settings) -> None:
    """Give the app its anchor: every record_event in it prepares and commits there."""
    app.extensions["intake.audit.anchor"] = anchor_for(settings)
