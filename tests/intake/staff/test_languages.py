"""Staff languages: set by the operator's commands (audited), used by routing, and the
"needs Spanish" flag on the queue until someone who speaks Spanish takes the request."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa

from intake.accounts import services as accounts
from intake.extensions import db
from intake.models import User
from tests.intake.staff.conftest import (
    PASSWORD,
    events_since,
    last_seq,
    queue_references,
    request_state,
)

BADGE_RE = re.compile(r'<span class="badge badge--language"[^>]*>needs (\w+)</span>')


def languages_of(app, username: str) -> str | None:
    with app.app_context():
        return db.session.execute(
            sa.select(User.languages).where(User.username == username)
        ).scalar_one_or_none()


def speak(app, username: str, *languages: str) -> None:
    with app.app_context():
        accounts.set_languages(db.session, username, list(languages), "system:test")
        db.session.commit()


def create(runner, username: str, *extra: str):
    return runner.invoke(
        args=["users", "create", username, "--role", "staff", "--team", "benefits", *extra],
        input=PASSWORD + "\n",
    )


# -- the commands -------------------------------------------------------------------------------


def test_users_create_takes_languages_and_audits_them(app, runner, teams):
    since = last_seq(app)

    result = create(runner, "lucia", "--language", "en", "--language", "ES", "--language", "es")

    assert result.exit_code == 0, result.output
    assert "Languages: en, es" in result.output
    assert languages_of(app, "lucia") == "en,es"
    (created,) = [e for e in events_since(app, since) if e.action == "user.created"]
    assert created.details["languages"] == ["en", "es"]


def test_users_create_without_languages_works_in_english(app, runner, teams):
    assert create(runner, "ben").exit_code == 0
    assert languages_of(app, "ben") == "en"


def test_users_create_refuses_a_language_routing_does_not_know(app, runner, teams):
    since = last_seq(app)

    result = create(runner, "pedro", "--language", "pt")

    assert result.exit_code != 0
    assert "unknown language 'pt'" in result.output and "es" in result.output
    assert languages_of(app, "pedro") is None
    assert events_since(app, since) == []


def test_users_set_languages_changes_them_audited_as_user_changed(app, runner, teams):
    assert create(runner, "lucia", "--language", "en", "--language", "es").exit_code == 0
    since = last_seq(app)

    result = runner.invoke(args=["users", "set-languages", "lucia", "es", "vi"])

    assert result.exit_code == 0, result.output
    assert "'lucia' works in: es, vi" in result.output
    assert languages_of(app, "lucia") == "es,vi"
    (changed,) = events_since(app, since)
    assert changed.action == "user.changed" and changed.actor.startswith("system:cli")
    assert changed.details == {
        "username": "lucia",
        "change": "languages",
        "languages": ["es", "vi"],
        "previous_languages": ["en", "es"],
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lucia", "pt"], "unknown language 'pt'"),
        (["lucia", "Spanish"], "'Spanish' is not a language code"),
        (["nobody", "es"], "no user 'nobody'"),
        (["lucia"], "Missing argument"),
    ],
)
def test_users_set_languages_refuses_bad_input_and_changes_nothing(
    app, runner, teams, args, message
):
    assert create(runner, "lucia").exit_code == 0
    since = last_seq(app)

    result = runner.invoke(args=["users", "set-languages", *args])

    assert result.exit_code != 0 and message in result.output
    assert languages_of(app, "lucia") == "en"
    assert events_since(app, since) == []


def test_a_language_set_by_the_command_is_used_by_the_next_routing(app, runner, teams, route):
    assert create(runner, "lucia").exit_code == 0
    before = route("contact", topic="copay", lang="es")
    assert runner.invoke(args=["users", "set-languages", "lucia", "en", "es"]).exit_code == 0

    after = route("contact", topic="copay", lang="es")

    assert request_state(app, before)["assignee_id"] is None
    with app.app_context():
        lucia = db.session.execute(sa.select(User.id).where(User.username == "lucia")).scalar()
    assert request_state(app, after)["assignee_id"] == lucia


# -- the queue ----------------------------------------------------------------------------------


@pytest.fixture
def flagged(route):
    """Spanish copay and insurance requests nobody in Benefits speaks Spanish for, an English
    one, and one asking for a Vietnamese interpreter."""
    return {
        "copay": route("contact", topic="copay", lang="es"),
        "insurance": route("contact", topic="insurance", lang="es"),
        # The form's language sticks in a cookie, as it does for a patient: say English.
        "english": route("contact", topic="copay", lang="en"),
        "vietnamese": route(
            "contact", topic="copay", lang="en", interpreter="y", interpreter_language="vi"
        ),
    }


def badges(html: str) -> dict[str, str]:
    """Reference -> the language its "needs ..." badge names, row by row."""
    found = {}
    for row in html.split("<tr")[2:]:
        refs = queue_references(row)
        badge = BADGE_RE.search(row)
        if refs and badge:
            found[refs[0]] = badge.group(1)
    return found


def test_the_queue_shows_which_requests_need_a_language(flagged, make_user, staff_login):
    ben = staff_login(make_user("ben", teams=("benefits",)))

    html = ben.queue_html()

    assert badges(html) == {
        flagged["copay"]: "Spanish",
        flagged["insurance"]: "Spanish",
        flagged["vietnamese"]: "Vietnamese",
    }
    assert "interpreter: Vietnamese" in html
    assert '<option value="es">needs Spanish</option>' in html


def test_the_queue_filters_requests_needing_a_language(flagged, make_user, staff_login):
    boss = staff_login(make_user("sofia", role="supervisor"))

    spanish = queue_references(boss.queue_html("?language_need=es"))
    anything = queue_references(boss.queue_html("?language_need=any"))

    assert sorted(spanish) == sorted([flagged["copay"], flagged["insurance"]])
    assert sorted(anything) == sorted(
        [flagged["copay"], flagged["insurance"], flagged["vietnamese"]]
    )
    assert 'value="es" selected' in boss.queue_html("?language_need=es")
    assert boss.get("/staff/queue?language_need=klingon").status_code == 400
    assert boss.get("/staff/queue/version?language_need=any").status_code == 200


def test_a_spanish_speaker_claiming_it_clears_the_flag(app, flagged, make_user, staff_login):
    ben = staff_login(make_user("ben", teams=("benefits",)))
    lucia_user = make_user("lucia", teams=("benefits",))
    speak(app, "lucia", "en", "es")
    lucia = staff_login(lucia_user)

    ben.act(flagged["copay"], "claim")
    assert flagged["copay"] in badges(ben.queue_html()), "an English-only claim leaves it flagged"
    ben.act(flagged["copay"], "release")
    since = last_seq(app)
    lucia.act(flagged["copay"], "claim")
    lucia.act(flagged["insurance"], "status", status="in_progress")

    assert badges(ben.queue_html()) == {flagged["vietnamese"]: "Vietnamese"}
    met = {
        e.reference: e.details.get("language_need_met")
        for e in events_since(app, since)
        if e.action in ("request.claimed", "request.status_changed")
    }
    assert met == {flagged["copay"]: "es", flagged["insurance"]: "es"}


def test_a_transfer_to_a_team_that_serves_the_language_clears_the_flag(
    app, flagged, make_user, staff_login
):
    boss = staff_login(make_user("sofia", role="supervisor"))

    boss.act(
        flagged["copay"],
        "transfer",
        confirm="yes",
        team="bilingual",
        reason="Spanish speakers there",
    )
    boss.act(flagged["english"], "transfer", confirm="yes", team="bilingual", reason="move it over")

    assert flagged["copay"] not in badges(boss.queue_html())
    # And back to a team that does not serve Spanish: flagged again, as nobody there has it.
    boss.act(
        flagged["copay"],
        "transfer",
        confirm="yes",
        team="ivig",
        reason="an IVIG question after all",
    )
    assert badges(boss.queue_html())[flagged["copay"]] == "Spanish"
    assert flagged["english"] not in badges(boss.queue_html())


def test_the_request_page_says_what_language_it_needs(flagged, make_user, staff_login):
    ben = staff_login(make_user("ben", teams=("benefits",)))

    spanish = ben.get(f"/staff/requests/{flagged['copay']}").get_data(as_text=True)
    vietnamese = ben.get(f"/staff/requests/{flagged['vietnamese']}").get_data(as_text=True)

    assert BADGE_RE.search(spanish).group(1) == "Spanish" and "Spanish form" in spanish
    assert "English form; asked for a Vietnamese interpreter" in vietnamese
