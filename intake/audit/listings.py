"""Which references each queue view and search listed: an index of the trail, kept beside it.

Why: a queue page or a search shows many requests at once, so its event names them in its
details (``"references": [...]``) rather than in ``reference``, and a patient's access report and
the audit search by reference must find those events too. Finding them by ``details LIKE``
reads the whole trail (8.6 s at 10M events). ``record_event`` therefore writes one
``audit_listings`` row (reference, seq) per reference listed, in the event's own transaction,
and the searches look the reference up there.

The rows are derived data, not evidence: they are not hashed into the chain, and the search
still checks each event it finds against the event itself (``compliance.reports``), so a row
added by hand cannot make an event name a reference its details do not list. The table is
append-only like the trail (triggers; the app role may only SELECT and INSERT), so only the
schema's owner could delete a row, and that would hide one listing from the filtered views
only, and ``intake audit verify`` names the event whose rows are missing or extra (it holds this
table against the details in its pass over the chain: :class:`ListingCheck`, called from
intake.audit.chain.verify_chain).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, case, func, insert, literal, select, text

from intake.extensions import DbSession
from intake.models import AuditListing

# Events that list many requests and name them in their details rather than in ``reference``.
LISTING_ACTIONS = ("phi.viewed", "request.searched")


def listed_references(action: str, reference: str | None, details: Mapping[str, Any]) -> list[str]:
    """The references an event lists (none unless it is a listing without a reference)."""
    if reference is not None or action not in LISTING_ACTIONS:
        return []
    listed = details.get("references")
    if not isinstance(listed, list):
        return []
    return list(dict.fromkeys(r for r in listed if isinstance(r, str)))


def record_listing(session: DbSession, seq: int, references: list[str]) -> None:
    """Index event ``seq`` under each reference it lists (one INSERT for all of them)."""
    if references:
        session.execute(insert(AuditListing), [{"reference": r, "seq": seq} for r in references])


# The same derivation in SQL, for a trail written without the index (a bulk load, the migration).
BACKFILL = {
    "postgresql": """
        INSERT INTO audit_listings (reference, seq)
        SELECT DISTINCT item #>> '{}', e.seq
        FROM audit_events AS e
        CROSS JOIN LATERAL json_array_elements(e.details::json -> 'references') AS item
        WHERE e.reference IS NULL AND e.action IN ('phi.viewed', 'request.searched')
          AND json_typeof(e.details::json -> 'references') = 'array'
          AND json_typeof(item) = 'string'
          AND e.seq > :after
        ON CONFLICT DO NOTHING
    """,
    "sqlite": """
        INSERT OR IGNORE INTO audit_listings (reference, seq)
        SELECT DISTINCT item.value, e.seq
        FROM audit_events AS e, json_each(e.details, '$.references') AS item
        WHERE e.reference IS NULL AND e.action IN ('phi.viewed', 'request.searched')
          AND json_valid(e.details) AND json_type(e.details, '$.references') = 'array'
          AND item.type = 'text'
          AND e.seq > :after
    """,
}


def backfill_listings(connection: Connection, after: int = 0) -> None:
    """Index every listing event with ``seq > after`` that is not indexed yet."""
    connection.execute(text(BACKFILL[connection.dialect.name]), {"after": after})


# Joins one event's stored references for the check below; a reference holding it is caught by
# the row count and read again row by row, so the joined text is never ambiguous.
_JOIN = ","
_NOT_LISTED: frozenset[Any] = frozenset()


def listings_by_event(dialect: str, after_seq: int) -> Select[Any]:
    """``audit_listings`` grouped by event, in seq order: (seq, references joined, rows, rows
    that are not text).

    One row per listing event rather than per reference: the database joins the references,
    so verify handles a queue view of 25 in one row instead of 25. Every seq from the start
    (unless ``after_seq``): a row at seq 0 or below names no event either.
    """
    c = AuditListing.__table__.c
    joined: ColumnElement[Any]
    not_text: ColumnElement[Any]
    if dialect == "postgresql":
        # string_agg skips a NULL row that count() counts: "A,B" beside a NULL would split into
        # as many pieces as there are rows. The owner can drop the NOT NULL, so count them.
        joined = func.string_agg(c.reference, literal(_JOIN))
        not_text = func.count() - func.count(c.reference)
    else:
        # SQLite stores what it is given: a BLOB row would join as its bytes, yet never match
        # a search for the reference, so such rows are counted and read one by one.
        joined = func.group_concat(c.reference, literal(_JOIN))
        not_text = func.count() - func.sum(case((func.typeof(c.reference) == "text", 1), else_=0))
    statement = select(c.seq, joined, func.count(), not_text).group_by(c.seq).order_by(c.seq)
    return statement.where(c.seq > after_seq) if after_seq else statement


def _referenced_in(details: str) -> list[Any] | None:
    """The ``references`` value of an event's stored details, as ``json.loads`` reads it."""
    try:
        parsed = json.loads(details)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    listed = parsed.get("references")
    return listed if isinstance(listed, list) else None


