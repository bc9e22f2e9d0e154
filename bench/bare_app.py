"""The bare baseline for ``bench/pipeline.py``: Flask and Flask-WTF with the refill form's fields.

It renders the same fields with WTForms widgets in a Jinja page, checks the CSRF token and the
same required answers, and answers a valid POST with a 303 to a thanks page, as Intake does. It
stores nothing, seals nothing and publishes nothing: what is left is the price of the web stack
itself, served by the same gunicorn settings under the same load.

    gunicorn --workers 2 'bench.bare_app:create_app()'
"""

from __future__ import annotations

import os
import secrets

from flask import Flask, redirect, render_template_string, url_for
from flask_wtf import FlaskForm
from flask_wtf.csrf import CSRFProtect
from werkzeug.wrappers import Response
from wtforms import BooleanField, HiddenField, RadioField, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Email, Optional

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Refill</title></head>
<body><main><h1>Request a refill</h1>
<form method="post" novalidate>
{{ form.csrf_token }}{{ form.rendered_at }}
{% for field in form if field.type not in ("CSRFTokenField", "HiddenField") %}
<p>{{ field.label }} {{ field() }}
{% for error in field.errors %}<span role="alert">{{ error }}</span>{% endfor %}</p>
{% endfor %}
<button type="submit">Send</button>
</form></main></body></html>
"""

THANKS = "<!doctype html><html lang='en'><title>Thanks</title><p>Thank you.</p></html>"


class RefillForm(FlaskForm):
    first_name = StringField("First name", validators=[DataRequired()])
    last_name = StringField("Last name", validators=[DataRequired()])
    date_of_birth = StringField("Date of birth", validators=[DataRequired()])
    phone = StringField("Phone number", validators=[DataRequired()])
    email = StringField(
        "E-mail (optional)", validators=[Optional(), Email(check_deliverability=False)]
    )
    contact_method = RadioField(
        "How should we contact you?",
        choices=[("sms", "Text"), ("phone", "Call"), ("email", "E-mail")],
    )
    rx_numbers = TextAreaField("Prescription numbers", validators=[DataRequired()])
    medication = StringField("Medication name (optional)")
    location = SelectField("Pharmacy location", choices=[("main", "Main"), ("north", "North")])
    fulfillment = RadioField(
        "Pickup or delivery", choices=[("pickup", "Pickup"), ("delivery", "Delivery")]
    )
    address = TextAreaField("Delivery or shipping address")
    needed_by = StringField("Needed by (optional)")
    notes = TextAreaField("Anything else we should know? (optional)")
    consent_privacy = BooleanField("I have read the privacy notice.", validators=[DataRequired()])
    consent_contact = BooleanField("I agree to be contacted.", validators=[DataRequired()])
    extra_comments = StringField("Leave this field empty")
    rendered_at = HiddenField(default="stamp")


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = os.environ.get("BENCH_SECRET_KEY") or secrets.token_urlsafe(32)
    CSRFProtect(app)

    @app.route("/refill", methods=["GET", "POST"])
    def refill() -> Response | str | tuple[str, int]:
        form = RefillForm()
        if form.validate_on_submit():
            return redirect(url_for("thanks"), 303)
        status = 400 if form.is_submitted() else 200
        return render_template_string(PAGE, form=form), status

    @app.route("/thanks")
    def thanks() -> str:
        return THANKS

    return app
