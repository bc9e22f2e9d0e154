"""Language-aware routing, with the task functions called directly as a worker runs them.

A request in Spanish (or asking for an interpreter) must end with someone who speaks the
language: a team that serves it, a team member who speaks it, or, when nobody does, a
"needs <language>" flag and a notice to the supervisors, as the sample ``config/routing.toml``
says. Notices go to a real SMTP server; both databases.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from intake.accounts import services as accounts
from intake.clock import utcnow
from intake.extensions import db
from intake.models import TOPICS, AuditEvent, OutboxMessage, Request, User
from intake.requests import casework
from intake.requests.routing import LANGUAGE_NOTICE_TASK
from tests.conftest import reference_from
from tests.intake.crypto.test_phi_canary import CONTACT_CANARIES, REFILL_CANARIES, leaked
from tests.intake.staff.conftest import PASSWORD, create_teams
from tests.workers.conftest import email_routing_file

SUPERVISORS_EMAIL = "supervisors@pharmacy.test"

# Every kind and topic of a Spanish request, and where the sample routing file sends it when
# no team member speaks Spanish: a team that serves Spanish, or flagged ("unmet").
NOBODY_SPEAKS_SPANISH = [
    ("refill", {"location": "main"}, "bilingual", "team"),
    ("refill", {"location": "north"}, "bilingual", "team"),
    ("refill", {"location": "infusion"}, "infusion", "unmet"),
    ("contact", {"topic": "question"}, "bilingual", "team"),
    ("contact", {"topic": "transfer"}, "bilingual", "team"),
    ("contact", {"topic": "side_effect"}, "clinical", "team"),
    # IVIG falls back to the clinical pharmacists, who serve Spanish.
    ("contact", {"topic": "specialist"}, "clinical", "team"),
    ("contact", {"topic": "copay"}, "benefits", "unmet"),
    ("contact", {"topic": "insurance"}, "benefits", "unmet"),
]
# The same requests when rosa (IVIG), lucia (benefits) and marco (infusion) speak Spanish:
# (team, assignee) for the ones the team itself does not serve.
SPEAKERS = {"rosa": "ivig", "lucia": "benefits", "marco": "infusion"}
WITH_SPEAKERS = {
    "infusion": ("infusion", "marco"),
    "specialist": ("ivig", "rosa"),
    "copay": ("benefits", "lucia"),
    "insurance": ("benefits", "lucia"),
}


def language_routing_file(folder: Path) -> Path:
    """The sample rules, every team and the supervisors notified by e-mail."""
    path = email_routing_file(folder)
    text = path.read_text()
    supervisors = '[supervisors]\nname = "Pharmacy supervisors"\nnotify = ["log"]'
    assert supervisors in text
    path.write_text(
        text.replace(
            supervisors,
            f'[supervisors]\nname = "Pharmacy supervisors"\nnotify = ["email"]\n'
            f'email = "{SUPERVISORS_EMAIL}"',
        )
    )
    return path


@pytest.fixture
def settings(base_settings, database_url, tmp_path, smtp_server):
    smtp_url, _mailbox = smtp_server
    return base_settings.replace(
        database_url=database_url,
        data_dir=tmp_path / "data",
        smtp_url=smtp_url,
        routing_file=language_routing_file(tmp_path),
    )


@pytest.fixture
def mailbox(smtp_server):
    return smtp_server[1]


@pytest.fixture
def teams(app):
    return create_teams(app)


def add_user(app, username, teams, languages, role="staff") -> int:
    with app.app_context():
        created = accounts.create_user(
            db.session,
            app.extensions["intake.keyring"],
            username=username,
            password=PASSWORD,
            role=role,
            teams=list(teams),
            actor="system:test",
            languages=list(languages),
        )
        db.session.commit()
        return created.user.id


def submit(patient, form, lang="es", **fields) -> str:
    return reference_from(getattr(patient, form)(lang=lang, **fields))


def request_id(app, reference) -> str:
    with app.app_context():
        return db.session.execute(
            sa.select(Request.id).where(Request.reference == reference)
        ).scalar_one()


def route(app, reference):
    """Run the worker's route_request task for ``reference``, as a delivery would."""
    from workers.tasks import route_request

    with app.app_context():
        route_request.run(request_id(app, reference))


