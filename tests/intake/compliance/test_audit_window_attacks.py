"""Attacks on the audit search's time window read as seq bounds once (reports.resolve_window).

The page and the export take the window's first and last seq as plain numbers and walk the
primary key between them, still checking each row's time. A trail whose clock steps back (events
out of time order by seq, inside and around the window), windows with no event, one event, or
bounds exactly on an event's time, with actor, action and reference filters: every page walked
older and newer, and the CSV export, must be exactly what a brute-force filter of the whole trail
finds. Kept as tests: none of these found a hole.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from intake.audit import chain as audit
from intake.audit.chain import record_event
from intake.compliance import reports
from intake.compliance.reports import AuditFilter
from intake.extensions import db
from intake.models import AuditEvent

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
REF_A, REF_B = "R-7K3M-Q9P2", "R-7K3M-Q9P3"
# Seconds after T0 for each event, in seq order: the clock steps back several times, lands on
# the same second twice, and leaves events before and after every window below.
OFFSETS = [10, 5, 20, 20, 3, 30, 15, -40, 25, 40, 0, 19, 21, 60, 9, 35, 20]


@pytest.fixture
def stepping_trail(app, officer, monkeypatch):
    """Events at OFFSETS, with two actors, three actions and two references (one listed by a
    queue view that names both)."""
    actors = ["system:test", f"user:{officer.user_id}"]
    with app.app_context():
        for n, offset in enumerate(OFFSETS):
            moment = T0 + timedelta(seconds=offset)
            monkeypatch.setattr(audit, "utcnow", lambda moment=moment: moment)
            if n % 5 == 4:
                record_event(
                    db.session,
                    actor=actors[n % 2],
                    action="phi.viewed",
                    details={"references": [REF_A, REF_B], "view": "queue"},
                )
            else:
                record_event(
                    db.session,
                    actor=actors[n % 2],
                    action=("request.routed", "note.added")[n % 3 == 0],
                    reference=(REF_A, REF_B, None)[n % 3],
                    details={"n": n},
                )
        db.session.commit()
    monkeypatch.undo()
    return actors


def brute_force(app, filt: AuditFilter, up_to: int | None = None) -> list[int]:
    """The seqs of every event ``filt`` matches, newest first, read by looking at each."""
    with app.app_context():
        every = db.session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).all()
        kept = []
        for e in every:
            if up_to is not None and e.seq > up_to:
                continue
            if filt.since is not None and e.created_at < filt.since:
                continue
            if filt.until is not None and e.created_at >= filt.until:
                continue
            if filt.actor and e.actor != filt.actor:
                continue
            if filt.action and e.action != filt.action:
                continue
            if filt.reference:
                listed = e.reference is None and filt.reference in json.loads(e.details).get(
                    "references", []
                )
                if e.reference != filt.reference and not listed:
                    continue
            kept.append(e.seq)
        return kept


def walk_older(session, filt: AuditFilter, limit: int) -> list[int]:
    seqs: list[int] = []
    page = reports.audit_page(session, filt, limit=limit)
    for _ in range(100):
        seqs += [r.seq for r in page.rows]
        if page.older_than is None:
            return seqs
        page = reports.audit_page(session, filt, before=page.older_than, limit=limit)
    raise AssertionError("the pages never end")


def walk_newer(session, filt: AuditFilter, limit: int, start: int) -> list[int]:
    """From the oldest row back up by ``after``: every row once, newest first when joined."""
    seqs: list[int] = []
    after = start
    for _ in range(100):
        page = reports.audit_page(session, filt, after=after, limit=limit)
        if not page.rows:
            return seqs
        seqs = [r.seq for r in page.rows] + seqs
        if page.newer_than is None:
            return seqs
        after = page.newer_than
    raise AssertionError("the pages never end")


def seconds(n: int) -> datetime:
    return T0 + timedelta(seconds=n)


WINDOWS = [
    (seconds(0), seconds(21)),  # bounds exactly on events, both sides
    (seconds(5), seconds(20)),  # until on three events at 20: none of them
    (seconds(20), seconds(21)),  # only the three at 20
    (seconds(-40), seconds(-39)),  # one event, out of order far back
    (seconds(11), seconds(14)),  # no event
    (seconds(61), seconds(90)),  # after every event
    (seconds(-90), seconds(-41)),  # before every event
    (seconds(-90), seconds(90)),  # everything
    (seconds(19), seconds(20)),  # one event, between others of its seq neighbourhood
    (seconds(20), seconds(20)),  # empty: until == since
    (None, seconds(10)),
    (seconds(30), None),
]


def filters(actors) -> list[AuditFilter]:
    made = []
    for (since, until), actor, action, reference in itertools.product(
        WINDOWS,
        (None, actors[1]),
        (None, "request.routed", "phi.viewed"),
        (None, REF_A),
    ):
        made.append(
            AuditFilter(actor=actor, action=action, reference=reference, since=since, until=until)
        )
    return made


def test_pages_older_and_newer_are_exactly_the_brute_force_answer(app, stepping_trail):
    for filt in filters(stepping_trail):
        expected = brute_force(app, filt)
        with app.app_context():
            for limit in (1, 3, 100):
                assert walk_older(db.session, filt, limit) == expected, (filt, limit)
                assert walk_newer(db.session, filt, limit, 0) == expected, (filt, limit)
                if expected:  # from the middle, newer than one of the window's own rows
                    middle = expected[len(expected) // 2]
                    newer = [s for s in expected if s > middle]
                    assert walk_newer(db.session, filt, limit, middle) == newer, (filt, limit)
                    older = [s for s in expected if s < middle]
                    page = reports.audit_page(db.session, filt, before=middle, limit=100)
                    assert [r.seq for r in page.rows] == older, (filt, limit)
            db.session.rollback()


def test_the_export_is_exactly_the_brute_force_answer(app, stepping_trail, monkeypatch):
    monkeypatch.setattr(reports, "EXPORT_CHUNK", 2)
    with app.app_context():
        last = reports.last_seq(db.session)
    for filt in filters(stepping_trail):
        with app.app_context():
            for up_to in (last, last - 3):
                exported = [r.seq for r in reports.export_rows(db.session, filt, up_to, chunk=2)]
                assert exported == brute_force(app, filt, up_to), (filt, up_to)


def test_the_csv_download_of_a_window_is_the_brute_force_answer(
    app, stepping_trail, officer_client
):
    query = "?since=2026-11-20 09:00:05&until=2026-11-20 09:00:20"
    expected = brute_force(app, AuditFilter(since=seconds(5), until=seconds(21)))
    response = officer_client.get("/compliance/audit.csv" + query)
    assert response.status_code == 200
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True))))[1:]
    # The export's own event is newer and recorded at the real clock, outside the window.
    assert [int(r[0]) for r in rows] == expected
    assert expected  # the window holds events, out of seq order among themselves
    assert sorted(expected, reverse=True) == expected


def test_a_resolved_window_is_not_carried_into_links_or_records(app, stepping_trail):
    filt = AuditFilter(since=seconds(0), until=seconds(21), since_text="a", until_text="b")
    with app.app_context():
        resolved = reports.resolve_window(db.session, filt)
    assert resolved.window_seqs is not None
    assert resolved.args() == filt.args() and resolved.as_details() == filt.as_details()
    assert "window" not in json.dumps(resolved.as_details())
