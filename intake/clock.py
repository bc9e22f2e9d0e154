"""UTC time for rows and events, with a clock tests can replace."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import Dialect
from sqlalchemy.types import DateTime, TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def now() -> datetime:
    """The app's clock: ``utcnow`` unless a test put another in ``app.extensions``."""
    from flask import current_app, has_app_context

    if has_app_context():
        clock = current_app.extensions.get("intake.clock")
        if clock is not None:
            return clock()  # type: ignore[no-any-return]
    return utcnow()


def pharmacy_zone() -> tzinfo:
    """The pharmacy's time zone, for every time shown to patients (UTC until one is set).

    Read from ``app.extensions["intake.timezone"]`` (an IANA name such as "America/Chicago"),
    where the pharmacy's configuration puts it; start-up is the place to refuse a bad name.
    """
    from flask import current_app, has_app_context

    name = current_app.extensions.get("intake.timezone") if has_app_context() else None
    if not name:
        return UTC
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite forgets zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
