"""Only compliance officers reach the compliance pages; everyone else learns nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from intake.extensions import db
from intake.models import AuditEvent
from tests.conftest import hidden_fields

PAGES = [
    "/compliance/",
    "/compliance/audit",
    "/compliance/audit.csv",
    "/compliance/access/R-0000-0000",
    "/compliance/access?reference=R-0000-0000",
    "/compliance/users",
    "/compliance/users/olivia",
    "/compliance/break-glass",
    "/compliance/anomalies",
    "/compliance/verify/1",
]
POSTS = ["/compliance/verify", "/compliance/break-glass/1/review"]


def test_anonymous_visitors_are_sent_to_the_login_page(client):
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 302, path
        assert "/staff/login" in response.headers["Location"]
    for path in POSTS:
        assert client.post(path).status_code in (302, 400), path


@pytest.mark.parametrize("role", ["staff", "supervisor", "admin"])
def test_other_roles_get_404_and_nothing_is_exported(app, staff, officer, role):
    account = staff.create(f"{role}-user", role, ("refills-main",) if role == "staff" else ())
    client = staff.login(account)
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 404, path
        assert "Audit" not in response.get_data(as_text=True)
    token = hidden_fields(client.get("/staff/login").get_data(as_text=True))["csrf_token"]
    for path in POSTS:
        response = client.post(path, data={"csrf_token": token, "comment": "Looks fine to me"})
        assert response.status_code == 404, path
    with app.app_context():
        exported = db.session.scalar(
            select(func.count()).where(
                AuditEvent.action.in_(("audit.exported", "audit.verified", "break_glass.reviewed"))
            )
        )
    assert exported == 0
    home = client.get("/staff/queue" if role != "admin" else "/staff/login")
    assert "/compliance/" not in home.get_data(as_text=True)


def test_compliance_officers_reach_every_page_and_see_the_nav(officer_client):
    for path in [
        "/compliance/",
        "/compliance/audit",
        "/compliance/users",
        "/compliance/users/olivia",
        "/compliance/break-glass",
        "/compliance/anomalies",
    ]:
        response = officer_client.get(path)
        assert response.status_code == 200, path
        html = response.get_data(as_text=True)
        for label in ("Dashboard", "Audit trail", "Break-glass", "Anomalies", "Users"):
            assert f">{label}</a>" in html
        if path != "/compliance/users/olivia":
            assert 'aria-current="page"' in html
        assert response.headers["Cache-Control"] == "no-store"
        assert "style=" not in html and "<style" not in html and "<script" not in html
