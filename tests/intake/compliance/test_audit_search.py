"""The audit search: filters, keyset pages, a streamed CSV export that is itself audited."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from html import unescape

import pytest
from sqlalchemy import select

from intake.audit import chain as audit
from intake.audit.chain import record_event
from intake.compliance import reports
from intake.compliance.forms import CONTROL_HINT, CONTROL_RE, REVERSED_HINT, parse_utc
from intake.compliance.reports import AUDIT_COLUMNS
from intake.extensions import db
from intake.models import AuditEvent
from tests.intake.compliance.test_access_report import table_rows, work_a_request


def events(app, **where):
    with app.app_context():
        query = select(AuditEvent).order_by(AuditEvent.seq.desc())
        for key, value in where.items():
            query = query.where(getattr(AuditEvent, key) == value)
        rows = db.session.scalars(query).all()
        db.session.expunge_all()
        return rows


def page_rows(client, query: str = "") -> list[list[str]]:
    response = client.get("/compliance/audit" + query)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    rows = table_rows(response.get_data(as_text=True), "audit-events")
    return [] if rows == [["No events match."]] else rows


def write_events(app, count: int, at: datetime | None = None, monkeypatch=None, **fields):
    with app.app_context():
        for n in range(count):
            if at is not None:
                moment = at + timedelta(seconds=n)
                monkeypatch.setattr(audit, "utcnow", lambda moment=moment: moment)
            record_event(
                db.session,
                actor=fields.get("actor", "system:test"),
                action=fields.get("action", "request.routed"),
                reference=fields.get("reference"),
                details={"n": n},
            )
        db.session.commit()
    if monkeypatch is not None:
        monkeypatch.undo()


def test_filters_by_actor_username_action_and_reference(app, patient, staff, officer_client):
    reference, team, _other, (alice, bob, _sam) = work_a_request(app, patient, staff)

    by_ref = page_rows(officer_client, f"?reference={reference.lower()}")
    assert by_ref and {row[7] for row in by_ref} == {reference}
    assert len(by_ref) == len(events(app, reference=reference))

    by_name = page_rows(officer_client, "?actor=alice")
    by_id = page_rows(officer_client, f"?actor=user:{alice.user_id}")
    assert by_name == by_id and by_name
    assert {row[2] for row in by_name} == {f"user:{alice.user_id}"}
    assert {row[3] for row in by_name} == {"alice"}
    assert "user.created" not in {row[5] for row in by_name}  # written by system:test

    glass = page_rows(officer_client, "?action=phi.break_glass")
    assert [row[3] for row in glass] == ["bob"]
    assert page_rows(officer_client, "?actor=nobody-by-that-name") == []
    assert page_rows(officer_client, "?actor=patient&action=request.submitted")[0][7] == reference
    combined = page_rows(officer_client, f"?actor=alice&action=phi.viewed&reference={reference}")
    assert len(combined) == 2


def test_time_range_is_utc_and_until_includes_the_day_or_minute(app, officer_client, monkeypatch):
    day = datetime(2026, 3, 10, tzinfo=UTC)
    write_events(app, 3, day - timedelta(days=1, seconds=-5), monkeypatch, action="key.rotated")
    write_events(app, 2, day + timedelta(hours=10, minutes=15), monkeypatch, action="key.rotated")
    write_events(app, 4, day + timedelta(days=1), monkeypatch, action="key.rotated")

    def count(query):
        return len(page_rows(officer_client, "?action=key.rotated&" + query))

    assert count("") == 9
    assert count("since=2026-03-10") == 6
    assert count("until=2026-03-10") == 5
    assert count("since=2026-03-10&until=2026-03-10") == 2
    assert count("since=2026-03-10T10:15&until=2026-03-10 10:15") == 2
    assert count("since=2026-03-10 10:16") == 4
    assert count("until=2026-03-09 00:00:05Z") == 1


@pytest.mark.parametrize("query", ["since=yesterday", "until=2026-13-01", "reference=hello"])
def test_bad_filters_come_back_with_a_message_and_400(officer_client, query):
    response = officer_client.get("/compliance/audit?" + query)
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert 'aria-invalid="true"' in html and "field__error" in html
    assert officer_client.get("/compliance/audit.csv?" + query).status_code == 400


def field_error(html: str, name: str) -> str | None:
    """The message shown beside filter field ``name``, or None."""
    found = re.search(rf'id="{name}-error">(?:<span[^>]*>[^<]*</span>)?([^<]*)</span>', html)
    return unescape(found.group(1)).strip() if found else None


def field_value(html: str, name: str) -> str | None:
    found = re.search(rf'<input[^>]*id="{name}"[^>]*value="([^"]*)"', html)
    return unescape(found.group(1)) if found else None


@pytest.mark.parametrize(
    ("since", "until"),
    [
        ("2026-03-11", "2026-03-10"),
        ("2026-03-10 10:16", "2026-03-10 10:15"),  # until includes 10:15, which ends at 10:16
        ("2026-03-10 10:15:01", "2026-03-10 10:15:00"),
        ("2026-03-10T00:00:01Z", "2026-03-09"),
    ],
)
def test_a_window_that_ends_before_it_starts_is_named_beside_until(
    app, officer_client, monkeypatch, since, until
):
    write_events(app, 3, datetime(2026, 3, 10, 10, 15, tzinfo=UTC), monkeypatch)
    query = {"since": since, "until": until}
    response = officer_client.get("/compliance/audit", query_string=query)
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert field_error(html, "until") == REVERSED_HINT
    assert field_error(html, "since") is None
    # The form keeps what was typed, so the officer can swap the two.
    assert (field_value(html, "since"), field_value(html, "until")) == (since, until)
    assert table_rows(html, "audit-events") == [["No events match."]]
    # The export of such a filter is refused like any other bad filter, and not recorded.
    before = len(events(app, action="audit.exported"))
    assert officer_client.get("/compliance/audit.csv", query_string=query).status_code == 400
    assert len(events(app, action="audit.exported")) == before


@pytest.mark.parametrize(
    ("since", "until", "found"),
    [
        ("2026-03-10 10:15", "2026-03-10 10:15", 3),  # one minute: both ends the same
        ("2026-03-10 10:15:02", "2026-03-10 10:15:02", 1),
        ("2026-03-10", "2026-03-10", 3),
        ("2026-03-11", None, 0),  # one end only: never reversed
        (None, "2026-03-09", 0),
    ],
)
def test_a_window_of_one_minute_or_one_end_is_not_reversed(
    app, officer_client, monkeypatch, since, until, found
):
    write_events(app, 3, datetime(2026, 3, 10, 10, 15, tzinfo=UTC), monkeypatch)
    query = "&".join(f"{k}={v}" for k, v in (("since", since), ("until", until)) if v)
    assert len(page_rows(officer_client, "?action=request.routed&" + query)) == found


CONTROL_VALUES = ["a\x00b", "\x00", "R-7K3M-Q9P2\x00", "2026-03-10\x00", "\x1b[2J", "a\tb", "x\x7f"]


@pytest.mark.parametrize("name", ["actor", "reference", "since", "until"])
@pytest.mark.parametrize("value", CONTROL_VALUES, ids=range(len(CONTROL_VALUES)))
def test_a_control_character_in_a_filter_field_is_named_beside_it(app, officer_client, name, value):
    before = len(events(app))
    response = officer_client.get("/compliance/audit", query_string={name: value, "action": ""})
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert field_error(html, name) == CONTROL_HINT
    assert 'aria-invalid="true"' in html and "<form" in html  # the search form, not the 400 page
    # The page never echoes the character: the field shows the value without it.
    assert not {"\x00", "\x1b", "\x7f"} & set(html)
    assert field_value(html, name) == CONTROL_RE.sub("", value).strip()
    assert len(events(app)) == before  # searching writes nothing; nor does this refusal
    # The export, which the page links to only for a valid filter, still gets the plain 400.
    export = officer_client.get("/compliance/audit.csv", query_string={name: value})
    assert export.status_code == 400 and "<form" not in export.get_data(as_text=True)


def test_a_nul_in_the_action_is_named_beside_it(officer_client):
    response = officer_client.get("/compliance/audit", query_string={"action": "phi.viewed\x00"})
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert field_error(html, "action") and "\x00" not in html


@pytest.mark.parametrize(
    "query",
    [{"actor": "ana", "before": "1\x00"}, {"actor": "ana", "x\x00": "1"}, {"lang": "\x00"}],
)
def test_a_control_character_elsewhere_in_the_audit_query_still_gets_the_plain_400(
    officer_client, query
):
    response = officer_client.get("/compliance/audit", query_string=query)
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert "Something was wrong with that request" in html and "<form" not in html


def test_keyset_pages_newest_first_without_gaps_or_repeats(app, officer_client, monkeypatch):
    monkeypatch.setattr(reports, "PAGE", 7)
    write_events(app, 30, action="team.created")
    write_events(app, 5, action="key.rotated")
    expected = [e.seq for e in events(app, action="team.created")]

    seen, query, pages = [], "?action=team.created", 0
    while True:
        response = officer_client.get("/compliance/audit" + query)
        html = response.get_data(as_text=True)
        rows = table_rows(html, "audit-events")
        seen += [int(r[0]) for r in rows]
        pages += 1
        if "Older events" not in html:
            break
        before = int(html.split("before=")[1].split("&")[0].split('"')[0])
        assert before == int(rows[-1][0])
        query = f"?action=team.created&before={before}"
    assert len(expected) == 38  # 8 teams made by the fixture, 30 here
    assert seen == expected and pages == 6
    # Newer pages go back up, and the first page has no "Newer" link.
    after = officer_client.get(f"/compliance/audit?action=team.created&after={expected[14]}")
    assert [int(r[0]) for r in table_rows(after.get_data(as_text=True), "audit-events")] == (
        expected[7:14]
    )
    assert "Newer events" not in officer_client.get("/compliance/audit").get_data(as_text=True)


def parse_csv(response) -> list[list[str]]:
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"].startswith('attachment; filename="audit-')
    assert response.headers["Cache-Control"] == "no-store"
    return list(csv.reader(io.StringIO(response.get_data(as_text=True))))


def test_csv_export_is_streamed_equals_the_page_and_is_audited_first(
    app, patient, staff, officer, officer_client, monkeypatch
):
    reference, *_ = work_a_request(app, patient, staff)
    query = f"?reference={reference}&actor=alice"
    shown = page_rows(officer_client, query)
    assert shown

    # Small chunks, so the export crosses several read transactions.
    monkeypatch.setattr(reports, "EXPORT_CHUNK", 2)
    last_before = events(app)[0].seq
    response = officer_client.get("/compliance/audit.csv" + query)
    assert response.is_streamed
    exported = events(app, action="audit.exported")
    assert len(exported) == 1, "the export is recorded before the download starts"
    body = parse_csv(response)
    assert tuple(body[0]) == AUDIT_COLUMNS
    # Cell for cell the same, but for the details: JSON in the CSV, key: value lines on the page.
    details = AUDIT_COLUMNS.index("Details")
    assert [r[:details] + r[details + 1 :] for r in body[1:]] == [
        r[:details] + r[details + 1 :] for r in shown
    ]
    for csv_row, page_row in zip(body[1:], shown, strict=True):
        for key in json.loads(csv_row[details]):
            if key != "username":
                assert f"{key.replace('_', ' ')}:" in page_row[details]

    event = exported[0]
    details = json.loads(event.details)
    assert event.actor == f"user:{officer.user_id}" and event.actor_role == "compliance"
    assert details == {
        "username": "olivia",
        "format": "csv",
        "filter_actor": "alice",
        "filter_action": None,
        "filter_reference": reference,
        "filter_since": None,
        "filter_until": None,
        "up_to_seq": last_before,
    }
    assert event.seq == last_before + 1

    # The export link on the page carries the same filter.
    html = officer_client.get("/compliance/audit" + query).get_data(as_text=True)
    assert f'href="/compliance/audit.csv?actor=alice&amp;reference={reference}"' in html


def test_unfiltered_export_covers_every_event_before_it(app, officer_client, monkeypatch):
    monkeypatch.setattr(reports, "EXPORT_CHUNK", 25)
    write_events(app, 60)
    total = len(events(app))
    body = parse_csv(officer_client.get("/compliance/audit.csv"))
    assert [int(r[0]) for r in body[1:]] == list(range(total, 0, -1))
    # A second export includes the first one's record, not its own.
    again = parse_csv(officer_client.get("/compliance/audit.csv"))
    assert again[1][5] == "audit.exported" and int(again[1][0]) == total + 1


def test_csv_cells_that_look_like_formulas_are_neutralized():
    from intake.compliance.views import spreadsheet_safe

    assert spreadsheet_safe("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert spreadsheet_safe("@SUM") == "'@SUM" and spreadsheet_safe("-1") == "'-1"
    assert spreadsheet_safe('{"a":1}') == '{"a":1}'


def test_parse_utc_reads_dates_minutes_and_seconds():
    assert parse_utc("2026-03-10") == datetime(2026, 3, 10, tzinfo=UTC)
    assert parse_utc("2026-03-10", end=True) == datetime(2026, 3, 11, tzinfo=UTC)
    assert parse_utc("2026-03-10T10:15", end=True) == datetime(2026, 3, 10, 10, 16, tzinfo=UTC)
    assert parse_utc("2026-03-10 10:15:30Z", end=True) == datetime(
        2026, 3, 10, 10, 15, 31, tzinfo=UTC
    )
    for bad in ("10/03/2026", "2026-02-30", "2026-03-10T25:00", ""):
        with pytest.raises(ValueError):
            parse_utc(bad)
