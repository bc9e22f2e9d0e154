"""Form pieces the wings share: select options, and phone numbers read the way patients type them.

The patient, staff and compliance wings each keep their own forms; what two of them need lives
here, so that no wing imports another.
"""

from __future__ import annotations

from typing import Any

import phonenumbers
from flask_babel import lazy_gettext as _l
from wtforms.fields.choices import SelectChoice
from wtforms.validators import ValidationError

PHONE_INVALID = _l("Enter a valid phone number, for example 555-123-4567.")


def options(pairs: Any) -> list[SelectChoice]:
    return [SelectChoice(value, label) for value, label in pairs]


def clean_phone(text: str) -> str:
    try:
        number = phonenumbers.parse(text, "US")
    except phonenumbers.NumberParseException:
        raise ValidationError(PHONE_INVALID) from None
    if not phonenumbers.is_valid_number(number):
        raise ValidationError(PHONE_INVALID)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
