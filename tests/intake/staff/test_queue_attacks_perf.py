"""Attacks on the queue page read in one select and one count (casework.queue_view), its version
stamp (casework.queue_version) and the row links built once per page (_queue_rows.html).

Every filter combination, sort and cursor is held to a brute-force filter of all requests in
Python: the rows, the counts and the version must be exactly those of the actor's own teams.
Over HTTP, the ``phi.viewed`` event of a queue page must list exactly the references shown, and
neither the version stamp nor any link may carry a patient's name. Kept as tests: none of these
found a hole.
"""

from __future__ import annotations

import html as htmllib
import itertools
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import OPEN_STATUSES, Request
from intake.requests import casework
from tests.intake.staff.conftest import events_since, last_seq, queue_references

VERSION_ATTR_RE = re.compile(r'data-version="([0-9a-f]{16})"')
VERSION_URL_RE = re.compile(r'data-version-url="([^"]*)"')
HREF_RE = re.compile(r'(?:href|action|data-version-url)="([^"]*)"')
NAMES = ("Maria", "Núñez", "John", "Oyelaran", "Bartholomew", "Quillfeather")


@pytest.fixture
def ana_user(make_user):
    return make_user("ana", teams=("clinical", "refills-main"))


@pytest.fixture
def ana(ana_user, staff_login):
    return staff_login(ana_user)


@pytest.fixture
def spread(app, route, clock, ana, make_user, staff_login):
    """Requests of ana's teams and of others, at several priorities, kinds and statuses, some
    claimed by ana and some by a north colleague."""
    t0 = clock()
    made = [
        route("refill", location="main", at=t0),
        route("refill", location="main", at=t0 - timedelta(days=3)),  # overdue
        route("contact", topic="side_effect", at=t0),
        route("contact", topic="side_effect", at=t0 + timedelta(minutes=5)),
        route("refill", location="north", first_name="Bartholomew", last_name="Quillfeather"),
        route("refill", location="north", at=t0 - timedelta(days=3)),
        route("contact", topic="specialist", last_name="Oyelaran-Whitcombe"),
        route("contact", topic="copay"),
        route("refill", location="main", at=t0 + timedelta(minutes=1)),
    ]
    ana.act(made[0], "claim")
    ana.act(made[8], "status", status="in_progress")
    ned = staff_login(make_user("ned", teams=("refills-north",)))
    ned.act(made[4], "claim")
    ned.act(made[5], "status", status="waiting_on_patient")
    with app.app_context():  # a language flag on one of ana's and one of north's
        db.session.execute(
            sa.update(Request)
            .where(Request.reference.in_([made[2], made[5]]))
            .values(language_need="es")
        )
        db.session.commit()
    return made


def brute_force(app, actor, now, *, status, team, kind, language_need, assignee):
    """Every request the actor may see under the filters, in the default order, and counts."""
    with app.app_context():
        everything = db.session.scalars(sa.select(Request)).all()
        kept = []
        for r in everything:
            if (r.status != status) if status else (r.status not in OPEN_STATUSES):
                continue
            if actor.role != "supervisor" and r.team not in actor.teams:
                continue
            if (team and r.team != team) or (kind and r.kind != kind):
                continue
            if language_need == "any" and r.language_need is None:
                continue
            if language_need not in (None, "any") and r.language_need != language_need:
                continue
            kept.append(r)
        counted = list(kept)
        if assignee == "mine":
            kept = [r for r in kept if r.assignee_id == actor.user_id]
        elif assignee == "unassigned":
            kept = [r for r in kept if r.assignee_id is None]
        far = casework.NO_DUE_TIME
        kept.sort(key=lambda r: (r.priority_rank, r.sla_due_at or far, r.id))
        counts = casework.QueueCounts(
            len(counted),
            sum(1 for r in counted if r.sla_due_at and r.sla_due_at < now),
            sum(1 for r in counted if r.assignee_id == actor.user_id),
            sum(1 for r in counted if r.assignee_id is None),
        )
        return [r.reference for r in kept], counts


FILTERS = list(
    itertools.product(
        (None, "in_progress", "completed"),  # status
        (None, "clinical", "refills-main"),  # team (ana's)
        (None, "refill", "contact"),  # kind
        (None, "es"),  # language_need
        (None, "mine", "unassigned"),  # assignee
    )
)


def test_every_filter_combination_is_exactly_the_brute_force_answer(app, spread, ana_user, clock):
    actor = casework.Actor(ana_user.id, "ana", "staff", ("clinical", "refills-main"))
    now = clock()
    keyring = app.extensions["intake.keyring"]
    with app.app_context():
        for status, team, kind, language_need, assignee in FILTERS:
            filters = dict(
                status=status, team=team, kind=kind, language_need=language_need, assignee=assignee
            )
            expected, counts = brute_force(app, actor, now, **filters)
            for sort in casework.QUEUE_SORTS + ("-received", "-due"):
                # Pages of two, each continued by the cursor of the last: all of them, once.
                seen: list[str] = []
                after = None
                for _ in range(20):
                    view = casework.queue_view(
                        db.session, keyring, actor, now, sort=sort, after=after, limit=2, **filters
                    )
                    version = casework.queue_version(
                        db.session, actor, now, sort=sort, after=after, limit=2, **filters
                    )
                    assert view.version == version, (filters, sort)
                    assert view.counts == counts, (filters, sort)
                    seen += [row.reference for row in view.rows]
                    if len(view.rows) < 2:
                        break
                    after = view.rows[-1].cursor
                if sort == "priority":
                    assert seen == expected, (filters, sort)
                else:
                    assert sorted(seen) == sorted(expected), (filters, sort)
                    assert len(seen) == len(set(seen)), (filters, sort)
            db.session.rollback()


