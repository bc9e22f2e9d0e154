"""The queue: urgent first then soonest due, filters, keyset pages, minimum PHI, live version."""

from __future__ import annotations

import html as htmllib
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa

from intake.extensions import db
from tests.intake.staff.conftest import queue_references, request_state

NEXT_RE = re.compile(r'<a href="([^"]*)">Next page</a>')
VERSION_ATTR_RE = re.compile(r'data-version="([0-9a-f]{16})"')


@pytest.fixture
def ana(make_user, staff_login):
    return staff_login(make_user("ana", teams=("clinical", "ivig", "refills-main")))


@pytest.fixture
def mixed(route, clock, ana):
    """Requests of ana's three teams at three priorities, made out of order, plus others."""
    t0 = clock()
    made = {
        "normal": route("refill", location="main", at=t0),
        "urgent_late": route("contact", topic="side_effect", at=t0 + timedelta(minutes=10)),
        "high": route("contact", topic="specialist", at=t0),
        "urgent_early": route("contact", topic="side_effect", at=t0),
        "other_team": route("refill", location="north", at=t0),
        "done": route("refill", location="main", at=t0 - timedelta(days=3)),
    }
    ana.act(made["done"], "status", status="in_progress")
    ana.act(made["done"], "status", status="completed")
    return made


def test_urgent_first_then_soonest_due(mixed, ana):
    html = ana.queue_html()

    assert queue_references(html) == [
        mixed["urgent_early"],
        mixed["urgent_late"],
        mixed["high"],
        mixed["normal"],
    ]
    priorities = re.findall(r'<span class="badge badge--(\w+)">', html)
    assert priorities == ["urgent", "urgent", "high", "normal"]


def test_urgent_comes_before_a_normal_request_due_sooner(mixed, route, clock, ana):
    # Routed two days ago: a normal refill long overdue, due before every urgent request.
    old_normal = route("refill", location="main", at=clock() - timedelta(days=2))

    references = queue_references(ana.queue_html())

    assert references.index(mixed["urgent_late"]) < references.index(old_normal)
    assert references.index(mixed["high"]) < references.index(old_normal)


def test_filters_by_status_team_and_kind(mixed, ana):
    ana.act(mixed["normal"], "status", status="in_progress")

    assert queue_references(ana.queue_html("?status=in_progress")) == [mixed["normal"]]
    assert queue_references(ana.queue_html("?status=completed")) == [mixed["done"]]
    assert queue_references(ana.queue_html("?team=ivig")) == [mixed["high"]]
    assert queue_references(ana.queue_html("?kind=refill")) == [mixed["normal"]]
    assert queue_references(ana.queue_html("?kind=contact")) == [
        mixed["urgent_early"],
        mixed["urgent_late"],
        mixed["high"],
    ]
    assert queue_references(ana.queue_html("?kind=contact&team=clinical")) == [
        mixed["urgent_early"],
        mixed["urgent_late"],
    ]
    assert "No requests match." in ana.queue_html("?status=waiting_on_patient")
    assert ana.get("/staff/queue?status=lost").status_code == 400
    assert ana.get("/staff/queue?kind=pizza").status_code == 400


def test_the_queue_shows_first_name_and_last_initial_only(route, ana):
    route("refill", location="main")  # Maria Núñez-Ortiz, 1980-03-15, (202) 555-0143
    route("contact", topic="specialist", last_name="Oyelaran-Whitcombe", date_of_birth="1955-02-03")

    html = ana.queue_html()

    assert "Maria N." in html and "John O." in html
    for secret in ("Núñez", "Ortiz", "Oyelaran", "Whitcombe", "1980-03-15", "1955-02-03"):
        assert secret not in html
    for phone in ("555-0143", "5550143", "555-0178", "5550178", "maria@example.com"):
        assert phone not in html


