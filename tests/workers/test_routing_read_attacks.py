"""Attacks on routing's unlocked first read (``intake.extensions.reading``, an autocommit
connection) and on a batch's speaker choices counted in memory (one UPDATE for the batch).

Both databases. What a user would notice: a request routed twice (two ``request.routed``
events, two team notices), a batch half written after it failed, a routing that said it was
done but saved nothing, or a Spanish request given to another speaker, or with another "N open
before this one", than routing the same requests one at a time would give.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

from intake import extensions
from intake.accounts import services as accounts
from intake.clock import utcnow
from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request, User
from intake.requests import routing
from tests.conftest import Patient, fresh_database, reference_from
from tests.intake.staff.conftest import PASSWORD, create_teams
from tests.workers.test_tasks import settings

__all__ = ["settings"]  # no broker (the tasks are run here by hand), e-mail routing rules


# --- helpers ------------------------------------------------------------------------------


def submitted(app, patient, count: int, **fields: Any) -> list[str]:
    """``count`` contact requests (copay, English unless ``lang``), oldest first: their ids."""
    ids = []
    for _ in range(count):
        reference = reference_from(patient.contact(**{"topic": "copay", **fields}))
        ids.append(request_id_of(app, reference))
    return ids


def request_id_of(app, reference: str) -> str:
    with app.app_context():
        return db.session.execute(
            sa.select(Request.id).where(Request.reference == reference)
        ).scalar_one()


def statuses(app, ids: list[str]) -> list[str]:
    with app.app_context():
        found = dict(
            db.session.execute(
                sa.select(Request.id, Request.status).where(Request.id.in_(ids))
            ).all()
        )
    return [found[i] for i in ids]


def routed_events(app) -> Counter[str]:
    """request.routed events per request id."""
    with app.app_context():
        return Counter(
            db.session.execute(
                sa.select(Request.id)
                .join(AuditEvent, AuditEvent.reference == Request.reference)
                .where(AuditEvent.action == "request.routed")
            ).scalars()
        )


def outbox_rows(app, task: str) -> Counter[tuple[str, str]]:
    """(request id, status) of the outbox rows of ``task``, counted."""
    with app.app_context():
        return Counter(
            db.session.execute(
                sa.select(OutboxMessage.request_id, OutboxMessage.status).where(
                    OutboxMessage.task == task
                )
            ).all()
        )


@contextlib.contextmanager
def one_connection_pool(app) -> Iterator[sa.Engine]:
    """The app's engine replaced by one whose pool holds a single connection (no overflow), so
    every checkout gets the connection the previous one returned."""
    with app.app_context():
        old = db.engine
        engine = sa.create_engine(old.url, pool_size=1, max_overflow=0, pool_timeout=10)
        db._app_engines[app][None] = engine
        old.dispose()
    try:
        yield engine
    finally:
        engine.dispose()


def checkouts(engine: sa.Engine) -> list[int]:
    """ids of the DBAPI connections handed out by ``engine``'s pool, in order (a live list)."""
    seen: list[int] = []
    sa.event.listen(engine, "checkout", lambda dbapi, _rec, _proxy: seen.append(id(dbapi)))
    return seen


@contextlib.contextmanager
def after_unlocked_read(monkeypatch, action) -> Iterator[None]:
    """Run ``action()`` once, right after the first unlocked read of ``route_received`` (its
    connection returned), before its locked read in the session transaction."""
    real = extensions.reading
    done = threading.Event()

    @contextlib.contextmanager
    def reading(session):
        with real(session) as connection:
            yield connection
        if not done.is_set():
            done.set()
            action()

    monkeypatch.setattr(extensions, "reading", reading)
    yield
    assert done.is_set(), "the unlocked read never ran"