def notify_supervisors_of_language(app, reference) -> list[str]:
    """Run every pending language notice for ``reference``; the outcomes' audit reasons."""
    from workers.tasks import notify_language_need

    rid = request_id(app, reference)
    with app.app_context():
        ids = (
            db.session.execute(
                sa.select(OutboxMessage.id).where(
                    OutboxMessage.request_id == rid,
                    OutboxMessage.task == LANGUAGE_NOTICE_TASK,
                    OutboxMessage.status == "pending",
                )
            )
            .scalars()
            .all()
        )
    # Outside the test's app context: the task opens its own, as in a worker, and an open read
    # here would hold SQLite's lock against the task's write.
    for outbox_id in ids:
        notify_language_need.apply(args=[rid], kwargs={"outbox_id": outbox_id})
    return [str(i) for i in ids]


def state(app, reference) -> dict:
    with app.app_context():
        row = db.session.execute(
            sa.select(Request).where(Request.reference == reference)
        ).scalar_one()
        assignee = db.session.get(User, row.assignee_id) if row.assignee_id else None
        return {
            "status": row.status,
            "team": row.team,
            "assignee": assignee.username if assignee else None,
            "assignee_languages": assignee.language_codes if assignee else [],
            "assignee_teams": assignee.team_ids if assignee else [],
            "language_need": row.language_need,
            "interpreter_language": row.interpreter_language,
        }


@contextlib.contextmanager
def request_updates(app) -> Iterator[list[str]]:
    """The UPDATE statements of the requests table run in the block (an executemany: one)."""
    statements: list[str] = []

    def seen(_conn, _cursor, statement, _params, _context, _executemany):
        if statement.lstrip().upper().startswith("UPDATE REQUESTS"):
            statements.append(statement)

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)


def routed_details(app, reference) -> list[dict]:
    with app.app_context():
        return [
            json.loads(d)
            for d in db.session.execute(
                sa.select(AuditEvent.details).where(
                    AuditEvent.reference == reference, AuditEvent.action == "request.routed"
                )
            ).scalars()
        ]


def supervisor_mail(mailbox, reference) -> list:
    return [
        m
        for m in mailbox.messages
        if m["To"] == SUPERVISORS_EMAIL and reference in m.get_payload(decode=True).decode()
    ]


def spanish_served(app, mailbox, reference) -> str:
    """How a Spanish request ended: 'team', 'assigned' or 'flagged'; fails if none holds."""
    table = app.extensions["intake.routing"]
    now = state(app, reference)
    assert now["status"] == "queued", reference
    if table.teams[now["team"]].serves("es"):
        assert now["language_need"] is None
        return "team"
    if now["assignee"] is not None:
        assert "es" in now["assignee_languages"] and now["team"] in now["assignee_teams"]
        assert now["language_need"] is None
        return "assigned"
    assert now["language_need"] == "es", f"{reference} went to {now['team']} unflagged"
    mail = supervisor_mail(mailbox, reference)
    assert len(mail) == 1, f"the supervisors were not told about {reference}"
    assert "Needs Spanish" in mail[0]["Subject"]
    return "flagged"


def test_the_cases_cover_every_kind_topic_and_location_of_the_sample_file(app):
    table = app.extensions["intake.routing"]
    topics = {f["topic"] for form, f, _t, _o in NOBODY_SPEAKS_SPANISH if form == "contact"}
    locations = {f["location"] for form, f, _t, _o in NOBODY_SPEAKS_SPANISH if form == "refill"}
    assert topics == set(TOPICS) and locations == set(table.locations)


def test_a_spanish_request_of_every_kind_and_topic_with_nobody_speaking_spanish(
    app, patient, teams, mailbox
):
    add_user(app, "ben", ["benefits", "ivig", "infusion"], ["en"])
    cases = {
        submit(patient, form, **fields): (team, outcome)
        for form, fields, team, outcome in NOBODY_SPEAKS_SPANISH
    }
    for reference in cases:
        route(app, reference)
        notify_supervisors_of_language(app, reference)

    for reference, (team, outcome) in cases.items():
        assert state(app, reference)["team"] == team, reference
        served = spanish_served(app, mailbox, reference)
        assert served == ("flagged" if outcome == "unmet" else "team"), reference
        assert state(app, reference)["assignee"] is None, "never an English-only assignee"
    flagged = [r for r, (_t, outcome) in cases.items() if outcome == "unmet"]
    assert len([m for m in mailbox.messages if m["To"] == SUPERVISORS_EMAIL]) == len(flagged)
    # The specialist request says it went to the fallback team and why.
    specialist = next(
        reference
        for reference, case in zip(cases, NOBODY_SPEAKS_SPANISH, strict=True)
        if case[1].get("topic") == "specialist"
    )
    (details,) = routed_details(app, specialist)
    assert details["team"] == "clinical" and details["rule_team"] == "ivig"
    assert details["language_outcome"] == "team"


