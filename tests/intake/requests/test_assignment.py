"""Automatic assignment: who gets a request, caps, skills, away, backfill, claim timeout, and
two workers assigning at once (real concurrent PostgreSQL connections). Both databases.

Requests are inserted already routed (queued in a team) where a test needs many of them; the
route task's own assignment is exercised through the patient form at the end.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa

from intake.accounts import services as accounts
from intake.clock import utcnow
from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request, User
from intake.requests import assignment, casework
from intake.requests.references import new_reference
from intake.requests.routing import RoutingError, load_routing
from tests.conftest import reference_from
from tests.intake.staff.conftest import (
    PASSWORD,
    StaffClient,
    create_staff_user,
    create_teams,
    install_clock,
    login,
)

ROUTING = """
[[teams]]
id = "ivig"
name = "IVIG clinical team"
assignment = "round_robin"
cap = 8
skills = ["ivig"]
claim_timeout_minutes = 30

[[teams]]
id = "benefits"
name = "Benefits"
assignment = "least_loaded"
cap = 8

[[teams]]
id = "general"
name = "Patient services"
assignment = "{strategy}"
cap = 100

[[teams]]
id = "manual"
name = "Claimed by hand"

[[languages]]
code = "es"
name = "Español"
name_en = "Spanish"
name_es = "español"

[[languages]]
code = "vi"
name = "Tiếng Việt"
name_en = "Vietnamese"
name_es = "vietnamita"

[[rules]]
name = "IVIG"
topic = "specialist"
team = "ivig"
priority = "high"
sla = "4h"

[[rules]]
name = "benefits"
topic = ["copay", "insurance"]
team = "benefits"
sla = "1bd"

[[rules]]
name = "by hand"
topic = "transfer"
team = "manual"
sla = "1bd"

