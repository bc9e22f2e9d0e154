"""Attacks on issue 13: the bulk queue form, sorting and counts, assignment to a person, the
away toggle, the request page's timeline and the queue script's URLs. Both databases.

Each test is an attack a team member, a supervisor or another site could try; most held on
the code as written and stay as guards, the ones that broke say so.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa

from intake.accounts import services as accounts
from intake.clock import now
from intake.extensions import db
from tests.intake.staff.conftest import events_since, last_seq, request_state


@pytest.fixture
def ana_user(make_user):
    return make_user("ana", teams=("clinical", "refills-main"))


@pytest.fixture
def ana(ana_user, staff_login):
    return staff_login(ana_user)


@pytest.fixture
def boris(make_user, staff_login):
    return staff_login(make_user("boris", teams=("refills-north",)))


@pytest.fixture
def sofia(make_user, staff_login):
    return staff_login(make_user("sofia", role="supervisor"))


@pytest.fixture
def work(route, clock):
    t0 = clock()
    return {
        "mine_team": route("refill", location="main", at=t0),
        "mine_team2": route("contact", topic="side_effect", at=t0),
        "north": route("refill", location="north", at=t0),
    }


def bulk(staff, references, action, **fields):
    return staff.post(
        "/staff/queue/bulk", {"reference": list(references), "action": action, **fields}
    )


def states(app, work):
    return {r: request_state(app, r) for r in work.values()}


# -- the bulk form from another team ----------------------------------------------------------


@pytest.mark.parametrize("action", ["claim", "transfer"])
def test_a_mixed_batch_with_another_teams_request_changes_nothing(app, work, ana, action):
    before, since = states(app, work), last_seq(app)
    # Lowercase, padded and repeated variants of the foreign one do not get it through.
    refs = [work["mine_team"], f"  {work['north'].lower()} ", work["north"], work["mine_team"]]
    fields = {"team": "clinical", "reason": "Stock is here", "confirm": "yes"}
    response = bulk(ana, refs, action, **fields)
    assert response.status_code == 404
    body = response.get_data(as_text=True)
    assert "not in your teams" in body
    assert states(app, work) == before
    assert [e for e in events_since(app, since) if e.action != "phi.viewed"] == []


def test_a_foreign_reference_answers_as_a_missing_one(app, work, ana):
    foreign = bulk(ana, [work["mine_team"], work["north"]], "claim")
    missing = bulk(ana, [work["mine_team"], "R-ZZZZ-ZZZZ"], "claim")
    assert foreign.status_code == missing.status_code == 404

    def strip(response):
        text = response.get_data(as_text=True)
        return text.replace(work["north"], "X").replace("R-ZZZZ-ZZZZ", "X")

    assert strip(foreign) == strip(missing)


def test_fifty_one_distinct_references_are_refused(app, work, ana):
    refs = [work["mine_team"]] + [f"R-AAAA-{i:04d}" for i in range(50)]
    before = states(app, work)
    assert bulk(ana, refs, "claim").status_code == 400
    assert states(app, work) == before


def test_a_closed_request_cannot_be_claimed_in_bulk(app, work, ana):
    assert ana.act(work["mine_team"], "claim").status_code == 303
    for status in ("in_progress", "completed"):
        ana.act(work["mine_team"], "status", status=status)
    assert request_state(app, work["mine_team"])["status"] == "completed"
    since = last_seq(app)
    assert bulk(ana, [work["mine_team"]], "claim").status_code == 409
    transfer = {"team": "clinical", "reason": "Wrong queue", "confirm": "yes"}
    assert bulk(ana, [work["mine_team"]], "transfer", **transfer).status_code == 409
    assert [e.action for e in events_since(app, since)] == []


def test_transfer_to_an_unknown_team_changes_nothing(app, work, ana):
    before = states(app, work)
    for team in ("no-such-team", "", "clinical' OR '1'='1"):
        response = bulk(
            ana, [work["mine_team"]], "transfer", team=team, reason="Somewhere else", confirm="yes"
        )
        assert response.status_code == 400, team
    assert states(app, work) == before


def test_confirm_yes_still_checks_scope_claims_and_reason(app, work, ana, boris):
    """Skipping the confirmation page is the same as pressing its button: every check runs."""
    assert boris.act(work["north"], "claim").status_code == 303
    before = states(app, work)
    # A reason that looks like patient details is refused even without the preview.
    assert (
        bulk(
            ana,
            [work["mine_team"]],
            "transfer",
            team="refills-north",
            reason="DOB 1980 phone 5550123",
            confirm="yes",
        ).status_code
        == 400
    )
    assert states(app, work) == before


def test_bulk_without_csrf_or_from_another_origin_is_refused(app, work, ana):
    before = states(app, work)
    data = {"reference": work["mine_team"], "action": "claim"}
    assert ana.client.post("/staff/queue/bulk", data=data).status_code == 400
    forged = {"csrf_token": ana.csrf_token(), **data}
    assert (
        ana.client.post(
            "/staff/queue/bulk", data=forged, headers={"Origin": "https://evil.example"}
        ).status_code
        == 400
    )
    assert (
        ana.client.post(
            "/staff/queue/bulk", data=forged, headers={"Sec-Fetch-Site": "cross-site"}
        ).status_code
        == 400
    )
    assert states(app, work) == before


# -- assigning to a person --------------------------------------------------------------------


def test_staff_cannot_assign_even_to_themselves_or_a_teammate(app, work, ana, ana_user):
    before = states(app, work)
    assert bulk(ana, [work["mine_team"]], "assign", assignee=str(ana_user.id)).status_code == 403
    assert states(app, work) == before


@pytest.mark.parametrize("role", ["compliance", "admin"])
def test_a_supervisor_cannot_assign_to_compliance_or_admin(app, work, sofia, make_user, role):
    other = make_user(f"odd-{role}", role=role, teams=("refills-main",) if role == "admin" else ())
    before = states(app, work)
    response = bulk(sofia, [work["mine_team"]], "assign", assignee=str(other.id))
    assert response.status_code == 400
    assert states(app, work) == before


def test_a_supervisor_cannot_assign_to_a_disabled_user(app, work, sofia, make_user):
    gone = make_user("gone", teams=("refills-main",))
    with app.app_context():
        accounts.disable_user(db.session, "gone", "system:test", now())
        db.session.commit()
    before = states(app, work)
    assert bulk(sofia, [work["mine_team"]], "assign", assignee=str(gone.id)).status_code == 400
    assert states(app, work) == before


def test_a_supervisor_cannot_assign_off_the_team(app, work, sofia, boris):
    before = states(app, work)
    response = bulk(sofia, [work["mine_team"]], "assign", assignee=str(boris.user.id))
    assert response.status_code == 409
    assert states(app, work) == before


# -- counts, sorting, cursors -----------------------------------------------------------------


def test_counts_and_filters_for_a_team_not_ones_own_are_refused(app, work, ana):
    for path in ("/staff/queue?team=refills-north", "/staff/queue/version?team=refills-north"):
        assert ana.get(path).status_code == 404
    page = ana.queue_html()
    assert work["north"] not in page


@pytest.mark.parametrize(
    "sort", ["due;DROP TABLE requests", "id", "-", "--due", "priority desc", "due'"]
)
def test_odd_sort_values_are_refused(work, ana, sort):
    assert ana.get("/staff/queue", query_string={"sort": sort}).status_code == 400


@pytest.mark.parametrize(
    "after",
    [
        "9" * 100_000,
        "0|" + "9" * 5000 + "|x",
        "due~" + "2024-01-01T00:00:00+00:00" * 1000 + "~0~x",
        "status~99~99~2100-01-01T00:00:00+00:00~" + "x" * 36,
        "status~999999999999999999999~0~2100-01-01T00:00:00+00:00~x",
        "received~0001-01-01T00:00:00+00:00~x",
        "received~9999-12-31T23:59:59+14:00~x",
    ],
)
@pytest.mark.parametrize("sort", ["", "status", "due", "received"])
def test_huge_or_odd_cursors_give_a_page_not_an_error(work, ana, after, sort):
    response = ana.get("/staff/queue", query_string={"after": after, "sort": sort})
    assert response.status_code == 200
    assert work["north"] not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "query",
    [
        {"_method": "POST"},
        {"_scheme": "javascript"},
        {"_external": "1", "_scheme": "javascript"},
        {"endpoint": "x"},
        {"_anchor": "x"},
    ],
)
def test_the_scripts_urls_are_not_built_from_the_raw_query(work, ana, query):
    """The queue page hands queue.js the URLs it polls; they must be ours, whatever the link."""
    response = ana.get("/staff/queue", query_string=query)
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    for name in ("data-version-url", "data-rows-url"):
        [url] = re.findall(rf'{name}="([^"]*)"', page)
        assert url.startswith("/staff/queue"), url
        assert "_" not in url and "endpoint" not in url and "#" not in url, url


# -- away -------------------------------------------------------------------------------------


def test_away_is_ones_own_and_needs_the_token(app, ana, ana_user, boris):
    def away(user_id):
        with app.app_context():
            return db.session.execute(
                sa.text("SELECT away_since FROM users WHERE id = :id"), {"id": user_id}
            ).scalar()

    assert ana.client.post("/staff/away", data={"away": "1"}).status_code == 400
    assert away(ana_user.id) is None
    # Fields naming someone else are ignored: the toggle is the logged-in person's.
    ana.post("/staff/away", {"away": "1", "user_id": str(boris.user.id), "username": "boris"})
    assert away(boris.user.id) is None and away(ana_user.id) is not None
    assert (
        ana.post("/staff/away", {"away": "0", "next": "https://evil.example/"})
        .headers["Location"]
        .startswith("/staff/")
    )


# -- the request page -------------------------------------------------------------------------


def test_a_transfer_reason_with_html_is_escaped_on_the_timeline(app, work, ana, boris):
    reason = '<img src=x onerror="alert(1)"> moved <b>north</b>'
    response = ana.act(
        work["mine_team"], "transfer", team="refills-north", reason=reason, confirm="yes"
    )
    assert response.status_code == 303
    page = boris.get(f"/staff/requests/{work['mine_team']}").get_data(as_text=True)
    assert "<img src=x" not in page and "<b>north</b>" not in page
    assert "&lt;img src=x" in page


@pytest.mark.parametrize(
    "details",
    [
        "not json",
        "[1, 2]",
        "null",
        '"text"',
        json.dumps({"priority": ["urgent"], "team": {"x": 1}}),
        json.dumps({"priority": {"a": 1}, "new": ["x"], "old": {"y": 2}, "to_team": [1]}),
    ],
)
@pytest.mark.parametrize(
    "action", ["request.routed", "request.status_changed", "request.transferred"]
)
def test_odd_details_json_does_not_break_the_timeline(app, details, action):
    """The trail is append-only, so the app writes every row; one it cannot read (restored
    from a backup by hand, written by an older version) must still not make the request page
    a 500 for the people working the request: it reads as having no details."""
    from types import SimpleNamespace

    from intake.requests.timeline import build_timeline

    event = SimpleNamespace(
        action=action, outcome="success", actor="user:1", details=details, created_at=now()
    )
    with app.app_context():
        [line] = build_timeline([event], {"clinical": "Clinical"})
    assert line.text


def test_the_request_page_of_a_purged_request(app, work, ana, clock):
    from intake.requests import retention

    assert ana.act(work["mine_team"], "claim").status_code == 303
    for status in ("in_progress", "completed"):
        ana.act(work["mine_team"], "status", status=status)
    with app.app_context():
        purged = retention.purge_expired(db.session, clock() + timedelta(days=400), days=30)
        db.session.commit()
    assert work["mine_team"] in purged
    response = ana.get(f"/staff/requests/{work['mine_team']}")
    assert response.status_code == 410
    assert bulk(ana, [work["mine_team"]], "claim").status_code == 409
