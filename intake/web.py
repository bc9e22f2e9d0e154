"""What every response gets: security headers and plain, translated error pages."""

from __future__ import annotations

import structlog
from flask import Flask, Response, current_app, render_template, request
from flask.typing import ResponseReturnValue
from flask_babel import lazy_gettext as _l
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

log = structlog.get_logger(__name__)

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


def init_app(app: Flask) -> None:
    app.after_request(security_headers)

    @app.errorhandler(CSRFError)
    def csrf_error(error: CSRFError) -> ResponseReturnValue:
        from intake.patient.views import rerender_after_csrf_error

        log.info("csrf_rejected", path=request.path, reason=error.description)
        page = rerender_after_csrf_error()
        return page if page is not None else error_page(400)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> ResponseReturnValue:
        status = error.code or 500
        if status in (301, 302, 303, 307, 308):
            return error.get_response()
        if status == 429:
            log.info("rate_limited", path=request.path)
        return error_page(status if status in ERROR_TEXTS else 400)

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def database_unavailable(error: OperationalError | InterfaceError) -> tuple[str, int]:
        from intake.extensions import db

        db.session.rollback()
        log.error("database_unavailable", path=request.path, error=type(error.orig).__name__)
        return error_page(503)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> tuple[str, int]:
        # Log the type and where, never the exception text: it may quote submitted values.
        log.error("unhandled_error", path=request.path, error=type(error).__name__)
        return error_page(500)
