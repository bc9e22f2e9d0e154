"""Pick the page's language: ``?lang=`` (remembered in a cookie), then Accept-Language."""

from __future__ import annotations

from datetime import datetime

from babel.dates import format_date, format_time
from flask import Flask, Response, g, request
from flask_babel import get_locale

from intake.clock import pharmacy_zone

LANGUAGES = ("en", "es")
LANGUAGE_NAMES = {"en": "English", "es": "Español"}
COOKIE = "intake_lang"


def select_locale() -> str:
    asked = request.args.get("lang")
    if asked in LANGUAGES:
        g.remember_language = asked
        return asked
    remembered = request.cookies.get(COOKIE)
    if remembered in LANGUAGES:
        return remembered
    return request.accept_languages.best_match(LANGUAGES) or "en"


def current_language() -> str:
    locale = get_locale()
    return locale.language if locale is not None and locale.language in LANGUAGES else "en"


def format_moment(moment: datetime) -> str:
    """A date and time as a patient reads it: in the page's language and the pharmacy's zone,
    with the zone named ("December 1, 2026, 2:45 PM EST")."""
    local = moment.astimezone(pharmacy_zone())
    language = current_language()
    day = format_date(local.date(), "long", locale=language)
    clock = format_time(local, "short", locale=language)
    return f"{day}, {clock} {local.tzname()}"


def _remember(response: Response) -> Response:
    language = g.get("remember_language")
    if language:
        response.set_cookie(
            COOKIE,
            language,
            max_age=365 * 24 * 3600,
            httponly=True,
            samesite="Lax",
            secure=request.is_secure,
        )
    return response


def init_app(app: Flask) -> None:
    app.after_request(_remember)

    @app.context_processor
    def language_context() -> dict[str, object]:
        language = current_language()
        other = "es" if language == "en" else "en"
        return {
            "current_language": language,
            "other_language": other,
            "other_language_name": LANGUAGE_NAMES[other],
        }
