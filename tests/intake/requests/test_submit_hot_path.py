"""The submission's hot path: one transaction, then the routing task straight to the broker.

What a patient notices when this breaks is a slow "thank you" page under load (issue 14) or,
worse, a request that never reaches the pharmacy; these tests hold both sides.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event, func, select

from intake.extensions import db
from intake.models import OutboxMessage, Request
from intake.requests import outbox, submit
from tests.conftest import reference_from


def _watch(app: Any) -> list[tuple[str, Any]]:
    """Every statement the app's engine runs, every commit, and every publish, in order."""
    seen: list[tuple[str, Any]] = []
    with app.app_context():
        engine = db.engine

    def statement(_conn: Any, _cursor: Any, sql: str, *_rest: Any) -> None:
        seen.append(("sql", sql))

    def commit(_conn: Any) -> None:
        seen.append(("commit", None))

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    app.extensions["intake.publisher"] = lambda task, subject, outbox_id, _attempt: seen.append(
        ("publish", (task, subject, outbox_id))
    )
    return seen


def test_an_accepted_refill_is_published_without_another_query(app, patient):
    seen = _watch(app)
    _page, hidden = patient.get_form("refill")
    seen.clear()
    from tests.conftest import valid_refill

    response = patient.client.post("/refill", data={**hidden, **valid_refill()})
    reference = reference_from(response)

    kinds = [kind for kind, _ in seen]
    assert kinds.count("commit") == 1 and kinds.count("publish") == 1
    # Published after the commit, and nothing read or written again to publish it.
    assert kinds.index("publish") > kinds.index("commit")
    assert kinds[kinds.index("commit") :] == ["commit", "publish"]
    # No look-up of the reference before the insert: the unique index decides.
    assert not [s for k, s in seen if k == "sql" and "WHERE requests.reference" in s]
    with app.app_context():
        row = db.session.execute(
            select(OutboxMessage).join(Request, Request.id == OutboxMessage.request_id)
            .where(Request.reference == reference)
        ).scalar_one()  # fmt: skip
        assert (row.task, row.status, row.attempts) == ("route_request", "pending", 1)
        assert row.published_at is not None
        [(_kind, (task, subject, outbox_id))] = [x for x in seen if x[0] == "publish"]
        assert (task, subject, outbox_id) == ("route_request", row.request_id, row.id)


def test_a_refused_publish_leaves_the_request_for_the_next_sweep(app, patient):
    def broker_down(task: str, subject: str, outbox_id: int, attempt: int) -> None:
        raise ConnectionError("broker down")

    app.extensions["intake.publisher"] = broker_down
    reference = reference_from(patient.refill())  # the patient is thanked all the same
    with app.app_context():
        row = db.session.execute(select(OutboxMessage)).scalar_one()
        # Marked unpublished at once, so the sweep does not wait out the republish delay.
        assert (row.published_at, row.attempts, row.status) == (None, 0, "pending")

        published: list[tuple[str, int, int]] = []
        app.extensions["intake.publisher"] = lambda task, subject, oid, attempt: published.append(
            (task, oid, attempt)
        )
        assert outbox.sweep(db.session) == 1
        # The row's first publish to reach the broker: the id a routing batch may revoke.
        assert published == [("route_request", row.id, 1)]
        request = db.session.execute(
            select(Request).where(Request.reference == reference)
        ).scalar_one()
        assert request.id == row.request_id


def test_without_a_broker_the_row_waits_for_the_sweep(app, patient):
    app.extensions["intake.publisher"] = None
    reference_from(patient.refill())
    with app.app_context():
        row = db.session.execute(select(OutboxMessage)).scalar_one()
        assert row.published_at is None and row.status == "pending"


def test_a_row_published_by_a_process_that_died_is_swept_after_the_delay(app, patient):
    # The web process committed and published (or died before publishing): the row says
    # published; if no worker marks it done within the delay, the sweep publishes it again.
    published: list[tuple[int, int]] = []
    app.extensions["intake.publisher"] = lambda task, subject, oid, attempt: published.append(
        (oid, attempt)
    )
    reference_from(patient.refill())
    with app.app_context():
        assert outbox.sweep(db.session) == 0  # too soon: the first publish is still fresh
        assert outbox.sweep(db.session, republish_after=0) == 1
    # The same row, published again as its second attempt (under an id no batch revokes).
    assert len(published) == 2 and published[0][0] == published[1][0]
    assert [attempt for _oid, attempt in published] == [1, 2]


def test_a_reference_drawn_twice_is_drawn_again(app, patient, monkeypatch):
    first = reference_from(patient.refill())
    drawn = iter([first])
    original = submit.new_reference

    def draw(kind: str) -> str:
        return next(drawn, None) or original(kind)

    monkeypatch.setattr(submit, "new_reference", draw)
    second = reference_from(patient.refill(first_name="Ana"))
    assert second != first
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Request)) == 2
        assert db.session.scalar(select(func.count()).select_from(OutboxMessage)) == 2


@pytest.mark.parametrize("failures", [1, 2])
def test_the_unique_index_alone_keeps_references_distinct(app, patient, monkeypatch, failures):
    # The same reference drawn up to twice more: still one request per reference, none lost.
    first = reference_from(patient.refill())
    drawn = iter([first] * failures)
    original = submit.new_reference
    monkeypatch.setattr(submit, "new_reference", lambda kind: next(drawn, None) or original(kind))
    reference_from(patient.refill(first_name="Ana"))
    with app.app_context():
        counts = db.session.execute(
            sa.select(Request.reference, func.count()).group_by(Request.reference)
        ).all()
        assert len(counts) == 2 and all(n == 1 for _ref, n in counts)