def in_thread(target, *args: Any, **kwargs: Any) -> Any:
    """``target(*args, **kwargs)`` in another thread, with its own app context: its result."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = target(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed back to the caller
            out["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the other thread hung"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def route_in_app(app, request_id: str, **options: Any) -> list[routing.Routed]:
    with app.app_context():
        table = app.extensions["intake.routing"]
        return routing.route_received(db.session, table, request_id, utcnow(), **options)


# --- 1. the autocommit connection goes back to the pool clean ------------------------------


def test_a_batch_failing_after_a_skip_on_the_same_pooled_connection_leaves_nothing_written(
    app, patient, monkeypatch, backend
):
    """The skip path reads on a pooled connection switched to autocommit. The next session
    transaction on that same connection (a pool of one) must be a real transaction again: a
    batch that fails after its UPDATE, its outbox rows and its notices were written leaves no
    request "queued" without its event, no notice, no routing row closed."""
    from workers.tasks import route_request

    with one_connection_pool(app) as engine:
        first, *waiting = submitted(app, patient, 4)
        route_in_app(app, first, batch=1)
        seen = checkouts(engine)
        with app.app_context(), capture_logs() as logs:
            route_request.run(first)  # routed already: the unlocked read alone
        assert [line["event"] for line in logs if line["event"].startswith("route")] == [
            "route_skipped"
        ]
        assert len(seen) == 1, "the skip wrote in the session"

        def no_events(*_args: Any, **_kwargs: Any) -> None:
            raise RuntimeError("the audit chain is unavailable")

        # Last step of a batch: everything else of the batch is written by then.
        monkeypatch.setattr("intake.audit.chain.record_events", no_events)
        with app.app_context(), pytest.raises(RuntimeError, match="audit chain"):
            route_request.run(waiting[0])
        assert len(set(seen)) == 1 and len(seen) >= 2, "not the skip's pooled connection"

    assert statuses(app, [first, *waiting]) == ["queued", "received", "received", "received"]
    assert routed_events(app) == Counter({first: 1})
    assert outbox_rows(app, "notify_team") == Counter({(first, "pending"): 1})
    assert outbox_rows(app, "route_request") == Counter(
        {(first, "done"): 1, **{(i, "pending"): 1 for i in waiting}}
    )
    # And once the cause is gone, the same task routes them all, each once.
    monkeypatch.undo()
    with app.app_context():
        route_request.run(waiting[0])
    assert routed_events(app) == Counter({i: 1 for i in [first, *waiting]})


@pytest.mark.parametrize("backend", ["sqlite"])
def test_after_a_skip_the_pooled_connection_still_takes_the_write_lock_up_front(
    app, patient, database_url
):
    """SQLite: the skip's connection goes back to the pool as it came: the driver still opens
    no transaction of its own (SQLAlchemy's AUTOCOMMIT level, reset on check-in, had set it
    back to its own, ``isolation_level`` ""), and a session transaction on that connection
    still begins with BEGIN IMMEDIATE, so it cannot die upgrading a read lock to the write
    lock."""
    from workers.tasks import route_request

    with one_connection_pool(app):
        [first] = submitted(app, patient, 1)
        route_in_app(app, first, batch=1)
        with app.app_context():
            route_request.run(first)  # the skip
            db.session.execute(sa.select(Request.id)).all()  # a read, in a session transaction
            assert db.session.connection().connection.dbapi_connection.isolation_level is None
            other = sqlite3.connect(sa.make_url(database_url).database, timeout=0.2)
            try:
                other.isolation_level = None
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            finally:
                other.close()
            db.session.rollback()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_after_a_skip_the_pooled_connection_is_transactional_again(app, patient):
    """PostgreSQL: the connection the skip read on in autocommit comes back from the pool in a
    transaction at the default isolation level: what the session writes is not visible to
    others before its commit, and a rollback undoes it."""
    from workers.tasks import route_request

    with one_connection_pool(app) as engine:
        [first] = submitted(app, patient, 1)
        route_in_app(app, first, batch=1)
        with app.app_context():
            route_request.run(first)  # the skip
            assert db.session.connection().connection.dbapi_connection.autocommit is False
            assert db.session.execute(sa.text("SHOW transaction_isolation")).scalar() == (
                "read committed"
            )
            db.session.execute(sa.update(Request).values(status="cancelled"))
            db.session.rollback()
        assert engine.pool.checkedout() == 0
    assert statuses(app, [first]) == ["queued"]


# --- 2. races around the unlocked read ----------------------------------------------------


def test_a_request_routed_between_the_unlocked_read_and_the_lock_is_routed_once(
    app, patient, monkeypatch
):
    """Another task's batch routes the request after this task's unlocked read found it
    "received": the locked read sees it routed, so one event and one notice, nothing else."""
    ids = submitted(app, patient, 3)
    with after_unlocked_read(monkeypatch, lambda: in_thread(route_in_app, app, ids[0], batch=1)):
        assert route_in_app(app, ids[0]) == []
    assert routed_events(app) == Counter({ids[0]: 1})
    assert outbox_rows(app, "notify_team") == Counter({(ids[0], "pending"): 1})
    assert outbox_rows(app, "route_request")[(ids[0], "done")] == 1
    # The other two were left for their own tasks, which route them.
    assert statuses(app, ids) == ["queued", "received", "received"]


def test_a_request_cancelled_between_the_unlocked_read_and_the_lock_is_not_routed(
    app, patient, monkeypatch
):
    """Cancelled after the unlocked read found it "received": not routed, no notice, and its
    routing row closed so that the sweep stops publishing it."""
    [rid] = submitted(app, patient, 1)

    def cancel() -> None:
        def run() -> None:
            with app.app_context():
                db.session.execute(
                    sa.update(Request).where(Request.id == rid).values(status="cancelled")
                )
                db.session.commit()

        in_thread(run)

    with after_unlocked_read(monkeypatch, cancel):
        assert route_in_app(app, rid) == []
    assert statuses(app, [rid]) == ["cancelled"]
    assert routed_events(app) == Counter()
    assert outbox_rows(app, "notify_team") == Counter()
    assert outbox_rows(app, "route_request") == Counter({(rid, "done"): 1})


def test_a_routing_row_reopened_after_the_routing_is_closed_without_a_second_routing(app, patient):
    """The routing row of a routed request is open again (a delivery that came back, a claim
    that lapsed): its task closes it from the unlocked read's answer, and routes nothing."""
    from workers.tasks import route_request

    [rid] = submitted(app, patient, 1)
    route_in_app(app, rid)
    with app.app_context():
        db.session.execute(
            sa.update(OutboxMessage)
            .where(OutboxMessage.request_id == rid, OutboxMessage.task == "route_request")
            .values(status="sending")
        )
        db.session.commit()
        route_request.run(rid)
    assert outbox_rows(app, "route_request") == Counter({(rid, "done"): 1})
    assert routed_events(app) == Counter({rid: 1})
    assert outbox_rows(app, "notify_team") == Counter({(rid, "pending"): 1})