def test_a_spanish_request_of_every_kind_and_topic_with_spanish_speakers(
    app, patient, teams, mailbox
):
    add_user(app, "ben", ["benefits", "ivig", "infusion"], ["en"])
    for username, team in SPEAKERS.items():
        add_user(app, username, [team], ["en", "es"])
    cases = {}
    for form, fields, team, _outcome in NOBODY_SPEAKS_SPANISH:
        key = fields.get("topic") or fields["location"]
        cases[submit(patient, form, **fields)] = WITH_SPEAKERS.get(key, (team, None))
    for reference in cases:
        route(app, reference)
        notify_supervisors_of_language(app, reference)

    for reference, (team, assignee) in cases.items():
        now = state(app, reference)
        assert (now["team"], now["assignee"]) == (team, assignee), reference
        assert spanish_served(app, mailbox, reference) == ("assigned" if assignee else "team")
    assert mailbox.messages == [], "nobody needed telling"
    copay = next(r for r, target in cases.items() if target == ("benefits", "lucia"))
    (details,) = routed_details(app, copay)
    assert details["assignee"] == "lucia" and details["language_outcome"] == "assigned"
    assert details["assignment_reason"] == "speaks Spanish, 0 open before this one"


def test_english_requests_are_not_flagged_or_assigned(app, patient, teams, mailbox):
    add_user(app, "lucia", ["benefits"], ["en", "es"])
    reference = submit(patient, "contact", lang="en", topic="copay")
    route(app, reference)
    now = state(app, reference)
    assert (now["team"], now["assignee"], now["language_need"]) == ("benefits", None, None)
    assert notify_supervisors_of_language(app, reference) == []


def test_the_least_loaded_speaker_gets_it_ties_by_username_never_a_disabled_one(
    app, patient, teams
):
    add_user(app, "ben", ["benefits"], ["en"])
    add_user(app, "pilar", ["benefits"], ["es", "en"])
    add_user(app, "lucia", ["benefits"], ["en", "es"])

    def next_assignee() -> str | None:
        reference = submit(patient, "contact", topic="copay")
        route(app, reference)
        return state(app, reference)["assignee"]

    first = submit(patient, "contact", topic="copay")
    route(app, first)
    assert state(app, first)["assignee"] == "lucia"  # 0 and 0 open: alphabetical
    assert next_assignee() == "pilar"  # lucia 1, pilar 0
    assert next_assignee() == "lucia"  # 1 and 1
    # Closed requests are not load: lucia completes one, so she has 1 open to pilar's 1.
    with app.app_context():
        lucia = db.session.execute(sa.select(User).where(User.username == "lucia")).scalar_one()
        actor = casework.Actor(lucia.id, "lucia", "staff", tuple(lucia.team_ids))
        casework.change_status(db.session, first, actor, "in_progress", utcnow())
        casework.change_status(db.session, first, actor, "completed", utcnow())
    assert next_assignee() == "lucia"  # 1 and 1 open again: alphabetical
    with app.app_context():
        accounts.disable_user(db.session, "pilar", "system:test", utcnow())
        db.session.commit()
    assert next_assignee() == "lucia"
    assert next_assignee() == "lucia", "a disabled account gets nothing, however idle"


def test_a_second_delivery_changes_nothing_and_notifies_once(app, patient, teams, mailbox):
    from workers.tasks import route_request

    reference = submit(patient, "contact", topic="insurance")
    route(app, reference)
    before = state(app, reference)
    with app.app_context():
        assert route_request.run(request_id(app, reference)) is None
    notify_supervisors_of_language(app, reference)
    notify_supervisors_of_language(app, reference)

    assert state(app, reference) == before and before["language_need"] == "es"
    assert len(routed_details(app, reference)) == 1
    with app.app_context():
        notices = db.session.scalar(
            sa.select(sa.func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.task == LANGUAGE_NOTICE_TASK)
        )
    assert notices == 1
    assert len(supervisor_mail(mailbox, reference)) == 1


