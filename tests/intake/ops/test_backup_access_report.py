"""The access report ("who touched this request") survives ``intake backup`` and its restore.

The report finds a request's own events by their reference, and the queue pages and searches
that listed it through ``audit_listings``, a table derived from the trail beside it
(intake.audit.listings). A backup that lost that table, or a restore that left it empty,
would still verify and still open every request, yet the restored report would quietly drop
every queue view of the patient's data. So the report is read before the backup and after
the restore, on SQLite and PostgreSQL, by a compliance officer through the page.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from flask import Flask

from config import Settings
from intake.compliance import reports
from intake.extensions import db
from tests.intake.compliance.test_access_report import event_rows
from tests.intake.ops.test_backup import (  # noqa: F401 - installations is a fixture
    Installation,
    give_keys,
    installations,
    make_backup,
    open_app,
    populate,
)
from tests.intake.staff.conftest import (
    FakeClock,
    StaffUser,
    create_staff_user,
    install_clock,
    login,
)


def report_of(app: Flask, reference: str) -> list[tuple[int, str, str, str, tuple[str, ...]]]:
    """What the access report lists for ``reference``: seq, actor, action, kind, references."""
    with app.app_context():
        report = reports.access_report(db.session, reference)
        return [(e.seq, e.actor, e.action, e.kind, e.references) for e in report.entries]


def report_page(
    app: Flask, officer: StaffUser, clock: FakeClock, reference: str
) -> list[list[str]]:
    client = app.test_client()
    login(client, officer, clock)
    page = client.get(f"/compliance/access/{reference}")
    assert page.status_code == 200, reference
    return event_rows(page.get_data(as_text=True))


def listings_in(url: str) -> list[tuple[str, int]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT reference, seq FROM audit_listings"))
            return sorted((str(reference), int(seq)) for reference, seq in rows)
    finally:
        engine.dispose()


def test_the_access_report_survives_a_backup_and_restore(
    installations: Callable[..., Installation],  # noqa: F811 - the fixture imported above
    make_app: Callable[[Settings], Flask],
    tmp_path: Path,
) -> None:
    source = installations("source")
    made = populate(open_app(make_app, source))
    officer = create_staff_user(made.app, "backup-officer", "compliance")
    # The supervisor's queue page lists every request: one event naming them all in its
    # details, found by the report through audit_listings only.
    staff = made.app.test_client()
    login(staff, made.supervisor, made.clock)
    assert staff.get("/staff/queue").status_code == 200
    references = list(made.references)
    before = {reference: report_of(made.app, reference) for reference in references}
    for reference, entries in before.items():
        kinds = [kind for _seq, _actor, _action, kind, _refs in entries]
        assert "list_view" in kinds, (reference, entries)  # the queue page, via the listings
    opened = references[0]  # populate's supervisor opened this one
    assert "phi_view" in [kind for *_e, kind, _refs in before[opened]]
    pages_before = {r: report_page(made.app, officer, made.clock, r) for r in references}
    listed = listings_in(source.database_url)
    assert listed

    folder, _result = make_backup(source, tmp_path / "backups")
    target = installations("restored", migrated=False)
    give_keys(source, target)
    target.intake("backup", "restore", folder, "--database-url", target.database_url)

    assert listings_in(target.database_url) == listed
    restored = open_app(make_app, target)
    clock = install_clock(restored, made.clock())
    for reference in references:
        assert report_of(restored, reference) == before[reference], reference
        # And as the officer reads it: the same lines, the queue view among them.
        assert report_page(restored, officer, clock, reference) == pages_before[reference]
