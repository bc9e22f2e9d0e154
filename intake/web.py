"""What every response gets: security headers and plain, translated error pages."""

from __future__ import annotations

import re

import structlog
from flask import Flask, Response, current_app, render_template, request
from flask.typing import ResponseReturnValue
from flask_babel import lazy_gettext as _l
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from intake.ops import metrics

log = structlog.get_logger(__name__)

# The request forms' endpoints, for counting throttled submissions by form.
SUBMISSION_FORMS = {"patient.refill": "refill", "patient.contact": "contact"}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)

# C0 control characters. Form bodies may carry tab, CR and LF (textareas send them); a path or
# a query string has no use for any of them.
CONTROL_RE = re.compile(r"[\x00-\x1f]")
FORM_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")

ERROR_TEXTS = {
    400: (
        _l("Something was wrong with that request"),
        _l("Please go back, reload the page and try again."),
    ),
    404: (_l("Page not found"), _l("Check the web address, or start again from the home page.")),
    405: (_l("That action is not allowed here"), _l("Please start again from the home page.")),
    413: (
        _l("That was too much to send"),
        _l("The form was larger than we accept. Please shorten your message and send it again."),
    ),
    429: (_l("Too many attempts"), _l("Please wait a few minutes before trying again.")),
    500: (
        _l("Something went wrong on our side"),
        _l(
            "Your information was not saved. Please try again in a few minutes or call the "
            "pharmacy."
        ),
    ),
    503: (
        _l("The service is briefly unavailable"),
        _l("Nothing was saved. Please try again in a few minutes or call the pharmacy."),
    ),
}


def security_headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers["X-Frame-Options"] = "DENY"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=(), payment=()"
    if not request.path.startswith("/static/"):
        # Forms, thanks pages and anything showing PHI must never sit in a cache.
        headers["Cache-Control"] = "no-store"
        headers["Pragma"] = "no-cache"
    if not current_app.extensions["intake.settings"].embedded:
        headers["Strict-Transport-Security"] = "max-age=63072000; includeSubDomains"
    return response


def error_page(status: int) -> tuple[str, int]:
    title, message = ERROR_TEXTS.get(status, ERROR_TEXTS[500])
    return render_template("error.html", title=title, message=message, status=status), status


# Patient forms clean their own fields (intake.patient.forms), so a stray character pasted by a
# patient gets a message in the page's language beside the field, not a generic error page.
PATIENT_FORMS = frozenset({"patient.refill", "patient.contact", "patient.status"})
# Search forms that refuse a control character beside the field themselves, by endpoint: the
# query fields each one checks (intake.compliance.forms). Anywhere else in their query, a
# control character still gets the plain 400 page.
FIELD_CHECKED_QUERIES = {
    "compliance.audit": frozenset({"actor", "action", "reference", "since", "until"}),
}


def control_characters_in_request() -> str | None:
    """Where the request carries a control character: "path", "query", "form", or None."""
    if CONTROL_RE.search(request.path):
        return "path"
    checked = FIELD_CHECKED_QUERIES.get(request.endpoint or "", frozenset())
    for name, value in request.args.items(multi=True):
        if CONTROL_RE.search(name) or (name not in checked and CONTROL_RE.search(value)):
            return "query"
    if request.endpoint in PATIENT_FORMS:
        return None  # the patient forms drop such characters and answer beside the field
    for name, value in request.form.items(multi=True):
        if CONTROL_RE.search(name) or FORM_CONTROL_RE.search(value):
            return "form"
    return None


def refuse_control_characters() -> ResponseReturnValue | None:
    """Answer 400 to a request with a control character in its path, query or form.

    Why: PostgreSQL text columns cannot hold NUL, so such a value failed deep inside a view, as
    a 500, sometimes after part of the work; the other control characters have no place in a
    name, a reference or a search term and only serve to spoof logs and screens. Refused here,
    before any view runs, such a request changes nothing in the database (it does not even
    count as a failed login). Only where the character was is logged, never the value. Assumes
    every input arrives as path, query or form fields (no view reads a JSON body).
    """
    where = control_characters_in_request()
    if where is None:
        return None
    log.info("control_characters_refused", where=where, endpoint=request.endpoint)
    return error_page(400)


