"""Compliance forms: the audit filter, the access-report look-up, reviews, verification."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from flask_wtf import FlaskForm
from wtforms import Field, Form, RadioField, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional, StopValidation, ValidationError

from intake.audit.chain import ACTIONS
from intake.compliance.break_glass import MAX_COMMENT, MIN_COMMENT, OUTCOMES
from intake.compliance.reports import AuditFilter
from intake.forms import clean_phone, options
from intake.requests.references import normalize_reference

TIME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?Z?$")
TIME_HINT = "Use YYYY-MM-DD or YYYY-MM-DD HH:MM (UTC)."
# No event is older than the system and none is dated centuries ahead; outside these years a
# date is a typo, and near the end of the calendar one day more would not even exist.
YEARS = (2000, 2200)
YEARS_HINT = f"Use a date between {YEARS[0]} and {YEARS[1]}."
REFERENCE_HINT = "A reference looks like R-7K3M-Q9P2."
REVERSED_HINT = "Until is before From, so no event can match: swap them or choose a later time."
CONTROL_HINT = (
    "This held an invisible control character (such as NUL), which is now removed: "
    "check the value and search again."
)
# C0 control characters and DEL: no actor, action, reference or time holds one.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def parse_utc(text: str, *, end: bool = False) -> datetime:
    """Read a UTC date or time as typed; with ``end``, the first moment after it.

    So ``until 2026-11-24`` includes that whole day and ``until 2026-11-24 10:15`` that whole
    minute. Years outside ``YEARS`` are refused.
    """
    match = TIME_RE.match(text.strip())
    if not match:
        raise ValueError(TIME_HINT)
    day, hour, minute, second = match.groups()
    try:
        moment = datetime.fromisoformat(day).replace(tzinfo=UTC)
        if hour is not None:
            moment = moment.replace(hour=int(hour), minute=int(minute), second=int(second or 0))
    except ValueError as error:
        raise ValueError(TIME_HINT) from error
    if not YEARS[0] <= moment.year <= YEARS[1]:
        raise ValueError(YEARS_HINT)
    if end:
        step = (
            timedelta(days=1)
            if hour is None
            else timedelta(minutes=1)
            if second is None
            else timedelta(seconds=1)
        )
        moment += step
    return moment


def _valid_time(_form: Form, field: Field) -> None:
    if field.data:
        try:
            parse_utc(field.data)
        except ValueError as error:
            raise ValidationError(str(error)) from error


def _valid_reference(_form: Form, field: Field) -> None:
    if field.data and normalize_reference(field.data) is None:
        raise ValidationError(REFERENCE_HINT)


def _no_control_characters(_form: Form, field: Field) -> None:
    """Refuse a control character beside the field, showing the value without it.

    Why: a NUL cannot even be sent to PostgreSQL, and the app answers one anywhere else in a
    query with its plain 400 page (intake.web.refuse_control_characters). The audit filter's
    fields are let through to here (intake.web.FIELD_CHECKED_QUERIES) so that the officer sees
    which field was wrong; validation stops at this validator, so the value never reaches a
    query, and the page does not echo the character back.
    """
    if any(CONTROL_RE.search(value) for value in field.raw_data or () if isinstance(value, str)):
        if isinstance(field.data, str):
            field.data = CONTROL_RE.sub("", field.data)
        raise StopValidation(CONTROL_HINT)


def _strip(value: str | None) -> str | None:
    return value.strip() if isinstance(value, str) else value


class AuditFilterForm(FlaskForm):
    class Meta:
        csrf = False  # a GET form that changes nothing

    actor = StringField(
        "Actor or username",
        validators=[_no_control_characters, Optional(), Length(max=64)],
        filters=[_strip],
    )
    action = SelectField(
        "Action",
        choices=options([("", "any action"), *((a, a) for a in ACTIONS)]),
        validators=[_no_control_characters, Optional()],
    )
    reference = StringField(
        "Reference",
        validators=[_no_control_characters, Optional(), Length(max=20), _valid_reference],
    )
    since = StringField(
        "From (UTC)", validators=[_no_control_characters, Optional(), Length(max=25), _valid_time]
    )
    until = StringField(
        "Until (UTC)",
        validators=[_no_control_characters, Optional(), Length(max=25), _valid_time],
    )

    def validate_until(self, field: Field) -> None:
        """A window that ends before it starts would show an empty page: say why instead."""
        since_text = (self.since.data or "").strip()
        until_text = (field.data or "").strip()
        # Either time unreadable: its own message says so (the field's validators ran first).
        if self.since.errors or field.errors or not since_text or not until_text:
            return
        if parse_utc(until_text, end=True) <= parse_utc(since_text):
            raise ValidationError(REVERSED_HINT)

    def to_filter(self) -> AuditFilter:
        """The validated filter."""
        since_text = (self.since.data or "").strip() or None
        until_text = (self.until.data or "").strip() or None
        return AuditFilter(
            actor=self.actor.data or None,
            action=self.action.data or None,
            reference=normalize_reference(self.reference.data) if self.reference.data else None,
            since=parse_utc(since_text) if since_text else None,
            until=parse_utc(until_text, end=True) if until_text else None,
            since_text=since_text,
            until_text=until_text,
        )


class AccessLookupForm(FlaskForm):
    class Meta:
        csrf = False

    reference = StringField(
        "Reference", validators=[DataRequired(), Length(max=20), _valid_reference]
    )


class ReviewForm(FlaskForm):
    outcome = RadioField(
        "Outcome",
        choices=options(OUTCOMES.items()),
        validators=[DataRequired(message="Choose an outcome.")],
    )
    comment = TextAreaField(
        "Review comment (no patient details)",
        validators=[DataRequired(), Length(min=MIN_COMMENT, max=MAX_COMMENT)],
        filters=[_strip],
    )


class VerifyForm(FlaskForm):
    """Only a CSRF token: verifying writes an audit event."""


class PatientSearchForm(FlaskForm):
    """Find one patient: last name and date of birth, or phone (exact, via blind indexes)."""

    last_name = StringField("Last name", validators=[Optional(), Length(max=60)], filters=[_strip])
    date_of_birth = StringField(
        "Date of birth", validators=[Optional(), Length(max=10)], filters=[_strip]
    )
    phone = StringField("Phone", validators=[Optional(), Length(max=40)], filters=[_strip])

    phone_e164: str | None = None

    def validate_date_of_birth(self, field: Field) -> None:
        if field.data:
            try:
                datetime.strptime(field.data, "%Y-%m-%d")
            except ValueError:
                raise ValidationError("Use YYYY-MM-DD, for example 1961-04-23.") from None

    def validate_phone(self, field: Field) -> None:
        if field.data:
            self.phone_e164 = clean_phone(field.data)

    def validate(self, extra_validators: object = None) -> bool:  # type: ignore[override]
        if not super().validate():
            return False
        if self.phone.data or (self.last_name.data and self.date_of_birth.data):
            return True
        self.form_errors.append("Type a phone number, or a last name and a date of birth (both).")
        return False