[[rules]]
name = "everything else"
team = "general"
sla = "1bd"
"""


@pytest.fixture
def strategy():
    return "round_robin"


@pytest.fixture
def settings(base_settings, database_url, tmp_path, strategy):
    path = tmp_path / "routing.toml"
    path.write_text(ROUTING.format(strategy=strategy))
    return base_settings.replace(
        database_url=database_url, data_dir=tmp_path / "data", routing_file=path
    )


@pytest.fixture
def table(app):
    create_teams(app)
    return app.extensions["intake.routing"]


def add_user(app, username, teams, languages=("en",), skills=(), cap=None, role="staff") -> int:
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
        created.user.skills = ",".join(skills)
        created.user.assignment_cap = cap
        db.session.commit()
        return created.user.id


def add_requests(app, team, count, language="en", interpreter=None, assignee=None) -> list[str]:
    """``count`` routed requests of ``team``, oldest first; their ids."""
    start = utcnow() - timedelta(hours=2)
    ids = []
    with app.app_context():
        for n in range(count):
            request = Request(
                id=f"00000000-0000-4000-8000-{random.getrandbits(48):012x}",
                reference=new_reference("contact"),
                kind="contact",
                topic="question",
                language=language,
                interpreter_language=interpreter,
                status="queued",
                priority="normal",
                priority_rank=2,
                team=team,
                assignee_id=assignee,
                last_activity_at=start if assignee else None,
                created_at=start + timedelta(seconds=n),
                routed_at=start + timedelta(seconds=n),
                sla_due_at=start + timedelta(days=1),
                phi=b"sealed",
            )
            db.session.add(request)
            ids.append(request.id)
        db.session.commit()
    return ids


def assign(app, request_id, when=None, **options) -> assignment.Outcome:
    with app.app_context():
        return assignment.assign_request(
            db.session, app.extensions["intake.routing"], request_id, when or utcnow(), **options
        )


def open_counts(app) -> Counter:
    with app.app_context():
        rows = db.session.execute(
            sa.select(User.username)
            .join(Request, Request.assignee_id == User.id)
            .where(Request.status == "queued")
        ).scalars()
        return Counter(rows)


def assignee_of(app, request_id) -> str | None:
    with app.app_context():
        return db.session.execute(
            sa.select(User.username)
            .join(Request, Request.assignee_id == User.id)
            .where(Request.id == request_id)
        ).scalar()


def events(app, action) -> list[tuple[str, str, dict]]:
    with app.app_context():
        return [
            (e.actor, e.reference, json.loads(e.details))
            for e in db.session.execute(
                sa.select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
            ).scalars()
        ]


def set_away(app, user_id, away) -> None:
    with app.app_context():
        assignment.set_away(db.session, user_id, away, utcnow(), actor="system:test")
        db.session.commit()


# -- spreading the work -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["round_robin", "least_loaded"])
def test_a_hundred_requests_spread_within_one_across_available_people(app, table, strategy):
    ids = {name: add_user(app, name, ["general"]) for name in ("ann", "ben", "cat", "dan")}
    set_away(app, ids["dan"], True)
    # Ben already holds six: least loaded evens the load out, round robin the new requests.
    add_requests(app, "general", 6, assignee=ids["ben"])
    new = add_requests(app, "general", 100)

    given = [assign(app, request_id).assignee for request_id in new]

    assert None not in given and "dan" not in given
    spread = Counter(given)
    totals = open_counts(app)
    if strategy == "round_robin":
        assert max(spread.values()) - min(spread.values()) <= 1, spread
        assert given[:6] == ["ann", "ben", "cat"] * 2  # in turn, by account
    else:
        assert max(totals.values()) - min(totals.values()) <= 1, totals
        assert spread["ben"] < spread["ann"]
    assert totals["dan"] == 0
    audited = events(app, "request.assigned")
    assert len(audited) == 100 and {actor for actor, _, _ in audited} == {"system:assign"}
    assert {d["strategy"] for _, _, d in audited} == {strategy}


def test_round_robin_remembers_the_last_one_per_team(app, table):
    for name in ("ann", "ben", "cat"):
        add_user(app, name, ["general"])
    first, second = add_requests(app, "general", 2)
    assert assign(app, first).assignee == "ann"
    # A new process (a worker restarted) continues the rotation from the team's memory.
    assert assign(app, second).assignee == "ben"


# -- who may get a request ----------------------------------------------------------------------


def test_a_spanish_request_goes_only_to_a_spanish_speaker(app, table):
    add_user(app, "ann", ["benefits"])
    lucia = add_user(app, "lucia", ["benefits"], languages=("en", "es"))
    add_user(app, "ben", ["benefits"])
    spanish = add_requests(app, "benefits", 4, language="es")
    vietnamese = add_requests(app, "benefits", 1, interpreter="vi")[0]

    assert [assign(app, r).assignee for r in spanish] == ["lucia"] * 4
    nobody = assign(app, vietnamese, record_unassigned=True)
    assert nobody.assignee is None and assignee_of(app, vietnamese) is None

    reasons = [d["reason"] for _, _, d in events(app, "request.assigned")]
    assert reasons[0] == "assigned to lucia: speaks Spanish, fewest open, 0 of 8 open"
    assert reasons[3] == "assigned to lucia: speaks Spanish, fewest open, 3 of 8 open"
    [(_, _, pooled)] = events(app, "request.left_in_pool")
    assert pooled["reason"] == "nobody eligible: 3 do not speak Vietnamese"
    # Away, the only speaker gets nothing: the next Spanish request waits in the pool.
    set_away(app, lucia, True)
    later = add_requests(app, "benefits", 1, language="es")[0]
    assert assign(app, later).assignee is None


def test_an_ivig_request_goes_only_to_someone_with_the_skill(app, table):
    add_user(app, "clerk", ["ivig"])
    add_user(app, "nurse", ["ivig"], skills=("ivig",))
    requests = add_requests(app, "ivig", 5)

    assert [assign(app, r).assignee for r in requests] == ["nurse"] * 5
    details = events(app, "request.assigned")[0][2]
    assert details["reason"] == "assigned to nurse: has IVIG, next in turn, 0 of 8 open"
    assert (details["team"], details["cap"], details["by"]) == ("ivig", 8, "system:assign")


def test_caps_hold_and_a_persons_own_cap_wins(app, table):
    add_user(app, "ann", ["benefits"], cap=2)
    ben = add_user(app, "ben", ["benefits"])
    requests = add_requests(app, "benefits", 20)

    for request_id in requests:
        assign(app, request_id, record_unassigned=True)

    assert open_counts(app) == {"ann": 2, "ben": 8}
    pooled = events(app, "request.left_in_pool")
    assert len(pooled) == 10
    assert pooled[0][2]["reason"] == "nobody eligible: 2 at their cap"

    # Ben completes one: the backfill queued with it gives him the oldest waiting request.
    with app.app_context():
        reference = db.session.get(Request, requests[1]).reference
        actor = casework.Actor(ben, "ben", "staff", ("benefits",))
        now = utcnow()
        casework.change_status(db.session, reference, actor, "in_progress", now)
        casework.change_status(db.session, reference, actor, "completed", now)
        [backfill] = db.session.execute(
            sa.select(OutboxMessage).where(OutboxMessage.task == assignment.BACKFILL_TASK)
        ).scalars()
        assert (backfill.user_id, backfill.status) == (ben, "pending")
        outbox_id = backfill.id
    run_backfill(app, ben, outbox_id)

    assert assignee_of(app, requests[10]) == "ben"
    assert open_counts(app) == {"ann": 2, "ben": 8}


def run_backfill(app, user_id, outbox_id=None) -> int:
    from workers.tasks import backfill_assignments

    with app.app_context():
        given = backfill_assignments.run(str(user_id), outbox_id=outbox_id)
        if outbox_id is not None:
            assert db.session.get(OutboxMessage, outbox_id).status == "done"
        return given


def test_someone_away_gets_nothing_and_is_backfilled_when_back(app, table):
    clock = install_clock(app)
    add_user(app, "ann", ["general"], cap=3)
    ben = create_staff_user(app, "ben", teams=("general",))
    ben_id = ben.id
    staff = StaffClient(app.test_client(), ben)
    login(staff.client, ben, clock)

    page = staff.get("/staff/queue").get_data(as_text=True)
    assert "Mark me away" in page
    answer = staff.post("/staff/away", {"away": "1", "next": "/staff/queue"})
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/staff/queue")
    page = staff.get("/staff/queue").get_data(as_text=True)
    assert "I&#39;m back" in page or "I'm back" in page
    assert "automatic assignment gives you no new requests" in page

    requests = add_requests(app, "general", 6)
    assert [assign(app, r).assignee for r in requests] == ["ann", "ann", "ann", None, None, None]

    staff.post("/staff/away", {"away": "0", "next": "/staff/queue"})
    with app.app_context():
        [backfill] = db.session.execute(
            sa.select(OutboxMessage.id).where(
                OutboxMessage.task == assignment.BACKFILL_TASK, OutboxMessage.user_id == ben_id
            )
        ).scalars()
    assert run_backfill(app, ben_id, backfill) == 3
    assert [assignee_of(app, r) for r in requests] == ["ann"] * 3 + ["ben"] * 3
    changes = [d for _, _, d in events(app, "user.changed") if d.get("change") == "away"]
    assert [d["away"] for d in changes] == [True, False]
    backfilled = events(app, "request.assigned")[-1][2]
    assert backfilled["trigger"] == "backfill (freed up)"


def test_a_released_request_is_not_handed_straight_back(app, table):
    ann = add_user(app, "ann", ["general"])
    add_user(app, "ben", ["general"])
    [request_id] = add_requests(app, "general", 1)
    assert assign(app, request_id).assignee == "ann"
    with app.app_context():
        reference = db.session.get(Request, request_id).reference
        casework.release(
            db.session, reference, casework.Actor(ann, "ann", "staff", ("general",)), utcnow()
        )
    assert run_backfill(app, ann) == 0
    with app.app_context():
        assignment.sweep(db.session, app.extensions["intake.routing"], utcnow())
    assert assignee_of(app, request_id) == "ben"


def test_a_claim_nobody_started_times_out_back_to_the_pool_and_on(app, table):
    add_user(app, "nurse1", ["ivig"], skills=("ivig",))
    add_user(app, "nurse2", ["ivig"], skills=("ivig",))
    untouched, started = add_requests(app, "ivig", 2)
    start = utcnow()
    assert assign(app, untouched, start).assignee == "nurse1"
    assert assign(app, started, start).assignee == "nurse2"
    with app.app_context():
        db.session.get(Request, started).status = "in_progress"
        db.session.commit()

    def sweep(minutes):
        with app.app_context():
            return assignment.sweep(
                db.session, app.extensions["intake.routing"], start + timedelta(minutes=minutes)
            )

    assert sweep(29) == assignment.SweepReport(released=0, assigned=0)
    assert sweep(31) == assignment.SweepReport(released=1, assigned=1)

    assert assignee_of(app, untouched) == "nurse2" and assignee_of(app, started) == "nurse2"
    [(actor, _, released)] = events(app, "request.released")
    assert actor == "system:assign" and released["by"] == "system:assign"
    assert "claim timeout: not started within 30 minutes" in released["reason"]
    assert events(app, "request.assigned")[-1][2]["trigger"] == "claim timeout"


def test_a_team_with_assignment_off_is_left_alone(app, table):
    add_user(app, "ann", ["manual"])
    [request_id] = add_requests(app, "manual", 1)
    assert assign(app, request_id).assignee is None
    with app.app_context():
        assignment.sweep(db.session, app.extensions["intake.routing"], utcnow())
    assert assignee_of(app, request_id) is None and events(app, "request.left_in_pool") == []


# -- the route task ---------------------------------------------------------------------------


def test_the_route_task_assigns_a_submitted_request(app, table, patient):
    from workers.tasks import route_request

    add_user(app, "ann", ["benefits"])
    with_someone = reference_from(patient.contact(topic="copay"))
    nobody = reference_from(patient.contact(topic="specialist"))
    for reference in (with_someone, nobody):
        with app.app_context():
            request_id = db.session.execute(
                sa.select(Request.id).where(Request.reference == reference)
            ).scalar_one()
            route_request.run(request_id)

    [(_, reference, details)] = events(app, "request.assigned")
    assert (reference, details["assignee"], details["trigger"]) == (with_someone, "ann", "routed")
    [(_, reference, details)] = events(app, "request.left_in_pool")
    assert reference == nobody
    assert details["reason"] == "nobody eligible: IVIG clinical team has no working members"


# -- two workers at once ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"])
def test_workers_assigning_at_once_never_double_assign_or_pass_a_cap(app, table):
    """Eight threads, each with its own connection, race over the same 90 requests of two
    teams that share one person."""
    add_user(app, "gen1", ["general"], cap=10)
    add_user(app, "gen2", ["general"], cap=10)
    add_user(app, "shared", ["general", "benefits"], cap=5)
    add_user(app, "ben1", ["benefits"], cap=6)
    requests = add_requests(app, "general", 60) + add_requests(app, "benefits", 30)
    threads, errors, outcomes = [], [], []
    barrier = threading.Barrier(8)

    def work(seed):
        order = requests[:]
        random.Random(seed).shuffle(order)
        try:
            with app.app_context():
                db.session.execute(sa.text("SELECT 1"))
                db.session.rollback()
                barrier.wait()
                for request_id in order:
                    outcome = assignment.assign_request(
                        db.session, app.extensions["intake.routing"], request_id, utcnow()
                    )
                    if outcome.assignee:
                        outcomes.append((request_id, outcome.assignee))
                db.session.remove()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    for seed in range(8):
        threads.append(threading.Thread(target=work, args=(seed,)))
        threads[-1].start()
    for thread in threads:
        thread.join(120)

    assert errors == []
    given = Counter(request_id for request_id, _ in outcomes)
    assert given and max(given.values()) == 1, "a request was given twice"
    assert open_counts(app) == {"gen1": 10, "gen2": 10, "shared": 5, "ben1": 6}
    audited = Counter(reference for _, reference, _ in events(app, "request.assigned"))
    assert len(audited) == 31 and set(audited.values()) == {1}


# -- settings and commands ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('assignment = "round_robin"', "has assignment 'fifo'"),
        ("cap = 8", "'cap' must be a whole number from 1 to 500"),
        ('skills = ["ivig"]', "'skills' must be a list of names"),
        ("claim_timeout_minutes = 30", "'claim_timeout_minutes' must be a whole number"),
    ],
)
def test_the_routing_file_refuses_bad_assignment_settings(tmp_path, change, message):
    bad = {
        'assignment = "round_robin"': 'assignment = "fifo"',
        "cap = 8": "cap = 0",
        'skills = ["ivig"]': 'skills = ["IVIG nurses"]',
        "claim_timeout_minutes = 30": 'claim_timeout_minutes = "half an hour"',
    }[change]
    path = tmp_path / "routing.toml"
    path.write_text(ROUTING.format(strategy="off").replace(change, bad, 1))
    with pytest.raises(RoutingError) as raised:
        load_routing(path)
    assert f"{path}:2: team 'ivig'" in str(raised.value) and message in str(raised.value)


def test_the_sample_file_assigns_patient_services_only():
    table = load_routing()
    assert {t.id: t.assignment for t in table.teams.values() if t.assigns} == {
        "patient-services": "least_loaded"
    }


def test_admin_commands_set_skills_caps_and_away(app, table, runner):
    clerk = add_user(app, "clerk", ["ivig"])
    [waiting] = add_requests(app, "ivig", 1)
    assert assign(app, waiting).assignee is None

    refused = runner.invoke(args=["users", "set-skills", "clerk", "juggling"])
    assert refused.exit_code != 0 and "unknown skill 'juggling'" in refused.output
    done = runner.invoke(args=["users", "set-skills", "clerk", "ivig"])
    assert done.exit_code == 0 and "'clerk' holds: ivig" in done.output
    # The new skill queued a backfill for the clerk.
    with app.app_context():
        [backfill] = db.session.execute(
            sa.select(OutboxMessage.id).where(OutboxMessage.user_id == clerk)
        ).scalars()
    assert run_backfill(app, clerk, backfill) == 1

    assert runner.invoke(args=["users", "set-cap", "clerk", "3"]).exit_code == 0
    assert runner.invoke(args=["users", "set-away", "clerk"]).exit_code == 0
    shown = runner.invoke(args=["users", "assignment", "clerk", "--json"])
    facts = json.loads(shown.output)
    assert facts == {
        "username": "clerk",
        "languages": ["en"],
        "skills": ["ivig"],
        "cap": 3,
        "away": True,
        "open": 1,
        "teams": {"ivig": "round_robin"},
    }
    back = runner.invoke(args=["users", "set-away", "clerk", "--back"])
    assert back.exit_code == 0 and "'clerk' is available" in back.output
    with app.app_context():
        assert db.session.get(User, clerk).away_since is None
