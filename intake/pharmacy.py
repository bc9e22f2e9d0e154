"""Who the pharmacy is: name, phone, TTY, hours, address, time zone, language-assistance notice.

The identity is data (``config/pharmacy.toml``, or the operator's file named by
``INTAKE_PHARMACY_FILE``), read and checked once at start-up like the routing file: a mistake
stops the process with a message naming the file and line, so patients never see a wrong or
missing phone number. ``INTAKE_PHARMACY_NAME``, ``INTAKE_PHARMACY_PHONE`` and
``INTAKE_TIMEZONE`` override the file's values.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from flask import Flask, current_app
from flask_babel import format_date, format_time, get_locale
from flask_babel import lazy_gettext as _l

LANGUAGES = ("en", "es")
TOP_KEYS = {"name", "phone", "tty", "timezone", "address", "hours", "language_assistance"}
NOTICE_KEYS = {"language", "name", "notice", "dir"}
PLACEHOLDER_RE = re.compile(r"\{(phone|tty)\}")
# 711, the relay service for TTY users, dials as it is; it is a TTY number only. No other
# three-digit code (911 above all) may become the number every "call us" link dials.
RELAY_SERVICE = "711"
DATETIME_AT = _l("%(date)s at %(time)s")


class PharmacyError(ValueError):
    """The pharmacy file or an override cannot be used; the message says where."""


@dataclass(frozen=True)
class PhoneNumber:
    display: str
    href: str  # tel: URI, E.164 for a real number


@dataclass(frozen=True)
class NoticeLine:
    """One language's sentence of the language-assistance notice, split around the numbers."""

    language: str
    name: str
    parts: tuple[tuple[str, str], ...]  # ("text", words) | ("phone", "") | ("tty", "")
    dir: str = "ltr"


@dataclass(frozen=True)
class Pharmacy:
    name: str
    phone: PhoneNumber
    tty: PhoneNumber | None
    timezone: str
    address: tuple[str, ...]
    hours: Mapping[str, str]
    language_assistance: tuple[NoticeLine, ...]
    path: Path

    def hours_in(self, language: str) -> str:
        return self.hours.get(language) or self.hours["en"]

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def parse_phone(raw: Any, where: str, what: str, relay: bool = False) -> PhoneNumber:
    """Check a phone number and give its display form and ``tel:`` link (E.164).

    ``relay``: the number may be the TTY relay service, 711. The display form is the library's
    formatting of the number, never the text as typed (no stray characters reach the pages).
    """
    text = str(raw or "").strip()
    if relay and text == RELAY_SERVICE:
        return PhoneNumber(display=text, href=f"tel:{text}")
    try:
        number = phonenumbers.parse(text, "US")
    except phonenumbers.NumberParseException:
        number = None
    if number is None or not phonenumbers.is_valid_number(number):
        raise PharmacyError(f"{where}: {what} {text!r} is not a valid phone number")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    international = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    display = national if number.country_code == 1 else international
    return PhoneNumber(display=display, href=f"tel:{e164}")


def check_timezone(name: Any, where: str, what: str) -> str:
    text = str(name or "").strip()
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise PharmacyError(
            f"{where}: {what} {text!r} is not a known time zone (use a name like 'America/Chicago')"
        ) from None
    return text


def _key_line(text: str, key: str, section: str | None = None) -> int | None:
    """The line where ``key = `` is set (inside ``[section]`` when given), for messages."""
    current: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"^\s*\[+\s*([A-Za-z0-9_.-]+)\s*\]+", line)
        if header:
            current = header.group(1)
            if section is not None and current == section and key == "":
                return number
            continue
        if current == section and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    return None


def _entry_line(text: str, header_line: int | None, key: str) -> int | None:
    """The line of ``key = `` inside the ``[[...]]`` entry that starts at ``header_line``."""
    if header_line is None:
        return None
    lines = text.splitlines()
    for number in range(header_line + 1, len(lines) + 1):
        line = lines[number - 1]
        if re.match(r"^\s*\[", line):
            break
        if re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    return header_line


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


