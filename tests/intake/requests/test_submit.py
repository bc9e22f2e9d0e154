"""A submission is one transaction: request, consents, outbox row and audit event together."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from intake.audit.chain import verify_chain
from intake.extensions import db
from intake.models import AuditEvent, ConsentAcceptance, OutboxMessage, Request
from intake.requests.consents import current_consent
from intake.requests.references import REFERENCE_RE, normalize_reference
from tests.conftest import reference_from


def test_refill_is_stored_sealed_with_its_consents_outbox_and_audit_event(app, patient):
    reference = reference_from(patient.refill(lang="es"))
    assert REFERENCE_RE.match(reference)
    with app.app_context():
        row = db.session.execute(select(Request).where(Request.reference == reference)).scalar_one()
        assert (row.kind, row.location, row.language, row.status) == (
            "refill",
            "main",
            "es",
            "received",
        )
        assert row.kek_id == "k1" and row.wrapped_key and row.phone_index and row.name_dob_index
        assert b"Maria" not in row.phi

        consents = (
            db.session.execute(
                select(ConsentAcceptance).where(ConsentAcceptance.request_id == row.id)
            )
            .scalars()
            .all()
        )
        # The Terms of Use, Privacy Policy and NPP behind consent_privacy, and the contact consent.
        assert {(c.document, c.version, c.language) for c in consents} == {
            ("terms", "2026-12", "es"),
            ("privacy", "2026-12", "es"),
            ("npp", "2026-12", "es"),
            ("contact", "2026-11", "es"),
        }
        for consent in consents:
            assert consent.sha256 == current_consent(consent.document, "es").sha256

        outbox = db.session.execute(select(OutboxMessage)).scalars().all()
        assert [(o.request_id, o.task, o.status) for o in outbox] == [
            (row.id, "route_request", "pending")
        ]

        events = db.session.execute(select(AuditEvent)).scalars().all()
        assert [(e.action, e.actor, e.reference) for e in events] == [
            ("request.submitted", "patient", reference)
        ]
        details = json.loads(events[0].details)
        assert details["kind"] == "refill" and details["language"] == "es"
        assert events[0].ip_hmac and "127.0.0.1" not in events[0].ip_hmac
        assert verify_chain(db.session).ok


def test_thanks_page_shows_the_reference_and_no_phi(client, patient):
    response = patient.refill(first_name="Wilhelmina", medication="Privigen")
    page = client.get(response.headers["Location"])
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and reference_from(response) in html
    assert "Wilhelmina" not in html and "Privigen" not in html
    assert page.headers["Cache-Control"] == "no-store"


def test_thanks_page_for_a_malformed_reference_is_404(client):
    assert client.get("/thanks/not-a-reference").status_code == 404
    assert client.get("/thanks/R-IIII-OOOO").status_code == 404


def test_a_failing_audit_write_leaves_nothing_behind(app, patient, monkeypatch):
    import intake.requests.submit as submissions

    def broken(*_args, **_kwargs):
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr(submissions, "record_event", broken)
    response = patient.refill()
    assert response.status_code == 500
    with app.app_context():
        for model in (Request, ConsentAcceptance, OutboxMessage, AuditEvent):
            assert db.session.execute(select(model)).first() is None


def test_many_submissions_get_distinct_references(app, patient):
    references = {reference_from(patient.contact()) for _ in range(25)}
    assert len(references) == 25


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("r 7k3m q9p2", "R-7K3M-Q9P2"),
        ("R-7K3M-Q9PZ", "R-7K3M-Q9PZ"),
        ("c-1l0o-aaaa", "C-1100-AAAA"),
        ("R-7K3M", None),
        ("X-7K3M-Q9P2", None),
        ("", None),
    ],
)
def test_references_are_read_as_patients_type_them(typed, expected):
    assert normalize_reference(typed) == expected


def test_a_second_submission_with_the_same_key_stores_nothing_and_names_the_first(app):
    """The race's loser: it passed no check, the unique index stops it, it finds the winner."""
    from intake.requests.submit import Submission, submit_request

    with app.app_context():
        keyring = app.extensions["intake.keyring"]

        def submit(first_name: str):
            return submit_request(
                db.session,
                keyring,
                Submission(
                    kind="refill",
                    language="en",
                    phi={"first_name": first_name, "last_name": "Lopez", "phone": "+12025550143"},
                    consents=[current_consent("privacy", "en")],
                    location="main",
                    submission_key="the-same-form-key",
                ),
            )

        first = submit("Ana")
        second = submit("Ana")
        assert not first.duplicate and first.outbox_id is not None
        assert second.duplicate and second.outbox_id is None
        assert (second.request_id, second.reference) == (first.request_id, first.reference)
        assert db.session.scalar(select(func.count()).select_from(Request)) == 1
        assert db.session.scalar(select(func.count()).select_from(OutboxMessage)) == 1
        assert verify_chain(db.session).ok


def test_the_database_refuses_two_requests_with_one_submission_key(app):
    import sqlalchemy as sa

    insert = sa.text(
        "INSERT INTO requests (id, reference, kind, language, status, priority, priority_rank,"
        " created_at, updated_at, phi_encrypted, submission_key_index) VALUES (:id, :ref,"
        " 'refill', 'en', 'received', 'normal', 2, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :phi,"
        " :key)"
    )
    with app.app_context():
        with db.engine.begin() as conn:
            conn.execute(insert, {"id": "r1", "ref": "R-0000-0001", "phi": b"x", "key": "k" * 64})
        with pytest.raises(sa.exc.IntegrityError), db.engine.begin() as conn:
            conn.execute(insert, {"id": "r2", "ref": "R-0000-0002", "phi": b"x", "key": "k" * 64})


def test_only_the_same_answers_count_as_the_first_submission(app):
    """What decides whether a used key gets the first request's reference back."""
    from intake.requests.submit import Submission, find_submission, same_as_first, submit_request

    document = {"first_name": "Ana", "last_name": "Lopez", "phone": "+12025550143"}
    with app.app_context():
        keyring = app.extensions["intake.keyring"]
        submit_request(
            db.session,
            keyring,
            Submission(
                kind="refill",
                language="en",
                phi=document,
                consents=[current_consent("privacy", "en")],
                location="main",
                submission_key="a-form-key",
            ),
        )
        first = find_submission(db.session, keyring, "a-form-key")
        assert first is not None
        assert same_as_first(db.session, keyring, first, dict(reversed(document.items())))
        assert not same_as_first(db.session, keyring, first, {**document, "first_name": "Eve"})
        assert not same_as_first(db.session, keyring, first, {**document, "notes": "more"})
        row = db.session.get(Request, first.request_id)
        row.wrapped_key = None  # shredded by retention: nothing to be the same as
        db.session.commit()
        assert not same_as_first(db.session, keyring, first, document)
