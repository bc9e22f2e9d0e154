"""A request's coded values in words for the staff who read them, in the page's language.

The ``requests`` table keeps codes ("infusion", "pickup", "waiting_on_prescriber") because the
queue, routing and reports filter on them; people read words. Each label goes through gettext,
so it follows the page's locale, and a code this module does not know is shown as it is
rather than hidden: a new status in the database must not vanish from the page. Location,
team and language names come from the routing file, the one place an operator names them.
Times are shown in the pharmacy's time zone (Flask-Babel's default zone, set from the
pharmacy file) with the UTC time beside them for the hover title; phone numbers as people
dial them, with a ``tel:`` link.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import phonenumbers
from flask_babel import format_date, format_time, get_timezone
from flask_babel import lazy_gettext as _l

from intake.i18n import current_language

KIND_LABELS: Mapping[str, Any] = {
    "refill": _l("Refill"),
    "contact": _l("Contact"),
}
STATUS_LABELS: Mapping[str, Any] = {
    "received": _l("Received"),
    "queued": _l("Queued"),
    "in_progress": _l("In progress"),
    "waiting_on_patient": _l("Waiting on patient"),
    "waiting_on_prescriber": _l("Waiting on prescriber"),
    "completed": _l("Completed"),
    "cancelled": _l("Cancelled"),
}
PRIORITY_LABELS: Mapping[str, Any] = {
    "urgent": _l("Urgent"),
    "high": _l("High"),
    "normal": _l("Normal"),
    "low": _l("Low"),
}
TOPIC_LABELS: Mapping[str, Any] = {
    "question": _l("Question about a medication or order"),
    "copay": _l("Copay assistance"),
    "specialist": _l("Talk with an IVIG specialist"),
    "insurance": _l("Insurance or billing"),
    "transfer": _l("Prescription transfer"),
    "side_effect": _l("Side-effect report"),
}
FULFILLMENT_LABELS: Mapping[str, Any] = {
    "pickup": _l("Pickup at the pharmacy"),
    "delivery": _l("Local delivery"),
    "ship": _l("Shipping"),
}
CONTACT_METHOD_LABELS: Mapping[str, Any] = {
    "phone": _l("Phone call"),
    "sms": _l("Text message"),
    "email": _l("E-mail"),
}
FORM_LANGUAGE_LABELS: Mapping[str, Any] = {
    "en": _l("English"),
    "es": _l("Spanish"),
}
CONSENT_LABELS: Mapping[str, Any] = {
    "privacy": _l("Privacy Policy"),
    "terms": _l("Terms of Use"),
    "npp": _l("Notice of Privacy Practices"),
    "contact": _l("Consent to be contacted"),
}


def _label(labels: Mapping[str, Any], code: str | None) -> str:
    # Codes come from audit details too: anything but a string (a list, an object) is no code.
    if not code or not isinstance(code, str):
        return "–"
    return str(labels[code]) if code in labels else code


def kind_label(code: str | None) -> str:
    return _label(KIND_LABELS, code)


def status_label(code: str | None) -> str:
    return _label(STATUS_LABELS, code)


def priority_label(code: str | None) -> str:
    return _label(PRIORITY_LABELS, code)


def topic_label(code: str | None) -> str:
    return _label(TOPIC_LABELS, code)


def fulfillment_label(code: str | None) -> str:
    return _label(FULFILLMENT_LABELS, code)


def contact_method_label(code: str | None) -> str:
    return _label(CONTACT_METHOD_LABELS, code)


def form_language_label(code: str | None) -> str:
    return _label(FORM_LANGUAGE_LABELS, code)


def consent_label(code: str | None) -> str:
    return _label(CONSENT_LABELS, code)


def location_label(table: Any, code: str | None) -> str:
    """A location's name from the routing file, in the page's language."""
    location = table.locations.get(code or "")
    if location is None:
        return code or "–"
    return str(location.names.get(current_language()) or location.names["en"])


def language_label(table: Any, code: str | None) -> str:
    """A language a patient needs ("Spanish"; "vietnamita" on a Spanish page)."""
    if not code:
        return "–"
    if code in FORM_LANGUAGE_LABELS:
        return str(FORM_LANGUAGE_LABELS[code])
    return str(table.language_name(code, current_language()))


def team_label(team_names: Mapping[str, str], code: str | None) -> str:
    """A team's name from the routing file; its id when the file no longer has it."""
    if not code:
        return "–"
    return team_names.get(code, code)


@dataclass(frozen=True)
class Moment:
    """A time as the page shows it: in the pharmacy's zone, with ISO and UTC for the markup."""

    iso: str  # for <time datetime=...>
    local: str  # "Dec 1, 2026, 2:45 PM CST"
    utc: str  # "2026-12-01 20:45 UTC", for the hover title


def moment(value: datetime) -> Moment:
    """``value`` (UTC; a naive time is taken as UTC) for people at the pharmacy."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    zone = value.astimezone(get_timezone()).tzname() or ""
    local = f"{format_date(value, 'medium')}, {format_time(value, 'short')} {zone}"
    return Moment(
        iso=value.isoformat(timespec="seconds"),
        local=local.strip(),
        utc=value.strftime("%Y-%m-%d %H:%M UTC"),
    )


def calendar_day(value: date | str | None) -> str:
    """A calendar date (a date of birth, a needed-by day) in the page's language; no zone."""
    if not value:
        return "–"
    day = value
    if isinstance(value, str):
        try:
            day = date.fromisoformat(value)
        except ValueError:
            return value
    return str(format_date(day, "long"))


@dataclass(frozen=True)
class Phone:
    display: str
    href: str | None  # tel:+E.164, or None when the number cannot be dialled as stored


def phone_for_people(stored: str | None) -> Phone:
    """A stored phone number (E.164) as people read it, "(202) 555-0105" at home and
    "+52 55 1234 5678" abroad, with its ``tel:`` link."""
    text = (stored or "").strip()
    try:
        number = phonenumbers.parse(text, "US")
    except phonenumbers.NumberParseException:
        return Phone(text or "–", None)
    if not phonenumbers.is_possible_number(number):
        return Phone(text, None)
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    style = (
        phonenumbers.PhoneNumberFormat.NATIONAL
        if number.country_code == 1
        else phonenumbers.PhoneNumberFormat.INTERNATIONAL
    )
    return Phone(phonenumbers.format_number(number, style), f"tel:{e164}")
