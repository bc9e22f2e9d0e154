"""The queue as a helpdesk user expects it: counts, sorting, "mine" and "unassigned", the
received filter, and bulk claim / assign / transfer, each request audited on its own.

Both databases (the ``backend`` fixture): the sorts compare row values and the bulk actions
lock rows, which SQLite and PostgreSQL do differently.
"""

from __future__ import annotations

import html as htmllib
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import OutboxMessage
from tests.intake.staff.conftest import (
    events_since,
    last_seq,
    queue_references,
    request_state,
)

COUNT_RE = re.compile(r'data-count="(\w+)"[^>]*>[^<]*<strong>(\d+)</strong>')
NEXT_RE = re.compile(r'<a href="([^"]*)">Next page</a>')


def counts(html: str) -> dict[str, int]:
    return {name: int(n) for name, n in COUNT_RE.findall(html)}


@pytest.fixture
def ana_user(make_user):
    return make_user("ana", teams=("clinical", "ivig", "refills-main"))


@pytest.fixture
def ana(ana_user, staff_login):
    return staff_login(ana_user)


@pytest.fixture
def boris(make_user, staff_login):
    return staff_login(make_user("boris", teams=("clinical", "refills-main")))


@pytest.fixture
def sofia(make_user, staff_login):
    return staff_login(make_user("sofia", role="supervisor"))


@pytest.fixture
def work(route, clock, ana, boris):
    """Ana's teams' queue: one overdue, one hers, one boris's, two nobody's; one elsewhere."""
    t0 = clock()
    made = {
        # Five days back: overdue on any weekday, its one business day over even from a Friday.
        "overdue": route("refill", location="main", at=t0 - timedelta(days=5)),
        "urgent": route("contact", topic="side_effect", at=t0),
        "hers": route("contact", topic="specialist", at=t0),
        "his": route("refill", location="main", at=t0 + timedelta(minutes=5)),
        "free": route("contact", topic="side_effect", at=t0 + timedelta(minutes=1)),
        "north": route("refill", location="north", at=t0),
    }
    assert ana.act(made["hers"], "claim").status_code == 303
    assert boris.act(made["his"], "claim").status_code == 303
    return made


def bulk(staff, references, action, **fields):
    data = {"reference": list(references), "action": action, **fields}
    return staff.post("/staff/queue/bulk", data)


def assignee_of(app, reference):
    return request_state(app, reference)["assignee_id"]


# -- counts, filters, sorting ------------------------------------------------------------------


def test_counts_follow_the_filters_in_force(work, ana):
    assert counts(ana.queue_html()) == {"total": 5, "overdue": 1, "mine": 1, "unassigned": 3}
    # A filter narrows every count; the "mine" filter itself leaves them whole (they are tabs).
    assert counts(ana.queue_html("?kind=contact")) == {
        "total": 3,
        "overdue": 0,
        "mine": 1,
        "unassigned": 2,
    }
    assert counts(ana.queue_html("?assignee=mine")) == counts(ana.queue_html())
    assert counts(ana.queue_html("?team=refills-main")) == {
        "total": 2,
        "overdue": 1,
        "mine": 0,
        "unassigned": 1,
    }


def test_counts_under_a_status_filter_come_from_one_count_query(app, work, ana, clock):
    """All four numbers come from one count query, narrowed by status, team and kind together;
    each is held here against the requests themselves."""
    assert ana.act(work["hers"], "status", status="in_progress").status_code == 303
    states = {
        key: {**request_state(app, ref), "kind": "refill" if ref.startswith("R-") else "contact"}
        for key, ref in work.items()
        if key != "north"
    }
    for query, wanted in [
        ("?status=in_progress", lambda s: s["status"] == "in_progress"),
        ("?status=queued", lambda s: s["status"] == "queued"),
        (
            "?status=queued&team=refills-main&kind=refill",
            lambda s: (
                s["status"] == "queued" and s["team"] == "refills-main" and s["kind"] == "refill"
            ),
        ),
        ("?status=completed", lambda s: False),
    ]:
        shown = [key for key, state in states.items() if wanted(state)]
        overdue = [key for key in shown if states[key]["sla_due_at"] < clock()]
        expected = {
            "total": len(shown),
            "overdue": len(overdue),
            "mine": int("hers" in shown),
            "unassigned": len([k for k in shown if k in ("overdue", "urgent", "free")]),
        }
        assert counts(ana.queue_html(query)) == expected, query
    assert counts(ana.queue_html("?status=queued"))["total"] == 4