_END = 2**63  # past any seq: the listings stream is exhausted
_TWICE = "audit_listings holds one of its rows twice (rows added)"


class ListingCheck:
    """Hold ``audit_listings`` against the listing events' details while the chain streams by.

    Why: the table is not hashed, so a database owner who deletes a reference's rows hides a
    queue view from that patient's access report while the chain stays intact. Events arrive in
    seq order, and so do the grouped rows (:func:`listings_by_event`); :meth:`at` is called for
    every listing event and every event at or past :attr:`next_seq`, and names what is missing
    or extra. Derivation is :func:`listed_references` on the details as ``json.loads`` reads
    them, exactly what ``record_event`` indexed.
    """

    def __init__(
        self,
        grouped: Iterator[tuple[Any, ...]],
        rows_of: Callable[[Any], set[Any]],
        first_without_event: Callable[[list[int]], int | None],
    ) -> None:
        self._grouped = grouped
        self._rows_of = rows_of
        self._first_without_event = first_without_event
        self._row: tuple[Any, ...] = ()
        self.next_seq: int = _END
        self._not_a_seq: Any = None
        self._advance()

    def _advance(self) -> None:
        row = next(self._grouped, None)
        if row is not None and not isinstance(row[0], int | float):
            # SQLite keeps text or a BLOB in the INTEGER column; they sort after every number,
            # so the rest of the stream is no event's either. Compared with a seq, they would
            # stop verify with a TypeError (or blame an intact event for a wrong type).
            self._not_a_seq = row[0]
            row = None
        self._row = row or (_END, "", 0, 0)
        self.next_seq = self._row[0]

    def _stored(self) -> tuple[AbstractSet[Any], bool, bool]:
        """The current event's stored references, whether they are all text, and whether
        the table holds one of them twice (its primary key dropped)."""
        seq, joined, rows, not_text = self._row
        self._advance()
        if not not_text:
            references = joined.split(_JOIN)
            if len(references) == rows:
                distinct = set(references)
                return distinct, True, len(distinct) != rows
        # A reference holding the separator, or not text: the rows as the driver reads them.
        stored = self._rows_of(seq)
        return stored, False, len(stored) != rows

    def at(
        self, seq: int, action: str, reference: str | None, details: str
    ) -> tuple[int, str] | None:
        """What is wrong with event ``seq``'s rows, as (seq, problem), if anything."""
        finding = None
        if self.next_seq < seq:
            # A row for a seq the chain skipped over cannot be; the chain would break.
            finding = (self.next_seq, orphan_problem(self.next_seq))
            while self.next_seq < seq:
                self._advance()
        stored, text_only, twice = (
            self._stored() if self.next_seq == seq else (_NOT_LISTED, True, False)
        )
        if twice and finding is None:
            finding = (seq, f"listings index does not match event {seq}: {_TWICE}")
        listed = None
        if reference is None and action in LISTING_ACTIONS:
            listed = _referenced_in(details)  # otherwise listed_references lists nothing
        if listed is None:
            expected: AbstractSet[Any] = _NOT_LISTED
        else:
            if text_only:
                # The usual case, without filtering: a list equal as a set to text alone holds
                # text alone, so it is what listed_references would keep.
                try:
                    if set(listed) == stored:
                        return finding
                except TypeError:  # an unhashable item (a list or an object)
                    pass
            expected = set(listed_references(action, None, {"references": listed}))
        if finding is None and stored != expected:
            finding = (seq, _mismatch(seq, expected, stored))
        return finding

    def after_chain(self) -> tuple[int | None, str] | None:
        """Name the first row left past the chain's end that no event holds (committed later
        is fine), or else a row whose seq is not a number."""
        if self.next_seq != _END:
            beyond = sorted({self.next_seq, *(row[0] for row in self._numbered())})
            orphan = self._first_without_event(beyond)
            if orphan is not None:
                return orphan, orphan_problem(orphan)
        if self._not_a_seq is not None:
            return None, (
                f"listings index names event {self._not_a_seq!r}, which is not a seq (rows added)"
            )
        return None

    def _numbered(self) -> Iterator[tuple[Any, ...]]:
        """The grouped rows left, up to the first whose seq is not a number."""
        for row in self._grouped:
            if not isinstance(row[0], int | float):
                self._not_a_seq = row[0]
                return
            yield row


def _mismatch(seq: int, expected: AbstractSet[Any], stored: AbstractSet[Any]) -> str:
    missing = sorted(map(str, expected - stored))
    if missing:
        return (
            f"listings index does not match event {seq}: it lists {', '.join(missing)} "
            "but audit_listings has no row for that (rows deleted)"
        )
    extra = sorted(map(str, stored - expected))
    return (
        f"listings index does not match event {seq}: audit_listings names {', '.join(extra)}, "
        "which the event does not list (rows added)"
    )


def orphan_problem(seq: int) -> str:
    return f"listings index names event {seq}, which the chain does not hold (rows added)"
