"""Minimum necessary: staff see their own teams' requests; anything else is break-glass."""

from __future__ import annotations

import pytest

from tests.intake.staff.conftest import events_since, last_seq, queue_references, request_state

# Team B's patient: a refill at the North Clinic goes to refills-north.
B_PATIENT = {
    "first_name": "Bartholomew",
    "last_name": "Quillfeather",
    "date_of_birth": "1962-09-14",
    "phone": "(202) 555-0161",
    "location": "north",
}
B_PHI = ["Bartholomew", "Quillfeather", "1962-09-14", "555-0161", "+12025550161"]
REASON = "Patient called the main line about a missed infusion"


@pytest.fixture
def two_teams(route):
    """A request of team A (refills-main) and one of team B (refills-north)."""
    mine = route("refill", location="main", phone="(202) 555-0143")
    theirs = route("refill", **B_PATIENT)
    return mine, theirs


@pytest.fixture
def ana(make_user, staff_login):
    return staff_login(make_user("ana", teams=("refills-main",)))


def assert_no_b_phi(html: str) -> None:
    leaked = [value for value in B_PHI if value in html]
    assert leaked == [], f"team B's patient data shown to team A: {leaked}"


def test_staff_see_only_their_teams_requests(app, two_teams, ana):
    mine, theirs = two_teams

    queue = ana.queue_html()

    assert queue_references(queue) == [mine]
    assert_no_b_phi(queue)
    assert ana.get("/staff/queue?team=refills-north").status_code == 404
    assert ana.get("/staff/queue/version?team=refills-north").status_code == 404


def test_another_teams_request_is_not_found_and_cannot_be_acted_on(app, two_teams, ana):
    _mine, theirs = two_teams
    before, since = request_state(app, theirs), last_seq(app)

    page = ana.get(f"/staff/requests/{theirs}")
    claim = ana.act(theirs, "claim")
    note = ana.act(theirs, "note", text="Trying to write on another team's request")
    status = ana.act(theirs, "status", status="in_progress")
    transfer = ana.act(
        theirs, "transfer", confirm="yes", team="refills-main", reason="Move it to my team"
    )

    assert page.status_code == 404
    assert "Request not found in your teams' queues" in page.get_data(as_text=True)
    assert_no_b_phi(page.get_data(as_text=True))
    for response in (claim, note, status, transfer):
        assert response.status_code == 404
        assert_no_b_phi(response.get_data(as_text=True))
    assert request_state(app, theirs) == before
    assert events_since(app, since) == []


def test_search_does_not_find_another_teams_request(app, two_teams, ana):
    _mine, theirs = two_teams

    for query in (
        {"phone": B_PATIENT["phone"]},
        {"last_name": B_PATIENT["last_name"], "date_of_birth": B_PATIENT["date_of_birth"]},
        {"reference": theirs},
    ):
        response = ana.post("/staff/search", data=query)
        html = response.get_data(as_text=True)
        assert response.status_code == 200
        assert "0 found" in html
        # The form shows back what was typed; the results below it show nothing of team B.
        assert_no_b_phi(html.split("0 found", 1)[1])
        assert theirs not in html.split("0 found", 1)[1] and "Bartholomew" not in html


def test_supervisors_see_every_team(app, two_teams, make_user, staff_login):
    mine, theirs = two_teams
    boss = staff_login(make_user("sofia", role="supervisor"))

    assert set(queue_references(boss.queue_html())) == {mine, theirs}
    assert "Bartholomew" in boss.get(f"/staff/requests/{theirs}").get_data(as_text=True)


def test_break_glass_opens_with_a_recorded_reason_and_a_banner(app, two_teams, ana):
    _mine, theirs = two_teams
    since = last_seq(app)

    too_short = ana.act(theirs, "break-glass", reason="urgent")
    assert too_short.status_code == 400
    assert events_since(app, since) == []

    opened = ana.act(theirs, "break-glass", reason=REASON)

    html = opened.get_data(as_text=True)
    assert opened.status_code == 200
    assert "Break-glass access." in html and "reviewed by compliance" in html
    assert "Bartholomew Quillfeather" in html
    # Reading is all break-glass allows: no claim, status or note forms.
    assert f"/staff/requests/{theirs}/claim" not in html and "Add a note" not in html
    events = events_since(app, since)
    assert [(e.action, e.reference, e.actor) for e in events] == [
        ("phi.break_glass", theirs, ana.user.actor),
        ("phi.viewed", theirs, ana.user.actor),
    ]
    assert events[0].details["reason"] == REASON
    assert events[0].details["review"] == "pending"
    assert events[1].details["break_glass"] is True
    assert ana.act(theirs, "claim").status_code == 404


@pytest.mark.parametrize("role", ["compliance", "admin"])
def test_compliance_and_admin_cannot_open_a_request_by_default(
    app, two_teams, make_user, staff_login, role
):
    mine, theirs = two_teams
    user = staff_login(make_user(f"{role}-officer", role=role))
    since = last_seq(app)

    for reference in (mine, theirs):
        page = user.get(f"/staff/requests/{reference}")
        assert page.status_code == 404
        assert_no_b_phi(page.get_data(as_text=True))
        assert "Núñez" not in page.get_data(as_text=True)
    assert user.get("/staff/queue").status_code == 404
    assert user.act(mine, "claim").status_code == 404
    assert [e.action for e in events_since(app, since)] == []


def test_admin_cannot_break_the_glass(app, two_teams, make_user, staff_login):
    _mine, theirs = two_teams
    admin = staff_login(make_user("root-admin", role="admin"))
    since = last_seq(app)

    response = admin.act(theirs, "break-glass", reason=REASON)

    assert response.status_code == 404
    assert_no_b_phi(response.get_data(as_text=True))
    assert events_since(app, since) == []


@pytest.mark.parametrize("fetch_site", ["cross-site", "same-site"])
def test_another_site_cannot_open_a_request_in_a_logged_in_browser(
    app, route, make_user, staff_login, fetch_site
):
    """``same-site``: a sibling subdomain (the pharmacy's marketing site, say) also gets the
    SameSite=Lax cookie sent along, and must not fill a pharmacist's audit history either."""
    reference = route("refill", location="main")
    ana = staff_login(make_user("ana", teams=("refills-main",)))
    since = last_seq(app)
    lured = ana.get(f"/staff/requests/{reference}", headers={"Sec-Fetch-Site": fetch_site})
    html = lured.get_data(as_text=True)
    assert lured.status_code == 200 and "Continue to this page?" in html
    assert f'href="/staff/requests/{reference}"' in html and "Maria" not in html
    assert events_since(app, since) == []
    # The user's own click is same-origin and opens it as usual.
    opened = ana.get(f"/staff/requests/{reference}", headers={"Sec-Fetch-Site": "same-origin"})
    assert "Maria" in opened.get_data(as_text=True)
    assert [e.action for e in events_since(app, since)] == ["phi.viewed"]