def test_two_tasks_for_one_request_at_once_route_it_once(app, patient, monkeypatch):
    """Two deliveries of one request's task, in two threads, both past the unlocked read
    before either locks: one routes it (and the others waiting), the other changes nothing."""
    ids = submitted(app, patient, 3)
    both_read = threading.Barrier(2, timeout=20)
    real = extensions.reading

    @contextlib.contextmanager
    def reading(session):
        with real(session) as connection:
            yield connection
        both_read.wait()

    monkeypatch.setattr(extensions, "reading", reading)
    results: list[Any] = [None, None]

    def task(slot: int) -> None:
        try:
            results[slot] = route_in_app(app, ids[0])
        except BaseException as error:  # noqa: BLE001 - checked below
            results[slot] = error

    threads = [threading.Thread(target=task, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert not any(isinstance(result, BaseException) for result in results), results
    assert sorted(len(result) for result in results) == [0, 3]
    assert routed_events(app) == Counter({i: 1 for i in ids})
    assert outbox_rows(app, "notify_team") == Counter({(i, "pending"): 1 for i in ids})
    assert outbox_rows(app, "route_request") == Counter({(i, "done"): 1 for i in ids})


# --- 3. a session bound to one connection --------------------------------------------------


def test_a_session_bound_to_one_connection_keeps_what_routing_commits(app, patient):
    [rid] = submitted(app, patient, 1)
    with app.app_context():
        engine = sa.create_engine(db.engine.url)
        table = app.extensions["intake.routing"]
    try:
        with app.app_context(), engine.connect() as connection:
            session = Session(bind=connection)
            routed = routing.route_received(session, table, rid, utcnow())
            session.close()
        assert [r.request_id for r in routed] == [rid]  # said routed, its notice to publish
    finally:
        engine.dispose()
    assert statuses(app, [rid]) == ["queued"]
    assert routed_events(app) == Counter({rid: 1})


# --- 4. speakers chosen in a batch as one at a time ---------------------------------------


@pytest.fixture
def second_database_url(backend, request, tmp_path) -> Iterator[str]:
    """Another fresh, migrated, empty database of the same backend."""
    with fresh_database(backend, request, tmp_path, "second") as url:
        yield url


# (username, teams, languages, open requests before, state)
STAFF = [
    ("ana", ["benefits"], ["es", "en"], 0, "disabled"),
    ("bea", ["benefits"], ["es", "en"], 0, "away"),
    ("ben", ["benefits"], ["en"], 0, None),
    # In an assigning team too, and speaks Vietnamese: the Vietnamese request routed to
    # patient services names her as its speaker, but the team gives it out itself later.
    ("lucia", ["benefits", "patient-services"], ["es", "vi", "en"], 2, None),
    ("pilar", ["benefits"], ["en", "es"], 0, None),
    ("sol", ["benefits"], ["es"], 1, None),
    ("rosa", ["ivig", "benefits"], ["es", "en"], 1, None),
    ("tuan", ["patient-services"], ["vi", "en"], 0, None),
]
# The requests routed, oldest first: (form, page language, fields).
ROUTED = [
    ("contact", "es", {"topic": "copay"}),
    ("contact", "es", {"topic": "specialist"}),
    ("contact", "es", {"topic": "copay"}),
    ("contact", "en", {"topic": "question", "interpreter": "y", "interpreter_language": "vi"}),
    ("contact", "es", {"topic": "insurance"}),
    ("contact", "en", {"topic": "copay"}),
    ("contact", "es", {"topic": "copay"}),
    ("contact", "es", {"topic": "side_effect"}),
    ("contact", "es", {"topic": "specialist"}),
    ("contact", "es", {"topic": "copay"}),
    ("refill", "es", {"location": "main"}),
    ("contact", "es", {"topic": "copay"}),
    ("contact", "es", {"topic": "insurance"}),
]


def staffed(app, patient) -> list[str]:
    """The staff above, their open requests, then the requests of ROUTED submitted (ids)."""
    create_teams(app)
    now = utcnow()
    with app.app_context():
        keyring = app.extensions["intake.keyring"]
        for username, teams, languages, _load, state in STAFF:
            accounts.create_user(
                db.session,
                keyring,
                username=username,
                password=PASSWORD,
                role="staff",
                teams=teams,
                actor="system:test",
                languages=languages,
            )
            db.session.commit()
            if state == "disabled":
                accounts.disable_user(db.session, username, "system:test", now)
            elif state == "away":
                db.session.execute(
                    sa.update(User).where(User.username == username).values(away_since=now)
                )
            db.session.commit()
    # Their open work: English copay requests routed to benefits, then given to them.
    load = [username for username, *_rest, count, _s in STAFF for _ in range(count)]
    earlier = submitted(app, patient, len(load), lang="en")
    route_in_app(app, earlier[0])
    assert statuses(app, earlier) == ["queued"] * len(earlier)
    with app.app_context():
        users = dict(db.session.execute(sa.select(User.username, User.id)).all())
        for request_id, username in zip(earlier, load, strict=True):
            db.session.execute(
                sa.update(Request)
                .where(Request.id == request_id)
                .values(assignee_id=users[username], claimed_at=now)
            )
        db.session.commit()
    ids = []
    for form, lang, fields in ROUTED:
        reference = reference_from(getattr(patient, form)(lang=lang, **fields))
        ids.append(request_id_of(app, reference))
    return ids


def outcomes(app, ids: list[str]) -> list[dict[str, Any]]:
    """Each request's team, assignee and its routed event's details, in ``ids``' order."""
    with app.app_context():
        rows = {
            row.id: row
            for row in db.session.execute(
                sa.select(Request.id, Request.reference, Request.team, User.username)
                .outerjoin(User, User.id == Request.assignee_id)
                .where(Request.id.in_(ids))
            )
        }
        details = dict(
            db.session.execute(
                sa.select(AuditEvent.reference, AuditEvent.details).where(
                    AuditEvent.action == "request.routed"
                )
            ).all()
        )
    return [
        {
            "team": rows[i].team,
            "assignee": rows[i].username,
            "details": json.loads(details[rows[i].reference]),
        }
        for i in ids
    ]


def test_a_batch_gives_speakers_what_routing_one_at_a_time_gives(
    app, patient, make_app, settings, second_database_url, tmp_path
):
    """Speakers at different loads, one disabled, one away, one English only, a speaker also
    in a team that assigns by itself, a fallback team: routed in one batch, every request goes
    to the team and member, with the "N open before this one", that routing the same requests
    one per transaction (batch of 1) gives in a second database."""
    one_by_one = make_app(
        settings.replace(database_url=second_database_url, data_dir=tmp_path / "data-2")
    )
    one_by_one.config["TESTING"] = True
    batched_ids = staffed(app, patient)
    single_ids = staffed(one_by_one, Patient(one_by_one.test_client()))
    now = utcnow() + timedelta(minutes=1)
    with app.app_context():
        table = app.extensions["intake.routing"]
        batch = routing.route_received(db.session, table, batched_ids[0], now)
    assert [r.request_id for r in batch] == batched_ids  # one batch, oldest first
    with one_by_one.app_context():
        table = one_by_one.extensions["intake.routing"]
        for request_id in single_ids:
            assert routing.route_request(db.session, table, request_id, now) is not None
    batched = outcomes(app, batched_ids)
    single = outcomes(one_by_one, single_ids)
    assert batched == single
    # The case is worth having: several speakers were chosen, at several loads, and nobody
    # disabled, away or without Spanish was given anything.
    given = [o["assignee"] for o in batched if o["assignee"]]
    assert len(set(given)) >= 3 and not {"ana", "bea", "ben", "tuan"} & set(given)
    reasons = {o["details"].get("assignment_reason") for o in batched} - {None}
    assert len({reason.split(", ")[1] for reason in reasons}) >= 3
    # The Vietnamese request is left to patient services' own assignment, and not counted
    # as lucia's.
    vietnamese = batched[3]
    assert vietnamese["team"] == "patient-services" and vietnamese["assignee"] is None
    assert vietnamese["details"]["assignment"] == "least_loaded"
