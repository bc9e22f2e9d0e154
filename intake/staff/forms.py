"""Staff forms."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import HiddenField, PasswordField, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional, Regexp

from intake.accounts.services import MAX_PASSWORD_LENGTH
from intake.forms import options
from intake.models import STATUSES


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(max=MAX_PASSWORD_LENGTH)]
    )
    otp = StringField(
        "Authenticator code",
        validators=[DataRequired(), Regexp(r"^\s*[0-9]{6}\s*$", message="Enter the 6-digit code.")],
    )
    next = HiddenField()


class NoteForm(FlaskForm):
    text = TextAreaField("Note", validators=[DataRequired(), Length(max=4000)])


class StatusForm(FlaskForm):
    status = SelectField(
        "New status",
        choices=options((s, s.replace("_", " ")) for s in STATUSES),
        validate_choice=False,
    )


class TransferForm(FlaskForm):
    team = SelectField("Team", validate_choice=False)
    reason = StringField("Reason", validators=[DataRequired(), Length(min=5, max=300)])


class BreakGlassForm(FlaskForm):
    reason = TextAreaField("Reason", validators=[DataRequired(), Length(min=10, max=300)])


class SearchForm(FlaskForm):
    reference = StringField("Reference", validators=[Optional(), Length(max=20)])
    phone = StringField("Phone", validators=[Optional(), Length(max=40)])
    last_name = StringField("Last name", validators=[Optional(), Length(max=60)])
    date_of_birth = StringField("Date of birth", validators=[Optional(), Length(max=10)])


class BulkForm(FlaskForm):
    """The queue's bulk actions; the ticked requests come as repeated ``reference`` fields."""

    action = HiddenField()
    assignee = SelectField("Assign to", validate_choice=False)
    team = SelectField("Transfer to team", validate_choice=False)
    reason = StringField("Reason for the transfer", validators=[Optional(), Length(max=300)])
    confirm = HiddenField()