def test_page_two_continues_page_one_without_overlap(app, route, clock, ana):
    t0 = clock()
    # Many requests share a due time, so the pages must break ties by id to stay exact.
    made = [
        route("refill", location="main", at=t0 + timedelta(minutes=index // 20))
        for index in range(53)
    ]

    first = ana.queue_html()
    page_one = queue_references(first)
    next_link = htmllib.unescape(NEXT_RE.search(first).group(1))
    second = ana.queue_html(next_link.removeprefix("/staff/queue"))
    page_two = queue_references(second)

    assert len(page_one) == 50 and len(page_two) == 3
    assert not set(page_one) & set(page_two)
    assert sorted(page_one + page_two) == sorted(made)
    dues = [request_state(app, ref)["sla_due_at"] for ref in page_one + page_two]
    assert dues == sorted(dues)
    assert "Next page" not in second and "First page" in second


def test_the_version_changes_when_a_request_changes(mixed, route, ana):
    def version() -> str:
        response = ana.get("/staff/queue/version")
        assert response.status_code == 200 and set(response.get_json()) == {"version"}
        return str(response.get_json()["version"])

    # The page carries the version of the rows it shows, so it refreshes only on a change.
    rendered = VERSION_ATTR_RE.search(ana.queue_html()).group(1)
    assert version() == rendered == version()

    ana.act(mixed["high"], "claim")
    claimed = version()
    assert claimed != rendered
    assert "ana" in ana.get("/staff/queue?fragment=1").get_data(as_text=True)

    route("contact", topic="side_effect")
    assert version() != claimed


def test_unrouted_requests_page_too(app, patient, make_user, staff_login):
    """During a broker outage requests wait unrouted, with no due time; supervisors page them."""
    from tests.conftest import reference_from

    made = [reference_from(patient.refill()) for _ in range(52)]
    boss = staff_login(make_user("sofia", role="supervisor"))

    first = boss.queue_html("?status=received")
    next_link = htmllib.unescape(NEXT_RE.search(first).group(1))
    second = boss.queue_html(next_link.removeprefix("/staff/queue"))

    page_one, page_two = queue_references(first), queue_references(second)
    assert len(page_one) == 50 and len(page_two) == 2
    assert sorted(page_one + page_two) == sorted(made)


# -- what one page costs (issue 14, target 5) ---------------------------------------------------

VERSION_URL_RE = re.compile(r'data-version-url="([^"]*)"')
ROW_LINK_RE = re.compile(r'<td class="queue__reference"><a href="([^"]*)"')


def _statements(app) -> list[str]:
    """Every statement the app's engine runs from now on."""
    seen: list[str] = []
    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", lambda _c, _k, sql, *_r: seen.append(sql))
    return seen


def test_a_queue_page_reads_the_requests_twice_and_never_their_phi(app, mixed, ana):
    ana.act(mixed["high"], "claim")
    seen = _statements(app)

    html = ana.queue_html("?kind=contact")

    assert "ana" in html  # the assignee's name, joined into the page's select
    on_requests = [sql for sql in seen if "FROM requests" in sql]
    # One select of the rows shown, one count: the version stamp is derived from those two.
    assert len(on_requests) == 2, on_requests
    assert not [sql for sql in seen if "WHERE users.id IN" in sql]
    for column in ("phi_encrypted", "phone_index", "email_index", "name_dob_index"):
        assert not [sql for sql in on_requests if column in sql], column


def test_every_page_carries_the_version_its_poller_computes(app, mixed, route, clock, ana):
    # Enough for a second page, so its cursor is part of what the version is taken over.
    for minutes in range(50):
        route("refill", location="main", at=clock() + timedelta(minutes=minutes))
    ana.act(mixed["high"], "claim")
    first = ana.queue_html()
    second = htmllib.unescape(NEXT_RE.search(first).group(1)).removeprefix("/staff/queue")
    queries = [
        "",
        second,
        "?kind=contact",
        "?status=queued&team=clinical&kind=contact",
        "?assignee=mine",
        "?assignee=unassigned&sort=-received",
        "?sort=due",
        "?language_need=any",
    ]
    for query in queries:
        page = ana.queue_html(query)
        version = VERSION_ATTR_RE.search(page).group(1)
        poll = ana.get(htmllib.unescape(VERSION_URL_RE.search(page).group(1)))
        assert poll.get_json()["version"] == version, query

    mine = ana.queue_html("?assignee=mine")
    ana.act(mixed["high"], "status", status="in_progress")
    poll = ana.get(htmllib.unescape(VERSION_URL_RE.search(mine).group(1)))
    assert poll.get_json()["version"] != VERSION_ATTR_RE.search(mine).group(1)


def test_a_change_between_the_rows_and_the_counts_is_not_missed(app, mixed, ana, monkeypatch):
    """The page's version is that of what it shows: a change after its rows were read makes
    the poller see a difference at once, and the page reloads with it."""
    from intake.models import Request
    from intake.requests import casework

    counts = casework.queue_counts

    def change_then_count(session, *args, **kwargs):
        session.execute(
            sa.update(Request)
            .where(Request.reference == mixed["normal"])
            .values(status="in_progress", updated_at=clock_now())
        )
        return counts(session, *args, **kwargs)

    def clock_now():
        return app.extensions["intake.clock"]() + timedelta(seconds=1)

    def status_shown(html: str) -> str:
        row = html.split(f'data-reference="{mixed["normal"]}"', 1)[1].split("</tr>", 1)[0]
        return re.search(r'<td data-label="Status">([^<]*)</td>', row).group(1)

    monkeypatch.setattr(casework, "queue_counts", change_then_count)
    page = ana.queue_html()
    monkeypatch.setattr(casework, "queue_counts", counts)

    assert status_shown(page) == "queued"  # the rows were read before the change
    shown = VERSION_ATTR_RE.search(page).group(1)
    assert ana.get("/staff/queue/version").get_json()["version"] != shown
    again = ana.queue_html()
    assert status_shown(again) == "in progress"
    assert ana.get("/staff/queue/version").get_json()["version"] == (
        VERSION_ATTR_RE.search(again).group(1)
    )


def test_row_links_are_the_request_pages_under_any_script_root(app, mixed, ana):
    expected = queue_references(ana.queue_html())
    assert len(expected) == 4
    for root in ("", "/pharmacy"):
        response = ana.get("/staff/queue", environ_overrides={"SCRIPT_NAME": root})
        html = response.get_data(as_text=True)
        assert ROW_LINK_RE.findall(html) == [f"{root}/staff/requests/{ref}" for ref in expected]
    with app.test_request_context(environ_overrides={"SCRIPT_NAME": "/pharmacy"}):
        from flask import url_for

        assert ROW_LINK_RE.findall(html)[0] == url_for("staff.request_page", reference=expected[0])
