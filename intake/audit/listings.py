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
table against the details in its pass over the chain: intake.audit.chain.verify_chain).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, insert, text

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