def test_mine_and_unassigned_filters(work, ana, boris):
    assert queue_references(ana.queue_html("?assignee=mine")) == [work["hers"]]
    assert queue_references(boris.queue_html("?assignee=mine")) == [work["his"]]
    assert sorted(queue_references(ana.queue_html("?assignee=unassigned"))) == sorted(
        [work["overdue"], work["urgent"], work["free"]]
    )
    assert 'value="mine" selected' in ana.queue_html("?assignee=mine")
    assert ana.get("/staff/queue?assignee=everyone").status_code == 400
    assert ana.get("/staff/queue/version?assignee=mine").status_code == 200


def test_sorting_by_each_column_both_ways(app, work, ana):
    mine = [r for key, r in work.items() if key != "north"]
    due = sorted(mine, key=lambda r: request_state(app, r)["sla_due_at"])

    assert queue_references(ana.queue_html("?sort=due")) == due
    assert queue_references(ana.queue_html("?sort=-due")) == due[::-1]
    # Received: the order the patients sent them in (the fixture made them in this order).
    assert queue_references(ana.queue_html("?sort=received")) == mine
    assert queue_references(ana.queue_html("?sort=-received")) == mine[::-1]
    # Status in the order of a request's life: queued before in progress.
    assert ana.act(work["hers"], "status", status="in_progress").status_code == 303
    assert queue_references(ana.queue_html("?sort=status"))[-1] == work["hers"]
    assert queue_references(ana.queue_html("?sort=-status"))[0] == work["hers"]
    page = ana.queue_html("?sort=-due")
    assert 'aria-sort="descending"' in page and page.count("aria-sort=") == 1
    assert ana.get("/staff/queue?sort=name").status_code == 400


def test_a_sorted_queue_pages_without_overlap(route, clock, ana):
    t0 = clock()
    made = [route("refill", location="main", at=t0 + timedelta(minutes=i % 7)) for i in range(53)]

    first = ana.queue_html("?sort=-received")
    next_link = htmllib.unescape(NEXT_RE.search(first).group(1))
    assert "sort=-received" in next_link
    second = ana.queue_html(next_link.removeprefix("/staff/queue"))
    page_one, page_two = queue_references(first), queue_references(second)

    assert len(page_one) == 50 and len(page_two) == 3
    assert page_one + page_two == made[::-1]
    # A cursor made for another order, or made up, is the first page, not an error.
    assert queue_references(ana.queue_html("?sort=due&after=-received~2030-01-01~x")) != []
    assert ana.get("/staff/queue?sort=due&after=due~1999-01-01T00:00:00~9~x").status_code == 200


def test_received_is_offered_only_where_it_can_show_something(patient, work, ana, sofia):
    """Routing gives a request its team as it makes it queued: a received request is in no
    team's queue, so staff are not offered the filter; supervisors see what waits unrouted."""
    from tests.conftest import reference_from

    waiting = reference_from(patient.refill())

    assert 'value="received"' not in ana.queue_html()
    assert "all my teams" in ana.queue_html()
    page = sofia.queue_html("?status=received")
    assert "received (not routed yet)" in page
    assert queue_references(page) == [waiting]
    assert "all teams" in page and "all my teams" not in page


def test_the_version_changes_when_the_counts_do(route, work, ana, clock):
    route("contact", topic="side_effect", at=clock() - timedelta(minutes=55))  # due in 5 min
    before = ana.get("/staff/queue/version").get_json()["version"]
    assert counts(ana.queue_html())["overdue"] == 1
    # Nothing on the page changes, but a request falls overdue: the counts above it do.
    clock.advance(minutes=10)
    assert ana.get("/staff/queue/version").get_json()["version"] != before
    assert counts(ana.queue_html())["overdue"] == 2