def test_a_cursor_of_another_filter_or_sort_shows_nothing_outside_the_teams(
    app, spread, ana_user, clock
):
    actor = casework.Actor(ana_user.id, "ana", "staff", ("clinical", "refills-main"))
    supervisor = casework.Actor(999, "boss", "supervisor", ())
    now = clock()
    keyring = app.extensions["intake.keyring"]
    allowed, _counts = brute_force(
        app, actor, now, status=None, team=None, kind=None, language_need=None, assignee=None
    )
    with app.app_context():
        # Cursors a supervisor's pages hand out, under every sort: over all teams' requests.
        cursors = []
        for sort in casework.QUEUE_SORTS:
            view = casework.queue_view(db.session, keyring, supervisor, now, sort=sort, limit=50)
            cursors += [row.cursor for row in view.rows]
        for cursor, sort in itertools.product(cursors, casework.QUEUE_SORTS):
            view = casework.queue_view(db.session, keyring, actor, now, sort=sort, after=cursor)
            assert {row.reference for row in view.rows} <= set(allowed), (cursor, sort)
            assert {row.team for row in view.rows} <= {"clinical", "refills-main"}


QUERIES = [
    "",
    "?kind=contact",
    "?team=clinical",
    "?assignee=mine",
    "?assignee=unassigned&sort=-received",
    "?status=in_progress&sort=status",
    "?language_need=es",
    "?language_need=any&sort=due",
    "?lang=es",
    "?fragment=1",
]


def test_the_queue_event_lists_exactly_the_rows_shown(app, spread, ana):
    for query in QUERIES:
        since = last_seq(app)
        page = ana.get("/staff/queue" + query).get_data(as_text=True)
        shown = queue_references(page)
        viewed = [e for e in events_since(app, since) if e.action == "phi.viewed"]
        assert len(viewed) == 1, query
        assert viewed[0].details["references"] == shown, query
        assert viewed[0].details["rows"] == len(shown), query
        for link in HREF_RE.findall(page):
            assert not [name for name in NAMES if name in htmllib.unescape(link)], link


def test_a_foreign_cursor_over_http_lists_only_own_teams(app, spread, make_user, staff_login, ana):
    boss = staff_login(make_user("sofia", role="supervisor"))
    page = boss.queue_html("?sort=received")
    north = [r for r in spread[4:6]]
    for query in ("", "?sort=received", "?sort=-due", "?assignee=mine", "?kind=refill"):
        for after in (*north, "9|", "0||x", "received~2026-01-01T00:00:00+00:00~x"):
            response = ana.get(f"/staff/queue{query}{'&' if query else '?'}after={after}")
            assert response.status_code in (200, 400), (query, after)
            if response.status_code == 200:
                refs = queue_references(response.get_data(as_text=True))
                assert not set(refs) & set(north), (query, after)
    assert set(north) <= set(queue_references(page))


def test_the_version_endpoint_does_not_answer_for_another_team(app, spread, ana):
    assert ana.get("/staff/queue/version?team=refills-north").status_code == 404
    own = ana.get("/staff/queue/version").get_json()["version"]
    # A change on another team's request does not move ana's version: it counts nothing there.
    with app.app_context():
        db.session.execute(
            sa.update(Request)
            .where(Request.reference == spread[4])
            .values(status="in_progress", assignee_id=None)
        )
        db.session.commit()
    assert ana.get("/staff/queue/version").get_json()["version"] == own
    body = ana.get("/staff/queue/version").get_data(as_text=True)
    assert not [name for name in NAMES if name in body]


def test_a_forwarded_prefix_from_an_untrusted_peer_does_not_change_row_links(app, spread, ana):
    plain = ana.queue_html()
    links = re.findall(r'<td class="queue__reference"><a href="([^"]*)"', plain)
    assert links and all(link.startswith("/staff/requests/") for link in links)
    forged = ana.get("/staff/queue", headers={"X-Forwarded-Prefix": "/evil"}).get_data(as_text=True)
    assert re.findall(r'<td class="queue__reference"><a href="([^"]*)"', forged) == links
    rooted = ana.get("/staff/queue", environ_overrides={"SCRIPT_NAME": "/rx"}).get_data(
        as_text=True
    )
    assert re.findall(r'<td class="queue__reference"><a href="([^"]*)"', rooted) == [
        "/rx" + link for link in links
    ]
    for link in links:  # each link opens the request it names
        assert ana.get(link).status_code == 200