def _notice_parts(sentence: str) -> tuple[tuple[str, str], ...]:
    parts: list[tuple[str, str]] = []
    position = 0
    for match in PLACEHOLDER_RE.finditer(sentence):
        if match.start() > position:
            parts.append(("text", sentence[position : match.start()]))
        parts.append((match.group(1), ""))
        position = match.end()
    if position < len(sentence):
        parts.append(("text", sentence[position:]))
    return tuple(parts)


def parse_pharmacy(text: str, path: Path, overrides: Mapping[str, str | None]) -> Pharmacy:
    """Parse and check a pharmacy file; ``overrides`` hold the environment's values."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PharmacyError(f"{path}: {error}") from None

    unknown = sorted(set(doc) - TOP_KEYS)
    if unknown:
        line = _key_line(text, unknown[0]) or _key_line(text, "", unknown[0])
        raise PharmacyError(f"{_where(path, line)}: unknown key {unknown[0]!r}")

    def line_of(key: str) -> str:
        return _where(path, _key_line(text, key))

    name = overrides.get("name") or doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PharmacyError(f"{line_of('name')}: 'name' must be the pharmacy's name")
    if overrides.get("phone"):
        phone = parse_phone(overrides["phone"], "INTAKE_PHARMACY_PHONE", "the phone number")
    elif "phone" not in doc:
        raise PharmacyError(f"{path}: 'phone' is required (the number patients call)")
    else:
        phone = parse_phone(doc["phone"], line_of("phone"), "'phone'")
    tty = parse_phone(doc["tty"], line_of("tty"), "'tty'", relay=True) if doc.get("tty") else None
    if overrides.get("timezone"):
        timezone = check_timezone(overrides["timezone"], "INTAKE_TIMEZONE", "the time zone")
    elif "timezone" not in doc:
        raise PharmacyError(f"{path}: 'timezone' is required, for example 'America/Chicago'")
    else:
        timezone = check_timezone(doc["timezone"], line_of("timezone"), "'timezone'")

    address = doc.get("address", [])
    if isinstance(address, str):
        address = [line for line in address.splitlines() if line.strip()]
    if not isinstance(address, list) or not all(isinstance(a, str) for a in address):
        raise PharmacyError(f"{line_of('address')}: 'address' must be a list of lines")

    hours = doc.get("hours")
    hours_where = _where(path, _key_line(text, "hours") or _key_line(text, "", "hours"))
    if not isinstance(hours, dict) or not all(
        isinstance(hours.get(lang), str) and hours[lang].strip() for lang in LANGUAGES
    ):
        raise PharmacyError(f"{hours_where}: 'hours' needs an 'en' and an 'es' text")

    lines = [
        n
        for n, line in enumerate(text.splitlines(), start=1)
        if re.match(r"^\s*\[\[\s*language_assistance\s*\]\]", line)
    ]
    notices: list[NoticeLine] = []
    for index, raw in enumerate(doc.get("language_assistance", [])):
        header = lines[index] if index < len(lines) else None

        def at(key: str, header: int | None = header) -> str:
            return _where(path, _entry_line(text, header, key))

        extra = sorted(set(raw) - NOTICE_KEYS)
        if extra:
            raise PharmacyError(
                f"{at(extra[0])}: unknown key {extra[0]!r} in a language_assistance entry"
            )
        code, label, sentence = raw.get("language"), raw.get("name"), raw.get("notice")
        if not (isinstance(code, str) and re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", code)):
            raise PharmacyError(
                f"{at('language')}: 'language' must be a language tag such as 'es' or 'zh-Hant'"
            )
        if not (isinstance(label, str) and label.strip()):
            raise PharmacyError(
                f"{at('name')}: language {code!r} needs a 'name' (in that language)"
            )
        if not (isinstance(sentence, str) and "{phone}" in sentence):
            raise PharmacyError(
                f"{at('notice')}: language {code!r} needs a 'notice' sentence with {{phone}} in it"
            )
        if "{tty}" in sentence and tty is None:
            raise PharmacyError(
                f"{at('notice')}: the notice for {code!r} shows {{tty}} but there is no 'tty'"
            )
        leftover = PLACEHOLDER_RE.sub("", sentence)
        if "{" in leftover or "}" in leftover:
            raise PharmacyError(f"{at('notice')}: only {{phone}} and {{tty}} may appear in braces")
        direction = raw.get("dir", "ltr")
        if direction not in ("ltr", "rtl"):
            raise PharmacyError(f"{at('dir')}: 'dir' must be 'ltr' or 'rtl'")
        if any(n.language == code for n in notices):
            raise PharmacyError(f"{at('language')}: language {code!r} is listed twice")
        notices.append(NoticeLine(code, label.strip(), _notice_parts(sentence.strip()), direction))
    missing = [lang for lang in LANGUAGES if lang not in {n.language for n in notices}]
    if missing:
        raise PharmacyError(
            f"{path}: language_assistance must include {' and '.join(repr(m) for m in missing)} "
            "(the languages of the pages)"
        )

    return Pharmacy(
        name=name.strip(),
        phone=phone,
        tty=tty,
        timezone=timezone,
        address=tuple(a.strip() for a in address if a.strip()),
        hours={lang: hours[lang].strip() for lang in LANGUAGES},
        language_assistance=tuple(notices),
        path=path,
    )


def load_pharmacy(settings: Any) -> Pharmacy:
    """Read and check the pharmacy file named by ``settings``, with the environment's overrides."""
    path = Path(settings.pharmacy_file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PharmacyError(f"{path}: cannot read the pharmacy file ({error.strerror})") from None
    return parse_pharmacy(
        text,
        path,
        {
            "name": settings.pharmacy_name,
            "phone": settings.pharmacy_phone,
            "timezone": settings.timezone,
        },
    )


# -- showing times to people ---------------------------------------------------------------------


def local_datetime(value: datetime | None) -> str:
    """A UTC time as 'Tuesday, December 1, 2026 at 2:41 PM' in the pharmacy's time zone.

    Flask-Babel converts to its time zone (``BABEL_DEFAULT_TIMEZONE``, set from the pharmacy's)
    and formats in the page's language. A naive datetime is taken as UTC.
    """
    if value is None:
        return ""
    return str(DATETIME_AT) % {
        "date": format_date(value, "full"),
        "time": format_time(value, "short"),
    }


def local_date(value: datetime | date | None) -> str:
    """A date (or the date of a UTC time in the pharmacy's zone), e.g. 'December 1, 2026'."""
    return "" if value is None else format_date(value, "long")


def local_day(value: datetime | date | None) -> str:
    """A day with its weekday, e.g. 'Wednesday, December 2, 2026'."""
    return "" if value is None else format_date(value, "full")


def local_time(value: datetime | None) -> str:
    """The time of day of a UTC time in the pharmacy's zone, e.g. '2:41 PM'."""
    return "" if value is None else format_time(value, "short")


def timezone_name() -> str:
    """The pharmacy's time zone as people say it, in the page's language ('Central Time')."""
    from babel.dates import get_timezone_name

    pharmacy: Pharmacy = current_app.extensions["intake.pharmacy"]
    return str(
        get_timezone_name(pharmacy.tz, width="long", locale=get_locale(), zone_variant="generic")
    )


def init_app(app: Flask) -> None:
    """Give templates ``pharmacy`` and the filters for showing times to people."""
    app.add_template_filter(local_datetime, "local_datetime")
    app.add_template_filter(local_date, "local_date")
    app.add_template_filter(local_day, "local_day")
    app.add_template_filter(local_time, "local_time")

    @app.context_processor
    def pharmacy_context() -> dict[str, object]:
        return {
            "pharmacy": app.extensions["intake.pharmacy"],
            "pharmacy_timezone_name": timezone_name,
        }
