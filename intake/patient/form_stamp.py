"""The signed stamp each patient form carries: which form, when it was first shown, and the
form's one-time submission key.

Why: a bot posts a form sooner than a person could fill it, and a person sometimes sends the
same form twice. The stamp is signed with the app's secret, so it cannot be forged, backdated or
moved to the other form; and it is carried unchanged through every re-render of that form (field
errors, a too-fast or expired-token answer, a language switch), so the fill time counts from the
first time the patient saw the form, and a correction sent a second later is not taken for a
bot. The key inside it lets the database recognise a repeated POST of that form
(see :mod:`intake.requests.submit`). A stamp is only as old as its first render: past the form's
maximum age it is replaced by a new one (with a new key). It assumes the secret key is secret;
a bot can still fetch a real form and wait, which the rate limit and the honeypot cover.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from flask import current_app
from itsdangerous import BadSignature, URLSafeSerializer

from intake.clock import now

SALT = "intake.form-stamp"


@dataclass(frozen=True)
class FormStamp:
    form: str
    key: str
    rendered_at: datetime
    token: str  # what the hidden field holds

    def age_seconds(self) -> float:
        return (now() - self.rendered_at).total_seconds()


def _serializer() -> URLSafeSerializer:
    secret = current_app.secret_key
    if not secret:
        raise RuntimeError("the app has no secret key to sign form stamps with")
    return URLSafeSerializer(secret, salt=SALT)


def new_stamp(form: str, shown_at: datetime | None = None, key: str | None = None) -> FormStamp:
    """A stamp for ``form`` shown now (or at ``shown_at``), with a fresh random submission key
    (or ``key``, to re-date a stamp and keep its key)."""
    key = key or secrets.token_urlsafe(16)
    rendered_at = shown_at or now()
    token = _serializer().dumps({"form": form, "key": key, "at": rendered_at.timestamp()})
    return FormStamp(form=form, key=key, rendered_at=rendered_at, token=token)


def read_stamp(token: str | None, form: str) -> FormStamp | None:
    """The stamp in ``token`` if it is genuine and for ``form`` (however old); else None."""
    if not token:
        return None
    try:
        payload = _serializer().loads(token)
    except BadSignature:
        return None
    if not isinstance(payload, dict) or payload.get("form") != form:
        return None
    key, at = payload.get("key"), payload.get("at")
    if not isinstance(key, str) or not key:
        return None
    if isinstance(at, bool) or not isinstance(at, int | float):
        return None
    try:
        rendered_at = datetime.fromtimestamp(at, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return FormStamp(form=form, key=key, rendered_at=rendered_at, token=token)
