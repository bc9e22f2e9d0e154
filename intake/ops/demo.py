"""Demo data for the embedded profile: teams, one user per role, a living queue.

Passwords are random per installation and kept in ``demo-credentials.json`` (mode 0600) in the
data folder, so the start command can show them again. Demo users are flagged; only they can
have their current code printed by ``intake demo-otp``.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from datetime import datetime, timedelta
from pathlib import Path

from flask import Flask
from sqlalchemy import select, update

from intake.accounts import services as accounts
from intake.clock import utcnow
from intake.extensions import db
from intake.models import OPEN_STATUSES, Request, Team, User
from intake.requests import casework, routing
from intake.requests.consents import accepted_consents
from intake.requests.submit import Submission, submit_request

ALPHABET = "abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
DEMO_USERS = [
    ("pharmacist", "staff", ["refills-main", "refills-north", "infusion", "patient-services"]),
    ("clinician", "staff", ["clinical", "ivig", "bilingual", "benefits"]),
    ("supervisor", "supervisor", []),
    ("compliance", "compliance", []),
    ("admin", "admin", []),
]
# The clinician (clinical, IVIG, bilingual, benefits) speaks Spanish, so Spanish copay and IVIG
# requests are assigned to her; the pharmacist speaks English only.
DEMO_LANGUAGES = {"clinician": ["en", "es"], "supervisor": ["en", "es"]}
FIRST = [
    "Maria",
    "José",
    "Ana",
    "Luis",
    "Carmen",
    "James",
    "Linda",
    "Robert",
    "Patricia",
    "Michael",
    "Guadalupe",
    "Wei",
    "Aisha",
    "Dmitri",
    "Fatima",
    "Noah",
]
LAST = [
    "García",
    "Hernández",
    "Smith",
    "Johnson",
    "López",
    "Martínez",
    "Nguyen",
    "Brown",
    "Rodríguez",
    "Okafor",
    "Kowalski",
    "Rossi",
    "Kim",
    "Patel",
]
# Demo history: a week of arrivals, a quarter of them in the last few hours (the living queue),
# and about one in seven requests still open past its due time, as in a busy but sound pharmacy.
HISTORY_DAYS = 7
RECENT_SHARE = 0.25
RECENT_HOURS = 3
OVERDUE_SHARE = 0.15
TOPICS = ["question", "copay", "specialist", "insurance", "transfer", "side_effect"]
MESSAGES = {
    "question": "Can I take my infusion a few days later than scheduled?",
    "copay": "My copay went up this month. Is there an assistance program?",
    "specialist": "I would like to talk with the IVIG nurse about my next infusion.",
    "insurance": "My insurance changed on the first of the month.",
    "transfer": "Please transfer my prescription to your North Clinic location.",
    "side_effect": "I had a headache and chills after my last infusion.",
}


def _credentials_file(app: Flask) -> Path:
    return Path(app.extensions["intake.settings"].data_dir) / "demo-credentials.json"


def _save_credentials(path: Path, credentials: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(credentials, handle, indent=2)


def saved_logins(app: Flask, url: str | None = None) -> list[str]:
    """The demo accounts' logins as ``intake demo`` printed them, or [] if there are none."""
    path = _credentials_file(app)
    if not path.is_file():
        return []
    return _describe(app, json.loads(path.read_text(encoding="utf-8")), url)


def _describe(app: Flask, credentials: dict[str, str], url: str | None = None) -> list[str]:
    url = url or app.extensions["intake.settings"].public_url
    lines = ["", "Demo staff accounts (password, then the 6-digit code of the account's TOTP):"]
    for username, role, _teams in DEMO_USERS:
        if username in credentials:
            secret = credentials.get(f"{username}:totp", "?")
            lines.append(
                f"  {role:<11} {username:<11} password: {credentials[username]}"
                f"   TOTP secret: {secret}"
            )
    lines += [
        f"Log in at {url}/staff/login as pharmacist. For the code, add the TOTP secret to an",
        "authenticator app, or print the current code with:  .venv/bin/intake demo-otp pharmacist",
        "",
    ]
    return lines


