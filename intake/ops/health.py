"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

from flask import Blueprint, current_app
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from intake.extensions import db

bp = Blueprint("ops", __name__)

PLAIN = {"Content-Type": "text/plain; charset=utf-8"}


@bp.get("/healthz")
def healthz() -> tuple[str, int, dict[str, str]]:
    return "ok\n", 200, PLAIN


@bp.get("/readyz")
def readyz() -> tuple[str, int, dict[str, str]]:
    problems = []
    try:
        db.session.execute(text("SELECT 1"))
        db.session.rollback()
    except SQLAlchemyError:
        db.session.rollback()
        problems.append("database unreachable")
    broker_check = current_app.extensions.get("intake.broker_check")
    if broker_check is not None and not broker_check():
        problems.append("broker unreachable")
    if problems:
        return "not ready: " + ", ".join(problems) + "\n", 503, PLAIN
    return "ready\n", 200, PLAIN
