"""The audit search by reference and by time window answers exactly what it answered before
those filters were made index scans: the same rows, in the same order, on the same pages, in
the same export, on PostgreSQL and SQLite.

The "before" is the old SQL, kept here: a reference is named by an event's ``reference`` or, for
queue views and searches without one, by ``details LIKE '%"<reference>"%'``; a window is a plain
``created_at`` filter. The trail mixes events about the reference, listings that name it among
others, listings that name only a longer reference it is a prefix of, events whose details
mention it but are not listings, and times out of seq order (a machine with a slow clock).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import ColumnElement, and_, false, or_

from intake.audit import chain as audit
from intake.audit.chain import record_event
from intake.compliance import reports
from intake.compliance.reports import AuditFilter
from intake.extensions import db
from intake.models import AuditEvent

REF = "R-AAAA-BBBB"
LONGER = "R-AAAA-BBBBX"  # not a real reference: one that starts with REF
OTHER = "R-CCCC-DDDD"
PREFIX = "R-AAAA"  # a substring of REF, asked for as if it were a reference
START = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


def old_names_reference(reference: str | list[str]) -> ColumnElement[bool]:
    references = [reference] if isinstance(reference, str) else reference
    return or_(
        *(
            or_(
                AuditEvent.reference == r,
                and_(
                    AuditEvent.reference.is_(None),
                    AuditEvent.action.in_(("phi.viewed", "request.searched")),
                    AuditEvent.details.contains(f'"{r}"', autoescape=True),
                ),
            )
            for r in references
        )
    )


def old_conditions(filt: AuditFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if filt.actor:
        conditions.append(AuditEvent.actor == filt.actor)
    if filt.action:
        conditions.append(AuditEvent.action == filt.action)
    if filt.reference:
        conditions.append(old_names_reference(filt.reference))
    if filt.since is not None:
        conditions.append(AuditEvent.created_at >= filt.since)
    if filt.until is not None:
        conditions.append(AuditEvent.created_at < filt.until)
    if filt.since is not None and filt.until is not None and filt.until <= filt.since:
        conditions.append(false())
    return conditions


def the_old_way(monkeypatch, run):
    with monkeypatch.context() as patched:
        patched.setattr(reports, "_conditions", old_conditions)
        patched.setattr(reports, "names_reference", old_names_reference)
        return run()


EVENTS: list[tuple[str, str | None, dict[str, Any]]] = [
    ("request.submitted", REF, {}),
    ("request.routed", OTHER, {"team": "refills"}),
    ("phi.viewed", None, {"view": "queue", "rows": 2, "after": False, "references": [REF, OTHER]}),
    ("phi.viewed", None, {"view": "queue", "rows": 1, "after": True, "references": [OTHER]}),
    ("phi.viewed", None, {"view": "queue", "rows": 1, "after": False, "references": [LONGER]}),
    ("request.searched", None, {"by": "phone", "results": 1, "references": [REF]}),
    ("request.searched", None, {"by": "phone", "results": 0, "references": []}),
    ("phi.viewed", REF, {"break_glass": False, "notes": 0}),
    # Names REF in its details but is neither a listing nor about REF.
    ("request.transferred", OTHER, {"merged_into": REF}),
    ("phi.viewed", OTHER, {"seen_with": [REF]}),
    ("request.searched", None, {"by": "name_dob", "results": 2, "references": [LONGER, REF]}),
    ("request.status_changed", LONGER, {"status": "completed"}),
]


@pytest.fixture
def trail(app, monkeypatch):
    """120 events, one every minute, but every seventh stamped 45 minutes early."""
    with app.app_context():
        for n in range(120):
            action, reference, details = EVENTS[n % len(EVENTS)]
            moment = START + timedelta(minutes=n) - timedelta(minutes=45 if n % 7 == 3 else 0)
            monkeypatch.setattr(audit, "utcnow", lambda moment=moment: moment)
            record_event(
                db.session,
                actor=f"user:{1 + n % 3}",
                action=action,
                reference=reference,
                details={**details, "n": n},
            )
        db.session.commit()
    monkeypatch.undo()
    return app


FILTERS = [
    AuditFilter(reference=REF),
    AuditFilter(reference=LONGER),
    AuditFilter(reference=OTHER),
    AuditFilter(reference=PREFIX),
    AuditFilter(reference=REF, action="phi.viewed"),
    AuditFilter(reference=REF, actor="user:2"),
    AuditFilter(since=START + timedelta(minutes=30), until=START + timedelta(minutes=50)),
    AuditFilter(since=START + timedelta(minutes=-40), until=START + timedelta(minutes=2)),
    AuditFilter(since=START + timedelta(minutes=100)),
    AuditFilter(until=START + timedelta(minutes=10)),
    AuditFilter(since=START + timedelta(days=1), until=START + timedelta(days=2)),
    AuditFilter(since=START + timedelta(minutes=9), until=START + timedelta(minutes=9)),
    AuditFilter(
        reference=REF, since=START + timedelta(minutes=20), until=START + timedelta(minutes=90)
    ),
]


def walk(session, filt: AuditFilter) -> list[reports.AuditPage]:
    """Every page from the newest to the oldest, then back up to the newest again."""
    pages = [reports.audit_page(session, filt, limit=4)]
    while pages[-1].older_than is not None:
        pages.append(reports.audit_page(session, filt, before=pages[-1].older_than, limit=4))
    while pages[-1].newer_than is not None:
        pages.append(reports.audit_page(session, filt, after=pages[-1].newer_than, limit=4))
    return pages


@pytest.mark.parametrize(
    "filt", FILTERS, ids=lambda f: "&".join(f"{k}={v}" for k, v in vars(f).items() if v)
)
def test_pages_and_export_are_the_same_as_before(trail, monkeypatch, filt):
    with trail.app_context():
        session = db.session
        new_pages = walk(session, filt)
        old_pages = the_old_way(monkeypatch, lambda: walk(session, filt))
        assert new_pages == old_pages
        last = reports.last_seq(session)
        new_export = list(reports.export_rows(session, filt, last, chunk=5))
        old_export = the_old_way(
            monkeypatch, lambda: list(reports.export_rows(session, filt, last, chunk=5))
        )
        assert new_export == old_export
        assert [r.seq for r in new_export] == sorted(
            {r.seq for p in new_pages for r in p.rows}, reverse=True
        )


def test_the_mixed_trail_exercises_every_case(trail):
    with trail.app_context():
        by_ref = list(reports.export_rows(db.session, AuditFilter(reference=REF), 10**6))
        listings = [r for r in by_ref if r.reference is None]
        assert {r.action for r in listings} == {"phi.viewed", "request.searched"}
        assert all(REF in r.detail_values["references"] for r in listings)
        # Mentioned in details but not a listing: not an event about REF.
        assert "request.transferred" not in {r.action for r in by_ref}
        assert not list(reports.export_rows(db.session, AuditFilter(reference=PREFIX), 10**6))
        window = AuditFilter(
            since=START + timedelta(minutes=30), until=START + timedelta(minutes=50)
        )
        times = [r.created_at for r in reports.export_rows(db.session, window, 10**6)]
        assert times != sorted(times, reverse=True)  # seq order is not time order here


@pytest.mark.parametrize("references", [[REF], [OTHER], [REF, LONGER], [PREFIX]])
def test_access_report_events_are_the_same_as_before(trail, monkeypatch, references):
    with trail.app_context():
        new = reports.request_events(db.session, references)
        old = the_old_way(monkeypatch, lambda: reports.request_events(db.session, references))
        assert new == old and (new or references == [PREFIX])


def test_the_csv_export_by_reference_lists_the_same_events_as_the_page(trail, officer_client):
    response = officer_client.get(f"/compliance/audit.csv?reference={REF.lower()}")
    assert response.status_code == 200
    lines = response.get_data(as_text=True).splitlines()
    with trail.app_context():
        expected = list(
            reports.export_rows(
                db.session, AuditFilter(reference=REF), reports.last_seq(db.session)
            )
        )
    seqs = [line.split(",", 1)[0] for line in lines[1:] if line[:1].isdigit()]
    assert len(seqs) > 10 and seqs == [str(r.seq) for r in expected]