def seed(app: Flask, count: int = 36, if_empty: bool = False) -> list[str]:
    session = db.session
    keyring = app.extensions["intake.keyring"]
    path = _credentials_file(app)
    existing = session.execute(select(User.username).where(User.demo.is_(True))).scalars().all()
    if existing:
        if if_empty:
            saved: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
            return _describe(app, saved)
        raise RuntimeError("demo users exist already (use --if-empty to just show them)")

    table = app.extensions["intake.routing"]
    for team in table.teams.values():
        if session.get(Team, team.id) is None:
            accounts.create_team(session, team.id, team.name, team.spanish, "system:demo")
    session.commit()

    credentials: dict[str, str] = {}
    lines: list[str] = []
    for username, role, teams in DEMO_USERS:
        password = "-".join("".join(secrets.choice(ALPHABET) for _ in range(4)) for _ in range(4))
        created = accounts.create_user(
            session,
            keyring,
            username=username,
            password=password,
            role=role,
            teams=teams,
            actor="system:demo",
            demo=True,
            languages=DEMO_LANGUAGES.get(username, ["en"]),
        )
        credentials[username] = password
        credentials[f"{username}:totp"] = created.totp_secret
    session.commit()
    _save_credentials(path, credentials)

    rng = random.Random()  # noqa: S311 - made-up demo data, not secrets
    pharmacist = session.execute(select(User).where(User.username == "pharmacist")).scalar_one()
    now = utcnow()
    for index in range(count):
        kind = "refill" if index % 3 else "contact"
        language = "es" if index % 5 == 0 else "en"
        first, last = rng.choice(FIRST), rng.choice(LAST)
        document: dict[str, object] = {
            "first_name": first,
            "last_name": last,
            "date_of_birth": f"{rng.randint(1940, 2005)}-{rng.randint(1, 12):02d}-"
            f"{rng.randint(1, 28):02d}",
            "phone": f"+1202555{rng.randint(100, 199):04d}",
            "contact_method": "phone",
        }
        topic = location = None
        # Now and then an English form asking for a Vietnamese interpreter: nobody speaks it,
        # so the queue shows it flagged and the supervisors are told.
        interpreter = "vi" if index % 11 == 7 else None
        if kind == "refill":
            location = rng.choice(list(table.locations))
            document.update(
                rx_numbers=[str(rng.randint(1000000, 9999999))],
                fulfillment=rng.choice(["pickup", "delivery", "ship"]),
                address="12 Example Street, Springfield",
            )
        else:
            topic = rng.choice(TOPICS)
            document["message"] = MESSAGES[topic]
        consents = accepted_consents(kind, language)
        accepted = submit_request(
            session,
            keyring,
            Submission(
                kind=kind,
                language=language,
                phi=document,
                consents=consents,
                topic=topic,
                location=location,
                interpreter_language=interpreter,
            ),
        )
        arrived = _arrival(rng, now)
        # Received when it arrived: the row's time is set before routing, so the due time the
        # routing rule gives (arrival + the team's SLA) always comes after it.
        session.execute(
            update(Request)
            .where(Request.id == accepted.request_id)
            .values(created_at=arrived, updated_at=arrived)
        )
        session.commit()
        routing.route_request(session, table, accepted.request_id, arrived)
        if index % 7 == 3 and kind == "refill":
            actor = casework.Actor(pharmacist.id, "pharmacist", "staff", tuple(pharmacist.team_ids))
            try:
                casework.change_status(session, accepted.reference, actor, "in_progress", now)
                casework.add_note(
                    session,
                    keyring,
                    accepted.reference,
                    actor,
                    "Called the prescriber's office; waiting for a call back.",
                    now,
                )
            except casework.CaseworkError:
                session.rollback()
    _work_the_past(rng, count, now)
    return [
        f"Seeded {count} demo requests and {len(DEMO_USERS)} users.",
        *lines,
        *_describe(app, credentials),
    ]


def _arrival(rng: random.Random, now: datetime) -> datetime:
    """When a demo request arrived: within the last few hours, or earlier in the week."""
    if rng.random() < RECENT_SHARE:
        return now - timedelta(minutes=rng.randint(2, RECENT_HOURS * 60))
    return now - timedelta(minutes=rng.randint(12 * 60, HISTORY_DAYS * 24 * 60))


def _work_the_past(rng: random.Random, count: int, now: datetime) -> None:
    """Complete (or now and then cancel) the past-due requests, all but ``OVERDUE_SHARE`` of
    the demo's requests, newest overdue left open: a queue with a realistic backlog."""
    supervisor = db.session.execute(select(User).where(User.username == "supervisor")).scalar_one()
    actor = casework.Actor(supervisor.id, "supervisor", "supervisor", ())
    overdue = list(
        db.session.execute(
            select(Request.reference)
            .where(Request.status.in_(OPEN_STATUSES), Request.sla_due_at < now)
            .order_by(Request.sla_due_at.desc())
        ).scalars()
    )
    keep = round(count * OVERDUE_SHARE)
    for reference in overdue[keep:]:
        try:
            status = db.session.execute(
                select(Request.status).where(Request.reference == reference)
            ).scalar_one()
            if status == "queued":
                casework.change_status(db.session, reference, actor, "in_progress", now)
            final = "cancelled" if rng.random() < 0.1 else "completed"
            casework.change_status(db.session, reference, actor, final, now)
        except casework.CaseworkError:
            db.session.rollback()
