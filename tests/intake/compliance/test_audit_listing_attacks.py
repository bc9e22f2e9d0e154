"""The audit search by reference and by time window against hostile input and a clock that steps
back: never a 500, a message beside the field for bad input, and exactly the events a
brute-force filter over the whole trail (computed here in Python) says, on every page.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from intake.audit.chain import record_event
from intake.audit.listings import LISTING_ACTIONS
from intake.compliance import reports
from intake.compliance.forms import CONTROL_HINT
from intake.compliance.reports import AuditFilter
from intake.extensions import db
from intake.models import AuditEvent
from tests.intake.compliance.test_audit_filter_results import EVENTS, LONGER, OTHER, REF, START
from tests.intake.staff.conftest import install_clock


def brute_force(filt: AuditFilter) -> list[int]:
    """The seqs ``filt`` should find, newest first, from every event read into Python."""
    found = []
    for event in db.session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())):
        listed = json.loads(event.details).get("references", [])
        if filt.reference and not (
            event.reference == filt.reference
            or (
                event.reference is None
                and event.action in LISTING_ACTIONS
                and filt.reference in listed
            )
        ):
            continue
        at = event.created_at
        if filt.since is not None and at < filt.since:
            continue
        if filt.until is not None and at >= filt.until:
            continue
        found.append(event.seq)
    return found


def every_page(filt: AuditFilter) -> list[int]:
    """The seqs on every page, following the "older page" link to the end, then back."""
    pages = [reports.audit_page(db.session, filt, limit=3)]
    while pages[-1].older_than is not None:
        pages.append(reports.audit_page(db.session, filt, before=pages[-1].older_than, limit=3))
    forward = [row.seq for page in pages for row in page.rows]
    back = [reports.audit_page(db.session, filt, limit=3)]
    last = pages[-1]
    while last.newer_than is not None:
        last = reports.audit_page(db.session, filt, after=last.newer_than, limit=3)
        back.append(last)
    assert {row.seq for page in back for row in page.rows} <= set(forward)
    return forward


@pytest.fixture
def stepping_trail(app):
    """60 events through the app's clock, which steps back 50 minutes after every tenth."""
    real = app.extensions.get("intake.clock")
    clock = install_clock(app, START)
    with app.app_context():
        for n in range(60):
            clock.advance(minutes=-50 if n % 10 == 9 else 7)
            action, reference, details = EVENTS[n % len(EVENTS)]
            record_event(
                db.session, actor="user:1", action=action, reference=reference, details=details
            )
        db.session.commit()
    # Back to the real clock: logins check TOTP codes against it.
    if real is None:
        del app.extensions["intake.clock"]
    else:
        app.extensions["intake.clock"] = real
    return app


def field_message(value: str, page: str, limit: int, *hints: str) -> bool:
    """Whether ``page`` tells the officer what was wrong with ``value``.

    A control character gets the form's own message beside the field (the app's plain 400
    page, intake.web.refuse_control_characters, lets the filter's fields through to the form);
    a value over the field's ``limit`` gets WTForms' length message; anything else the field's
    hint.
    """
    if "\x00" in value:
        return "<form" in page and CONTROL_HINT in page and "\x00" not in page
    if len(value) > limit:
        return "characters" in page
    return any(hint in page for hint in hints)


WINDOWS = [
    (None, None),
    (START, START + timedelta(hours=1)),
    (START + timedelta(minutes=20), START + timedelta(minutes=21)),
    (START - timedelta(days=3650), START + timedelta(days=3650)),
    (START + timedelta(minutes=30), None),
    (None, START + timedelta(minutes=30)),
    (START + timedelta(hours=2), START),  # reversed
]


@pytest.mark.parametrize("reference", [None, REF, LONGER, OTHER])
@pytest.mark.parametrize(("since", "until"), WINDOWS)
def test_a_clock_that_steps_back_changes_nothing_the_search_finds(
    stepping_trail, reference, since, until
):
    filt = AuditFilter(reference=reference, since=since, until=until)
    with stepping_trail.app_context():
        assert every_page(filt) == brute_force(filt)
        exported = [row.seq for row in reports.export_rows(db.session, filt, 10**6)]
        assert sorted(exported) == sorted(brute_force(filt))


BAD_REFERENCES = [
    "%",
    "R-%",
    "R-____-____",
    "R-AAAA-BBB%",
    "R-AAAA",  # a prefix of REF
    "R" * 10_000,
    "R-AAAA-BBBB\x00",
    "\x00",
    "Ｒ-ＡＡＡＡ-ＢＢＢＢ",  # full-width look-alikes
    "Р-АААА-ВВВВ",  # Cyrillic look-alikes
    "R-AAAA-BBBB' OR '1'='1",
]


@pytest.mark.parametrize("value", BAD_REFERENCES, ids=range(len(BAD_REFERENCES)))
def test_a_bad_reference_gets_a_message_not_a_500(stepping_trail, officer_client, value):
    for path in ("/compliance/audit", "/compliance/audit.csv"):
        response = officer_client.get(path, query_string={"reference": value})
        assert response.status_code == 400, (path, response.status_code)
    text = officer_client.get("/compliance/audit", query_string={"reference": value}).get_data(
        as_text=True
    )
    assert field_message(value, text, 20, "A reference looks like R-7K3M-Q9P2.")
    report = officer_client.get(f"/compliance/access/{value[:2000]}")
    assert report.status_code in (301, 400, 404), report.status_code


@pytest.mark.parametrize("typed", [REF.lower(), f"  {REF} ", REF.replace("-", " "), "r aaaa bbbb"])
def test_a_reference_as_typed_finds_what_the_brute_force_finds(
    stepping_trail, officer_client, typed
):
    page = officer_client.get("/compliance/audit", query_string={"reference": typed})
    assert page.status_code == 200
    with stepping_trail.app_context():
        expected = brute_force(AuditFilter(reference=REF))
    exported = officer_client.get("/compliance/audit.csv", query_string={"reference": typed})
    seqs = [int(line.split(",")[0]) for line in exported.get_data(as_text=True).splitlines()[1:]]
    assert sorted(seqs) == sorted(expected)


BAD_TIMES = [
    "yesterday",
    "2026-13-01",
    "2026-02-30",
    "2026-11-02T25:00",
    "1900-01-01",
    "9999-12-31",
    "2026-11-02T08:00+02:00",
    "2026-11-02 08:00 CET",
    "\x00",
    "2" * 10_000,
    "%",
]


@pytest.mark.parametrize("field", ["since", "until"])
@pytest.mark.parametrize("value", BAD_TIMES, ids=range(len(BAD_TIMES)))
def test_a_bad_time_gets_a_message_not_a_500(stepping_trail, officer_client, field, value):
    for path in ("/compliance/audit", "/compliance/audit.csv"):
        response = officer_client.get(path, query_string={field: value})
        assert response.status_code == 400, (path, response.status_code)
    text = officer_client.get("/compliance/audit", query_string={field: value}).get_data(
        as_text=True
    )
    assert field_message(value, text, 25, "Use YYYY-MM-DD", "Use a date between")
