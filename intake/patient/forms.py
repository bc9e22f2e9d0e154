"""Patient forms: validate, then normalize what will be sealed.

Every message is a module constant in the gettext catalog so it reaches the patient in the
page's language. Validators never echo the submitted value back in a message.
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from typing import Any

from email_validator import EmailNotValidError, validate_email
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import BooleanField, HiddenField, RadioField, SelectField, StringField, TextAreaField
from wtforms.validators import ValidationError

from intake.forms import PHONE_INVALID as PHONE_INVALID  # re-exported: a patient form message
from intake.forms import clean_phone, options
from intake.requests.locations import interpreter_choices, location_choices

REQUIRED = _l("This field is required.")
FIRST_NAME_NEEDED = _l("Enter your first name.")
LAST_NAME_NEEDED = _l("Enter your last name.")
DOB_NEEDED = _l("Enter your date of birth.")
PHONE_NEEDED = _l("Enter your phone number.")
LOCATION_NEEDED = _l("Choose the pharmacy location.")
TOPIC_NEEDED = _l("Choose what your request is about.")
MESSAGE_NEEDED = _l("Write your question or request.")
NAME_INVALID = _l("Use letters only (spaces, hyphens, apostrophes and periods are fine).")
NAME_TOO_LONG = _l("Use at most 60 characters.")
DATE_INVALID = _l("Enter a real date as YYYY-MM-DD.")
DOB_FUTURE = _l("The date of birth must be in the past.")
DOB_TOO_OLD = _l("The date of birth cannot be more than 120 years ago.")
EMAIL_INVALID = _l("Enter a valid e-mail address, for example name@example.com.")
EMAIL_NEEDED = _l("Enter an e-mail address so we can contact you by e-mail.")
RX_NONE = _l("Enter at least one prescription number.")
RX_TOO_MANY = _l("Enter at most 10 prescription numbers.")
RX_INVALID = _l("Each prescription number has 6 to 12 digits or dashes, one per line.")
ADDRESS_NEEDED = _l("Enter the address for delivery or shipping.")
TOO_LONG = _l("This is too long.")
NEEDED_BY_PAST = _l("Choose today or a later date.")
NEEDED_BY_FAR = _l("Choose a date within the next 12 months.")
CONSENT_PRIVACY_NEEDED = _l(
    "Accept the Terms of Use, the Privacy Policy and the Notice of Privacy Practices to send "
    "your request."
)
CONSENT_CONTACT_NEEDED = _l("Agree to be contacted about this request to send it.")
CHOICE_INVALID = _l("Choose one of the options.")
INTERPRETER_LANGUAGE_NEEDED = _l("Choose the language you need an interpreter for.")

NAME_PUNCTUATION = set(" '-.’")
RX_RE = re.compile(r"^[0-9][0-9-]{4,10}[0-9]$")
MAX_AGE_YEARS = 120
# No field of a patient form needs more (the longest, the message, allows 4,000).
MAX_CHARS = 5000


# C0 control characters other than tab and newline: never meant by a patient, and a NUL cannot
# be stored in PostgreSQL text. They are dropped before validation.
_CONTROL = dict.fromkeys([*range(0, 9), 11, 12, *range(14, 32), 127])


def _strip(value: Any) -> Any:
    return value.translate(_CONTROL).strip() if isinstance(value, str) else value


def _unix_newlines(value: Any) -> Any:
    """Browsers count a line break as one character for maxlength but send it as CRLF."""
    if not isinstance(value, str):
        return value
    return value.replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL)


def _required(field: Any, message: Any = REQUIRED) -> str:
    value = (field.data or "").strip() if isinstance(field.data, str) else field.data
    if not value:
        raise ValidationError(message)
    return str(value)


def clean_name(field: Any, message: Any = REQUIRED) -> str:
    value = re.sub(r"\s+", " ", _required(field, message))
    if len(value) > 60:
        raise ValidationError(NAME_TOO_LONG)
    if not any(c.isalpha() for c in value) or not all(
        c.isalpha() or c in NAME_PUNCTUATION for c in value
    ):
        raise ValidationError(NAME_INVALID)
    return value


def parse_date(text: str) -> date:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise ValidationError(DATE_INVALID)
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValidationError(DATE_INVALID) from None


def clean_dob(text: str, today: date) -> str:
    born = parse_date(text)
    if born >= today:
        raise ValidationError(DOB_FUTURE)
    try:
        oldest = today.replace(year=today.year - MAX_AGE_YEARS)
    except ValueError:  # 29 February
        oldest = today.replace(year=today.year - MAX_AGE_YEARS, day=28)
    if born < oldest:
        raise ValidationError(DOB_TOO_OLD)
    return born.isoformat()


def clean_email(text: str) -> str:
    try:
        return validate_email(text, check_deliverability=False).normalized
    except EmailNotValidError:
        raise ValidationError(EMAIL_INVALID) from None


MAX_RX_NUMBERS = 10
LINE_RE = re.compile(r"[^\r\n]+")


def rx_lines(text: str) -> Any:
    """The non-blank lines of ``text``, read lazily so a caller can stop early."""
    return (match.group().strip() for match in LINE_RE.finditer(text))


def clean_rx_numbers(text: str) -> list[str]:
    """One number per line, duplicates dropped, at most ten.

    Why lazily and with a set: a pasted (or hostile) list of 40,000 lines used to be compared
    line by line against every line before it, seconds of CPU for one unauthenticated request.
    Now each line is looked at once, and reading stops at the eleventh distinct number.
    """
    numbers: dict[str, None] = {}
    for item in rx_lines(text or ""):
        if item:
            numbers[item] = None
            if len(numbers) > MAX_RX_NUMBERS:
                raise ValidationError(RX_TOO_MANY)
    if not numbers:
        raise ValidationError(RX_NONE)
    if not all(RX_RE.fullmatch(n) for n in numbers):
        raise ValidationError(RX_INVALID)
    return list(numbers)


class PatientForm(FlaskForm):
    """Fields and checks shared by both patient forms."""

    first_name = StringField(_l("First name"), filters=[_strip])
    last_name = StringField(_l("Last name"), filters=[_strip])
    phone = StringField(_l("Phone number"), filters=[_strip])
    email = StringField(_l("E-mail (optional)"), filters=[_strip])
    contact_method = RadioField(
        _l("How should we contact you?"),
        choices=options(
            [("phone", _l("Phone call")), ("sms", _l("Text message")), ("email", _l("E-mail"))]
        ),
        default="phone",
        validate_choice=False,
    )
    # Language help: not PHI and not sealed; the language goes in a plain column for routing.
    interpreter = BooleanField(_l("I need an interpreter"))
    interpreter_language = SelectField(_l("Language I need"), validate_choice=False)
    consent_privacy = BooleanField(
        _l(
            "I have read and accept the Terms of Use, the Privacy Policy and the Notice of "
            "Privacy Practices."
        )
    )
    # The honeypot: hidden from people, screen readers and the keyboard, and named so that no
    # browser's or password manager's autofill has a reason to fill it (unlike "website").
    extra_comments = StringField(_l("Leave this field empty"))
    # The signed form stamp (intake.patient.form_stamp): form, first render time, submission key.
    rendered_at = HiddenField()

    def __init__(self, *args: Any, today: date | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.today = today or date.today()
        self.cleaned: dict[str, Any] = {}
        self.interpreter_needed: str | None = None
        self.interpreter_language.choices = options(
            [("", _l("Choose a language")), *interpreter_choices()]
        )

    def validate(self, extra_validators: Any = None) -> bool:
        """Refuse an oversized field at once, before any validator reads it."""
        oversized = [
            field for field in self if isinstance(field.data, str) and len(field.data) > MAX_CHARS
        ]
        if oversized:
            for field in oversized:
                field.errors = [TOO_LONG]
            return False
        return bool(super().validate(extra_validators))

    # Each validate_<field> stores the normalized value in self.cleaned.
    def validate_first_name(self, field: Any) -> None:
        self.cleaned["first_name"] = clean_name(field, FIRST_NAME_NEEDED)

    def validate_last_name(self, field: Any) -> None:
        self.cleaned["last_name"] = clean_name(field, LAST_NAME_NEEDED)

    def validate_phone(self, field: Any) -> None:
        self.cleaned["phone"] = clean_phone(_required(field, PHONE_NEEDED))

    def validate_email(self, field: Any) -> None:
        if field.data:
            if len(field.data) > 254:
                raise ValidationError(EMAIL_INVALID)
            self.cleaned["email"] = clean_email(field.data)
        elif self.contact_method.data == "email":
            raise ValidationError(EMAIL_NEEDED)

    def validate_contact_method(self, field: Any) -> None:
        if field.data not in ("phone", "sms", "email"):
            raise ValidationError(CHOICE_INVALID)
        self.cleaned["contact_method"] = field.data

    def validate_consent_privacy(self, field: Any) -> None:
        if not field.data:
            raise ValidationError(CONSENT_PRIVACY_NEEDED)

    def validate_interpreter_language(self, field: Any) -> None:
        # Choosing a language asks for an interpreter, ticked box or not: a patient who needs
        # one must never be served in a language they do not speak for a missed tick.
        code = field.data or ""
        if code and code not in dict(interpreter_choices()):
            raise ValidationError(CHOICE_INVALID)
        if self.interpreter.data and not code:
            raise ValidationError(INTERPRETER_LANGUAGE_NEEDED)
        self.interpreter_needed = code or None

    def _optional_text(self, field: Any, name: str, limit: int) -> None:
        value = (field.data or "").strip()
        if len(value) > limit:
            raise ValidationError(TOO_LONG)
        if value:
            self.cleaned[name] = value


class RefillForm(PatientForm):
    date_of_birth = StringField(_l("Date of birth"), filters=[_strip])
    rx_numbers = TextAreaField(_l("Prescription numbers"), filters=[_unix_newlines])
    medication = StringField(_l("Medication name (optional)"), filters=[_strip])
    location = SelectField(_l("Pharmacy location"), validate_choice=False)
    fulfillment = RadioField(
        _l("How would you like to receive your medication?"),
        choices=options(
            [
                ("pickup", _l("Pick up at the pharmacy")),
                ("delivery", _l("Local delivery")),
                ("ship", _l("Ship to my address")),
            ]
        ),
        default="pickup",
        validate_choice=False,
    )
    address = TextAreaField(_l("Delivery or shipping address"), filters=[_unix_newlines])
    needed_by = StringField(_l("Needed by (optional)"), filters=[_strip])
    notes = TextAreaField(_l("Anything else we should know? (optional)"), filters=[_unix_newlines])
    consent_contact = BooleanField(_l("I agree to be contacted about this request."))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.location.choices = options([("", _l("Choose a location")), *location_choices()])

    def validate_date_of_birth(self, field: Any) -> None:
        self.cleaned["date_of_birth"] = clean_dob(_required(field, DOB_NEEDED), self.today)

    def validate_rx_numbers(self, field: Any) -> None:
        self.cleaned["rx_numbers"] = clean_rx_numbers(field.data or "")

    def validate_medication(self, field: Any) -> None:
        self._optional_text(field, "medication", 100)

    def validate_location(self, field: Any) -> None:
        if not field.data:
            raise ValidationError(LOCATION_NEEDED)
        if field.data not in dict(location_choices()):
            raise ValidationError(CHOICE_INVALID)

    def validate_fulfillment(self, field: Any) -> None:
        if field.data not in ("pickup", "delivery", "ship"):
            raise ValidationError(CHOICE_INVALID)
        self.cleaned["fulfillment"] = field.data

    def validate_address(self, field: Any) -> None:
        value = re.sub(r"[ \t]+", " ", (field.data or "").strip())
        if len(value) > 300:
            raise ValidationError(TOO_LONG)
        if self.fulfillment.data in ("delivery", "ship") and not value:
            raise ValidationError(ADDRESS_NEEDED)
        # Kept only when it is used: an address typed, then hidden by choosing pick-up, is not.
        if value and self.fulfillment.data in ("delivery", "ship"):
            self.cleaned["address"] = value

    def validate_needed_by(self, field: Any) -> None:
        if not field.data:
            return
        wanted = parse_date(field.data)
        if wanted < self.today:
            raise ValidationError(NEEDED_BY_PAST)
        if wanted > self.today + timedelta(days=366):
            raise ValidationError(NEEDED_BY_FAR)
        self.cleaned["needed_by"] = wanted.isoformat()

    def validate_notes(self, field: Any) -> None:
        self._optional_text(field, "notes", 2000)

    def validate_consent_contact(self, field: Any) -> None:
        if not field.data:
            raise ValidationError(CONSENT_CONTACT_NEEDED)


TOPICS = [
    ("question", _l("A question about my medication or order")),
    ("copay", _l("Help paying for my medication (copay assistance)")),
    ("specialist", _l("Talk with an IVIG specialist")),
    ("insurance", _l("Insurance or billing")),
    ("transfer", _l("Transfer a prescription to or from this pharmacy")),
    ("side_effect", _l("Report a side effect")),
]


class ContactForm(PatientForm):
    # Required, as on the refill form: with the reference it is how the patient checks the
    # status of the request, and how staff find the patient's records.
    date_of_birth = StringField(_l("Date of birth"), filters=[_strip])
    topic = SelectField(
        _l("What is this about?"),
        choices=options([("", _l("Choose a topic")), *TOPICS]),
        validate_choice=False,
    )
    message = TextAreaField(_l("Your message"), filters=[_unix_newlines])
    callback_time = StringField(_l("Best time to call you back (optional)"), filters=[_strip])

    def validate_date_of_birth(self, field: Any) -> None:
        self.cleaned["date_of_birth"] = clean_dob(_required(field, DOB_NEEDED), self.today)

    def validate_topic(self, field: Any) -> None:
        if not field.data:
            raise ValidationError(TOPIC_NEEDED)
        if field.data not in dict(TOPICS):
            raise ValidationError(CHOICE_INVALID)

    def validate_message(self, field: Any) -> None:
        value = _required(field, MESSAGE_NEEDED).strip()
        if len(value) > 4000:
            raise ValidationError(TOO_LONG)
        self.cleaned["message"] = value

    def validate_callback_time(self, field: Any) -> None:
        self._optional_text(field, "callback_time", 100)


class StatusForm(FlaskForm):
    reference = StringField(_l("Reference number"), filters=[_strip])
    date_of_birth = StringField(_l("Date of birth"), filters=[_strip])

    def __init__(self, *args: Any, today: date | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.today = today or date.today()

    def validate_reference(self, field: Any) -> None:
        from intake.requests.references import normalize_reference

        normalized = normalize_reference(_required(field, REFERENCE_INVALID))
        if normalized is None:
            raise ValidationError(REFERENCE_INVALID)
        field.data = normalized

    def validate_date_of_birth(self, field: Any) -> None:
        field.data = clean_dob(_required(field, DOB_NEEDED), self.today)


REFERENCE_INVALID = _l("Enter the reference number we gave you, like R-7K3M-Q9P2.")
