"""Who is logged in: Flask-Login backed by server-side sessions (see intake.accounts.services).

The cookie holds a random token; Flask-Login's user id *is* that token, so every request looks
the session row up and a logged-out, disabled or idle session is gone for good, even if an old
cookie is replayed.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import abort, current_app, request
from flask_login import LoginManager, current_user

from intake.accounts import services as accounts
from intake.clock import now
from intake.crypto.phi import client_pseudonym, ip_pseudonym
from intake.extensions import db
from intake.requests.casework import Actor

login_manager = LoginManager()
login_manager.login_view = "staff.login"
login_manager.login_message = "Please log in to continue."
login_manager.session_protection = None


class StaffPrincipal:
    """The logged-in user as Flask-Login sees them."""

    is_authenticated = True
    is_active = True
    is_anonymous = False

    def __init__(self, token: str, user: Any) -> None:
        self.token = token
        self.user_id = user.id
        self.username = user.username
        self.role = user.role
        self.teams = tuple(user.team_ids)
        # Away from automatic assignment (intake.requests.assignment): the header's toggle.
        self.away = user.away_since is not None

    def get_id(self) -> str:
        return self.token

    def actor(self) -> Actor:
        return Actor(self.user_id, self.username, self.role, self.teams, client_ip_hmac())


@login_manager.unauthorized_handler
def send_to_login() -> Any:
    """Back to the login page, remembering only the path: a query string may hold search terms."""
    from flask import redirect, url_for

    return redirect(url_for("staff.login", next=request.path))


@login_manager.user_loader
def load_user(token: str) -> StaffPrincipal | None:
    idle = timedelta(minutes=current_app.extensions["intake.settings"].session_idle_minutes)
    found = accounts.load_session(db.session, token, now(), idle, refresh=not background_poll())
    if found is None:
        return None
    _row, user = found
    return StaffPrincipal(token, user)


def background_poll() -> bool:
    """True for the requests the queue page makes by itself to stay current (queue.js)."""
    return request.endpoint == "staff.queue_version" or (
        request.endpoint == "staff.queue" and bool(request.args.get("fragment"))
    )


def client_ip_hmac() -> str | None:
    return ip_pseudonym(current_app.extensions["intake.keyring"], request.remote_addr)


def client_network_hmac() -> str | None:
    """The pseudonym login throttles count by: the client's IPv4 address or IPv6 /64."""
    return client_pseudonym(current_app.extensions["intake.keyring"], request.remote_addr)


# -- known devices ------------------------------------------------------------------------------

DEVICE_COOKIE = "intake_device"
DEVICE_COOKIE_MAX_AGE = timedelta(days=90)
# A shared pharmacy workstation remembers this many of the people who logged in on it.
DEVICE_COOKIE_USERS = 8
_DEVICE_SALT = "intake.known-device"


def _device_serializer() -> Any:
    from itsdangerous import URLSafeTimedSerializer

    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=_DEVICE_SALT)


def _remembered_devices() -> dict[str, str]:
    from itsdangerous import BadSignature

    raw = request.cookies.get(DEVICE_COOKIE)
    if not raw:
        return {}
    try:
        loaded = _device_serializer().loads(raw, max_age=int(DEVICE_COOKIE_MAX_AGE.total_seconds()))
    except BadSignature:  # also an expired cookie (SignatureExpired)
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {str(name): str(device) for name, device in loaded.items()}


def known_device(username: str) -> str | None:
    """The id of this browser as a device ``username`` logged in from before, or None.

    Why: the per-account failure budget lets anyone who knows a username delay its logins
    from everywhere. A browser where the person already logged in carries a signed cookie
    naming her; its attempts are counted on a throttle of that device instead (see
    ``intake.accounts.services.authenticate``), so a stranger spending the budget does not lock her
    out of her own workstation. The cookie is useless without the password and code, cannot be
    forged without the app's secret key, and is sent only to the login form.
    """
    return _remembered_devices().get(username.strip().lower())


def remember_device(response: Any, username: str) -> None:
    """Mark this browser as a known device of ``username`` (after a successful login)."""
    devices = _remembered_devices()
    device = devices.pop(username, None) or secrets.token_urlsafe(16)
    devices[username] = device  # the most recent last
    kept = dict(list(devices.items())[-DEVICE_COOKIE_USERS:])
    response.set_cookie(
        DEVICE_COOKIE,
        _device_serializer().dumps(kept),
        max_age=int(DEVICE_COOKIE_MAX_AGE.total_seconds()),
        path="/staff/login",
        secure=bool(current_app.config.get("SESSION_COOKIE_SECURE")),
        httponly=True,
        samesite="Strict",
    )


def safe_next(target: str | None) -> str | None:
    """Accept only a path on this site: no scheme, no host, no '//' or backslash tricks."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


def roles_required(*roles: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not current_user.is_authenticated:
                return login_manager.unauthorized()
            if current_user.role not in roles:
                abort(404)
            return view(*args, **kwargs)

        return wrapper

    return decorate


# A page of another site, or of a sibling on the same registrable domain (www.pharmacy.example
# beside intake.pharmacy.example): the SameSite=Lax cookie goes along with both.
OTHER_SITES = frozenset({"cross-site", "same-site"})


def refuse_cross_site_views() -> Any:
    """Ask for one more click when another site sent a logged-in browser to a staff page.

    Why: these pages record what the user saw (``phi.viewed``, ``request.searched``,
    ``audit.exported``), and the session cookie is SameSite=Lax, so a link or pop-up on another
    site could make a browser open them and fill someone's audit history. Browsers say where a
    navigation came from in ``Sec-Fetch-Site``; a cross-site one gets a page with a link, which
    the user's own click turns into a same-origin request. ``same-site`` (a sibling subdomain,
    perhaps a far less guarded site, which gets our cookie sent even from an <img> tag)
    is treated the same. Mail clients and typed addresses send ``none`` and go straight through.
    """
    from flask import render_template

    if (
        request.method == "GET"
        and request.headers.get("Sec-Fetch-Site") in OTHER_SITES
        and current_user.is_authenticated
    ):
        target = request.full_path if request.query_string else request.path
        return render_template("staff/continue.html", target=target)
    return None