# -- bulk claim --------------------------------------------------------------------------------


def test_bulk_claim_claims_each_with_its_own_event(app, work, ana, ana_user):
    chosen = [work["overdue"], work["urgent"], work["free"]]
    since = last_seq(app)

    response = bulk(ana, chosen, "claim")

    assert response.status_code == 303 and response.headers["Location"] == "/staff/queue"
    assert all(assignee_of(app, r) == ana_user.id for r in chosen)
    events = events_since(app, since)
    assert [(e.action, e.reference, e.actor) for e in events] == [
        ("request.claimed", r, ana_user.actor) for r in chosen
    ]
    assert all(e.details["batch_of"] == 3 for e in events)
    assert "You claimed 3 requests" in ana.queue_html()
    assert counts(ana.queue_html())["mine"] == 4


def test_bulk_claim_keeps_the_filters(work, ana):
    response = bulk(ana, [work["free"]], "claim", back_kind="contact", back_sort="-due")
    assert response.headers["Location"] == "/staff/queue?kind=contact&sort=-due"
    bad = bulk(ana, [work["urgent"]], "claim", back_kind="pizza", back_sort="name")
    assert bad.headers["Location"] == "/staff/queue"


def test_a_bulk_claim_with_another_teams_request_changes_nothing(app, work, ana):
    before = {r: request_state(app, r) for r in work.values()}
    since = last_seq(app)

    response = bulk(ana, [work["free"], work["north"]], "claim")

    assert response.status_code == 404
    page = response.get_data(as_text=True)
    assert "Nothing was changed" in page and work["north"] in page
    assert {r: request_state(app, r) for r in work.values()} == before
    assert events_since(app, since) == []


def test_a_bulk_claim_over_a_colleagues_claim_changes_nothing(app, work, ana):
    since = last_seq(app)

    response = bulk(ana, [work["free"], work["his"]], "claim")

    assert response.status_code == 409
    assert "boris is working on this request" in response.get_data(as_text=True)
    assert assignee_of(app, work["free"]) is None
    assert events_since(app, since) == []


def test_bulk_actions_need_the_csrf_token_and_a_choice(app, work, ana):
    since = last_seq(app)
    forged = ana.client.post(
        "/staff/queue/bulk", data={"reference": work["free"], "action": "claim"}
    )
    assert forged.status_code == 400
    assert bulk(ana, [], "claim").status_code == 400
    assert bulk(ana, [work["free"]], "delete").status_code == 400
    assert bulk(ana, [work["free"]] * 51, "claim").status_code == 303  # the same one, once
    assert [e.reference for e in events_since(app, since)] == [work["free"]]
    many = [f"R-AAAA-{i:04d}" for i in range(51)]
    assert bulk(ana, many, "claim").status_code == 400


# -- assigning to a person ---------------------------------------------------------------------


def test_a_supervisor_assigns_to_a_person_on_the_team(app, work, sofia, ana_user, boris):
    chosen = [work["urgent"], work["free"], work["his"]]
    since = last_seq(app)

    response = bulk(sofia, chosen, "assign", assignee=str(ana_user.id))

    assert response.status_code == 303
    assert all(assignee_of(app, r) == ana_user.id for r in chosen)
    events = events_since(app, since)
    assert [(e.action, e.reference, e.actor) for e in events] == [
        ("request.claimed", r, sofia.user.actor) for r in chosen
    ]
    for event in events:
        assert event.details["assigned_to"] == ana_user.actor
        assert event.details["assigned_to_username"] == "ana"
        assert event.details["assigned_by"] == "sofia"
    assert events[-1].details["previous_assignee"] == boris.user.id
    page = sofia.queue_html()
    assert "Assigned 3 requests" in page and "to ana." in page
    # The people to choose from, with their teams, are on the supervisor's queue only.
    assert 'name="assignee"' in sofia.queue_html()
    assert 'id="bulk-assignee"' not in boris.queue_html()


