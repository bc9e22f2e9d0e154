"""Attacks on the patient's "who opened my request" list (issue 12) that worked before a fix."""

from __future__ import annotations

from sqlalchemy import text

from intake.audit.checkpoints import verify_trail
from intake.extensions import db
from tests.intake.patient.test_status import look_up
from tests.intake.patient.test_status_openings import ROW_RE, open_as, routed_team
from tests.intake.staff.conftest import create_staff_user, create_teams, submit_routed


def test_renaming_a_team_in_the_database_does_not_change_who_opened_the_request(
    app, client, patient
):
    """Before: the page looked the team's name up in ``teams`` at display time. That table is
    not in the audit chain, so a database attacker (or any later rename) could make the page
    say "Billing" opened the request where the pharmacy's oncology team did, and verify saw
    nothing. The name the team had when the request was opened is now in the event itself."""
    create_teams(app)
    reference = submit_routed(app, patient)
    team_id, team_name = routed_team(app, reference)
    open_as(app, create_staff_user(app, "rosa.staff", teams=(team_id,)), reference)
    with app.app_context():
        db.session.execute(
            text("UPDATE teams SET name = 'Billing office' WHERE id = :id"), {"id": team_id}
        )
        db.session.commit()
        # Nothing in the audit trail changed: verify cannot see a renamed team.
        assert verify_trail(db.session, app.extensions["intake.settings"], with_anchor=False)
    page = look_up(client, reference, "1980-03-15").get_data(as_text=True)
    assert ROW_RE.findall(page) == [team_name]
    assert "Billing office" not in page


def test_a_checkpoints_file_being_written_gives_not_ready_not_a_server_error(
    app, client, patient
):
    """Before: while the signer's line was still being written (or after a crash cut it), the
    file ended in a partial line and latest_signed_head raised CheckpointError: the patient's
    download was a 500. It is "not ready yet", as when no checkpoint exists."""
    from intake.audit import checkpoints
    from tests.intake.patient.test_status_openings import download_proof

    reference = submit_routed(app, patient)
    settings = app.extensions["intake.settings"]
    with app.app_context():
        checkpoints.write_checkpoint(db.session, settings, actor="system:test")
    path = checkpoints.checkpoints_path(settings)
    with path.open("a") as handle:
        handle.write('{"v":2,"seq":')
    page = look_up(client, reference, "1980-03-15").get_data(as_text=True)
    answer = download_proof(client, page)
    assert answer.status_code == 200
    assert "not ready yet" in answer.get_data(as_text=True)
