"""Choices the patient forms draw from the routing file (its locations)."""

from __future__ import annotations

from flask import current_app

from intake.i18n import current_language


def location_choices() -> list[tuple[str, str]]:
    table = current_app.extensions["intake.routing"]
    language = current_language()
    return [
        (loc.id, loc.names.get(language) or loc.names["en"]) for loc in table.locations.values()
    ]
