"""Choices the patient forms draw from the routing file (its locations and languages)."""

from __future__ import annotations

from flask import current_app

from intake.i18n import current_language


def location_choices() -> list[tuple[str, str]]:
    table = current_app.extensions["intake.routing"]
    language = current_language()
    return [
        (loc.id, loc.names.get(language) or loc.names["en"]) for loc in table.locations.values()
    ]


def interpreter_choices() -> list[tuple[str, str]]:
    """The languages a patient can ask an interpreter for: each in its own name, which its
    speakers recognize whatever the page's language, then in the page's ("Tiếng Việt
    (Vietnamese)")."""
    table = current_app.extensions["intake.routing"]
    page = current_language()
    choices = []
    for language in table.languages.values():
        local = language.name_in(page)
        same = local.casefold() == language.own_name.casefold()
        choices.append(
            (language.code, language.own_name if same else f"{language.own_name} ({local})")
        )
    return choices