def test_no_notice_once_a_speaker_has_claimed_it(app, patient, teams, mailbox):
    reference = submit(patient, "contact", topic="copay")
    route(app, reference)
    assert state(app, reference)["language_need"] == "es"
    boss_id = add_user(app, "sofia", [], ["en", "es"], role="supervisor")
    with app.app_context():
        casework.claim(
            db.session, reference, casework.Actor(boss_id, "sofia", "supervisor", ()), utcnow()
        )
    notify_supervisors_of_language(app, reference)

    assert state(app, reference)["language_need"] is None
    assert mailbox.messages == []
    with app.app_context():
        status = db.session.scalar(
            sa.select(OutboxMessage.status).where(OutboxMessage.task == LANGUAGE_NOTICE_TASK)
        )
    assert status == "done"


def test_the_supervisors_notice_names_the_language_and_no_phi(app, patient, teams, mailbox):
    contact = submit(patient, "contact", **{**CONTACT_CANARIES, "topic": "copay"})
    refill = submit(patient, "refill", **{**REFILL_CANARIES, "location": "infusion"})
    for reference in (contact, refill):
        route(app, reference)
        notify_supervisors_of_language(app, reference)

    for reference in (contact, refill):
        (message,) = supervisor_mail(mailbox, reference)
        body = message.get_payload(decode=True).decode()
        assert leaked(body) == [] and leaked(message["Subject"]) == []
        assert f"/staff/requests/{reference}" in body
        words = " ".join(body.split())
        assert "needs someone who speaks Spanish" in words
        assert 'It is flagged "needs Spanish" on the queue' in words
    with app.app_context():
        details = db.session.execute(sa.select(AuditEvent.details)).scalars().all()
    assert [d for d in details if leaked(d)] == []


@pytest.mark.parametrize(
    ("page", "fields", "team"),
    [
        ("en", {"topic": "copay"}, "benefits"),
        ("en", {"topic": "question"}, "patient-services"),
        # Asking for Vietnamese on the Spanish page: Vietnamese is the need, not Spanish.
        ("es", {"topic": "question"}, "patient-services"),
    ],
)
def test_an_interpreter_request_routes_like_a_language_need(
    app, patient, teams, mailbox, page, fields, team
):
    reference = submit(
        patient, "contact", lang=page, interpreter="y", interpreter_language="vi", **fields
    )
    route(app, reference)
    notify_supervisors_of_language(app, reference)

    now = state(app, reference)
    assert (now["team"], now["interpreter_language"], now["language_need"]) == (team, "vi", "vi")
    (message,) = supervisor_mail(mailbox, reference)
    assert message["Subject"].startswith("Needs Vietnamese:")

    # With a team member who speaks Vietnamese, the next one is assigned to him.
    add_user(app, "tuan", [team], ["en", "vi"])
    again = submit(
        patient, "contact", lang=page, interpreter="y", interpreter_language="vi", **fields
    )
    route(app, again)
    assert (state(app, again)["assignee"], state(app, again)["language_need"]) == ("tuan", None)


def test_a_spanish_interpreter_on_the_english_form_goes_to_spanish_speakers(app, patient, teams):
    reference = submit(
        patient, "refill", lang="en", interpreter="y", interpreter_language="es", location="main"
    )
    route(app, reference)
    assert state(app, reference)["team"] == "bilingual"


def test_a_batch_shares_spanish_requests_between_speakers_as_one_at_a_time_would(
    app, patient, teams
):
    """Routed in one batch, each request's speaker is chosen counting the ones the batch
    already gave out, so the work is shared, not all given to whoever was idlest first."""
    add_user(app, "pilar", ["benefits"], ["es", "en"])
    add_user(app, "lucia", ["benefits"], ["en", "es"])
    references = [submit(patient, "contact", topic="copay") for _ in range(4)]
    english = submit(patient, "contact", lang="en", topic="copay")
    with request_updates(app) as updates:
        route(app, references[0])
    assignees = [state(app, reference)["assignee"] for reference in references]
    assert assignees == ["lucia", "pilar", "lucia", "pilar"]
    reasons = [routed_details(app, reference)[0]["assignment_reason"] for reference in references]
    assert [reason.split(", ")[1] for reason in reasons] == [
        "0 open before this one",
        "0 open before this one",
        "1 open before this one",
        "1 open before this one",
    ]
    # One UPDATE for the four given to a speaker, one for the English one (before: one per
    # request given to a speaker, written as it was chosen).
    assert len(updates) == 2
    # The English one, routed in the same batch, is with the team and nobody in particular.
    assert state(app, english)["status"] == "queued" and state(app, english)["assignee"] is None
    assert all(len(routed_details(app, reference)) == 1 for reference in [*references, english])