# deploy/nginx/intake.conf.template sends a body over nginx's own limit here (as a GET, without
# the body), so the patient sees the same plain page as for one over Intake's limits.
TOO_LARGE_PAGE = "/errors/too-large"

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def cross_site_write() -> str | None:
    """Why an unsafe request looks cross-site ("sec-fetch-site", "origin"), or None."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        # "none" is a request the user made by hand (address bar, bookmark): no page sent it.
        return None if fetch_site in ("same-origin", "none") else "sec-fetch-site"
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return None
    return None if origin.rstrip("/") == request.host_url.rstrip("/") else "origin"


def refuse_cross_site_writes() -> ResponseReturnValue | None:
    """Answer 400 to a POST that another site's page sent.

    Why: the CSRF token (Flask-WTF) is the main defence and stays on for every form. Its HTTPS
    Referer check cannot be used, because every page sends ``Referrer-Policy: no-referrer`` (so
    a reference number or a staff search never leaks in a Referer) and browsers then send no
    Referer at all and ``Origin: null``. Fetch metadata replaces it: every current browser says
    in ``Sec-Fetch-Site`` whether a request came from our own pages, and ``Origin`` where it is
    sent must be ours. Behind a proxy ``request.host_url`` is the public one only when the
    proxy is trusted (intake.ops.proxies), so a wrong ``INTAKE_TRUSTED_PROXIES`` shows up as
    refused forms, never as accepted forged ones.
    """
    if request.method in SAFE_METHODS:
        return None
    why = cross_site_write()
    if why is None:
        return None
    log.info("cross_site_write_refused", path=request.path, why=why)
    return error_page(400)


def init_app(app: Flask) -> None:
    app.after_request(security_headers)
    # Before the CSRF token check, so a forged cross-site post is refused as what it is.
    app.before_request_funcs.setdefault(None, []).insert(0, refuse_cross_site_writes)
    app.before_request(refuse_control_characters)

    @app.get(TOO_LARGE_PAGE)
    def too_large() -> ResponseReturnValue:
        """The 413 page, for the reverse proxy to show when a body is over its own limit."""
        return error_page(413)

    @app.errorhandler(CSRFError)
    def csrf_error(error: CSRFError) -> ResponseReturnValue:
        log.info("csrf_rejected", path=request.path, reason=error.description)
        return error_page(400)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> ResponseReturnValue:
        status = error.code or 500
        if status in (301, 302, 303, 307, 308):
            return error.get_response()
        if status == 429:
            log.info("rate_limited", path=request.path)
            if request.endpoint in SUBMISSION_FORMS:
                metrics.SUBMISSIONS.labels(SUBMISSION_FORMS[request.endpoint], "throttled").inc()
        return error_page(status if status in ERROR_TEXTS else 400)

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def database_unavailable(error: OperationalError | InterfaceError) -> tuple[str, int]:
        from intake.extensions import db

        db.session.rollback()
        log.error("database_unavailable", path=request.path, error=type(error.orig).__name__)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            # Every change is audited in its own transaction: this one wrote neither.
            metrics.AUDIT_WRITE_FAILURES.labels("database").inc()
        return error_page(503)

    @app.errorhandler(DataError)
    def value_refused(error: DataError) -> tuple[str, int]:
        # The database refused a value (NUL in text, a number out of range...) that the checks
        # before it let through: bad input, so a 400; nothing of the transaction is kept.
        from intake.extensions import db

        db.session.rollback()
        log.warning("value_refused_by_database", path=request.path, error=type(error.orig).__name__)
        return error_page(400)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> tuple[str, int]:
        # Log the type and where, never the exception text: it may quote submitted values.
        log.error("unhandled_error", path=request.path, error=type(error).__name__)
        return error_page(500)