def test_assigning_to_someone_off_the_team_changes_nothing(app, work, sofia, boris):
    before = {r: request_state(app, r) for r in work.values()}
    since = last_seq(app)

    # boris is on clinical and refills-main, not ivig (the specialist request's team).
    response = bulk(sofia, [work["urgent"], work["hers"]], "assign", assignee=str(boris.user.id))

    assert response.status_code == 409
    assert "boris is not on the team of this request" in response.get_data(as_text=True)
    assert {r: request_state(app, r) for r in work.values()} == before
    assert events_since(app, since) == []


def test_staff_cannot_assign_and_nobody_can_assign_to_a_stranger(app, work, ana, boris, sofia):
    since = last_seq(app)
    assert bulk(ana, [work["free"]], "assign", assignee=str(boris.user.id)).status_code == 403
    assert bulk(sofia, [work["free"]], "assign", assignee="999999").status_code == 400
    assert bulk(sofia, [work["free"]], "assign", assignee="nobody").status_code == 400
    assert assignee_of(app, work["free"]) is None
    assert events_since(app, since) == []


# -- transferring ------------------------------------------------------------------------------


def outbox_count(app) -> int:
    with app.app_context():
        return int(
            db.session.execute(sa.select(sa.func.count()).select_from(OutboxMessage)).scalar()
        )


def test_a_bulk_transfer_is_confirmed_then_done_each_on_its_own(app, work, sofia):
    chosen = [work["overdue"], work["his"]]
    since, messages = last_seq(app), outbox_count(app)
    fields = {"team": "refills-north", "reason": "North has the stock"}

    asked = bulk(sofia, chosen, "transfer", **fields)

    assert asked.status_code == 200
    page = asked.get_data(as_text=True)
    assert "Transfer 2 requests to Refills: North Clinic?" in page
    assert all(r in page for r in chosen) and "Yes, transfer 2 requests" in page
    assert all(request_state(app, r)["team"] == "refills-main" for r in chosen)
    assert events_since(app, since) == [] and outbox_count(app) == messages

    done = bulk(sofia, chosen, "transfer", confirm="yes", **fields)

    assert done.status_code == 303
    for reference in chosen:
        state = request_state(app, reference)
        assert (state["team"], state["status"], state["assignee_id"]) == (
            "refills-north",
            "queued",
            None,
        )
    events = events_since(app, since)
    assert [(e.action, e.reference) for e in events] == [("request.transferred", r) for r in chosen]
    assert all(e.details["reason"] == "North has the stock" for e in events)
    assert outbox_count(app) == messages + 2


def test_a_bulk_transfer_over_a_colleagues_claim_is_refused_and_recorded(app, work, ana):
    since = last_seq(app)
    fields = {"team": "refills-north", "reason": "Closer to the patients", "confirm": "yes"}

    response = bulk(ana, [work["overdue"], work["his"]], "transfer", **fields)

    assert response.status_code == 409
    assert request_state(app, work["overdue"])["team"] == "refills-main"
    assert request_state(app, work["his"])["team"] == "refills-main"
    [refused] = events_since(app, since)
    assert (refused.action, refused.reference, refused.outcome) == (
        "request.transferred",
        work["his"],
        "refused",
    )


def test_one_transfer_from_the_request_page_is_confirmed_first(app, work, ana):
    since = last_seq(app)
    fields = {"team": "refills-north", "reason": "Patient moved north"}

    asked = ana.act(work["overdue"], "transfer", **fields)

    assert asked.status_code == 200
    page = asked.get_data(as_text=True)
    assert "Transfer this request to Refills: North Clinic?" in page
    assert f"No, back to {work['overdue']}" in page
    assert request_state(app, work["overdue"])["team"] == "refills-main"
    assert events_since(app, since) == []

    done = ana.act(work["overdue"], "transfer", confirm="yes", **fields)
    assert done.status_code == 303
    assert request_state(app, work["overdue"])["team"] == "refills-north"
