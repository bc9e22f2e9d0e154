"""Patient pages: landing, refill and contact forms, thanks, status look-up."""

from __future__ import annotations

import time
from typing import Any

import structlog
from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_babel import lazy_gettext as _l
from flask_wtf.csrf import CSRFError
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from intake import outbox
from intake.consents import current_consent
from intake.extensions import csrf, db, limiter
from intake.i18n import current_language
from intake.patient.forms import ContactForm, PatientForm, RefillForm
from intake.phi import ip_pseudonym
from intake.references import REFERENCE_RE, new_reference
from intake.submissions import Submission, submit_request

log = structlog.get_logger(__name__)
bp = Blueprint("patient", __name__, template_folder="templates")

FORM_STALE = _l(
    "This form was open for a long time, so for your safety we did not send it. "
    "Please check your answers and send it again."
)
FORM_HAS_ERRORS = _l("Please correct the highlighted fields.")

REFILL_ORDER = (
    "first_name",
    "last_name",
    "date_of_birth",
    "phone",
    "email",
    "contact_method",
    "rx_numbers",
    "medication",
    "location",
    "fulfillment",
    "address",
    "needed_by",
    "notes",
    "consent_privacy",
    "consent_contact",
)
CONTACT_ORDER = (
    "first_name",
    "last_name",
    "date_of_birth",
    "phone",
    "email",
    "contact_method",
    "topic",
    "message",
    "callback_time",
    "consent_privacy",
)
FORMS: dict[str, tuple[type[PatientForm], str, tuple[str, ...]]] = {
    "refill": (RefillForm, "patient/refill.html", REFILL_ORDER),
    "contact": (ContactForm, "patient/contact.html", CONTACT_ORDER),
}


def _settings() -> Any:
    return current_app.extensions["intake.settings"]


def _submit_limit() -> str:
    return str(_settings().submit_rate_limit)


def _render_stamp() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.secret_key or "", salt="intake.form-rendered")


def _render(kind: str, form: PatientForm, status: int = 200, notice: Any = None) -> Any:
    _form_class, template, order = FORMS[kind]
    form.rendered_at.data = _render_stamp().dumps(kind)
    first_error = next((name for name in order if form[name].errors), None)
    language = current_language()
    consents = {"privacy": current_consent("privacy", language)}
    if kind == "refill":
        consents["contact"] = current_consent("contact", language)
    page = render_template(
        template,
        form=form,
        first_error=first_error,
        consents=consents,
        notice=notice or (FORM_HAS_ERRORS if first_error else None),
    )
    return page, status


def _check_guard(kind: str, form: PatientForm) -> str | None:
    """Return 'bot', 'stale' or None for a form that looks like a person's."""
    if form.website.data:
        return "bot"
    settings = _settings()
    max_age = settings.max_form_age_seconds or None
    try:
        stamped_kind, rendered = _render_stamp().loads(
            form.rendered_at.data or "", max_age=max_age, return_timestamp=True
        )
    except SignatureExpired:
        return "stale"
    except BadSignature:
        return "stale"
    if stamped_kind != kind:
        return "stale"
    if time.time() - rendered.timestamp() < settings.min_fill_seconds:
        return "bot"
    return None


def _client_ip_hmac() -> str | None:
    return ip_pseudonym(current_app.extensions["intake.keyring"], request.remote_addr)


def _csrf_failed() -> bool:
    """Check the CSRF token here, after the rate limiter has counted the POST."""
    try:
        csrf.protect()
    except CSRFError as error:
        log.info("csrf_rejected", path=request.path, reason=error.description)
        return True
    return False


def _handle(kind: str) -> ResponseReturnValue:
    form_class, _template, _order = FORMS[kind]
    if request.method == "GET":
        return _render(kind, form_class())
    if _csrf_failed():
        return rerender_after_csrf_error(kind)
    form = form_class()

    guard = _check_guard(kind, form)
    if guard == "bot":
        reason = "honeypot" if form.website.data else "too_fast"
        log.info("submission_dropped_as_bot", form=kind, reason=reason)
        return render_template("patient/thanks.html", reference=new_reference(kind)), 200
    if guard == "stale":
        form.validate()
        return _render(kind, form, 400, notice=FORM_STALE)
    if not form.validate():
        log.info("submission_invalid", form=kind, fields=sorted(form.errors))
        return _render(kind, form, 400)

    language = current_language()
    consents = [current_consent("privacy", language)]
    if kind == "refill":
        consents.append(current_consent("contact", language))
    data = form.data
    accepted = submit_request(
        db.session,
        current_app.extensions["intake.keyring"],
        Submission(
            kind=kind,
            language=language,
            phi=form.cleaned,
            consents=consents,
            topic=data.get("topic") if kind == "contact" else None,
            location=data.get("location") if kind == "refill" else None,
            ip_hmac=_client_ip_hmac(),
        ),
    )
    published = outbox.publish(db.session, [accepted.outbox_id])
    log.info("request_submitted", reference=accepted.reference, kind=kind, published=published)
    return redirect(url_for("patient.thanks", reference=accepted.reference), 303)


def rerender_after_csrf_error(kind: str) -> ResponseReturnValue:
    """A patient whose form token expired gets the form back (400) with what they typed.

    Nothing is validated: a post without a valid token costs no more than rendering the form,
    however it was made.
    """
    form_class, _template, _order = FORMS[kind]
    # Not validated; rendered with a fresh token, so the page it gives back can be sent.
    return _render(kind, form_class(), 400, notice=FORM_STALE)


PATIENT_FORM_MAX_BYTES = 64 * 1024


@bp.before_request
def limit_body_size() -> None:
    """A patient form is a few KiB; a bigger body is refused (413) before it is parsed."""
    request.max_content_length = PATIENT_FORM_MAX_BYTES
    request.max_form_memory_size = PATIENT_FORM_MAX_BYTES


@bp.get("/")
def index() -> ResponseReturnValue:
    return render_template("patient/index.html")


# The token is checked inside each view (``_csrf_failed``), so that the rate limiter counts
# every POST, a forged one too, before anything reads the body.
@bp.route("/refill", methods=["GET", "POST"])
@csrf.exempt
@limiter.limit(_submit_limit, methods=["POST"])
def refill() -> ResponseReturnValue:
    return _handle("refill")


@bp.route("/contact", methods=["GET", "POST"])
@csrf.exempt
@limiter.limit(_submit_limit, methods=["POST"])
def contact() -> ResponseReturnValue:
    return _handle("contact")


@bp.get("/thanks/<reference>")
def thanks(reference: str) -> ResponseReturnValue:
    # The page shows only what is in its address, so it reveals nothing about whether the
    # reference exists.
    if not REFERENCE_RE.match(reference):
        abort(404)
    return render_template("patient/thanks.html", reference=reference)


STATUS_TEXT = {
    "received": _l("We have your request. It is waiting for a member of our team."),
    "in_progress": _l("A member of our pharmacy team is working on your request."),
    "waiting_on_patient": _l("We need to hear from you. Please call the pharmacy."),
    "waiting_on_prescriber": _l("We are waiting for an answer from your prescriber."),
    "completed": _l("Your request is complete."),
    "cancelled": _l("Your request was closed. Please call the pharmacy if you still need help."),
}
STATUS_NOT_FOUND = _l(
    "We could not find a request with that reference number and date of birth. "
    "Please check both and try again, or call the pharmacy."
)


@bp.route("/status", methods=["GET", "POST"])
@csrf.exempt
@limiter.limit(_submit_limit, methods=["POST"])
def status() -> ResponseReturnValue:
    from intake.patient.forms import StatusForm
    from intake.status_lookup import look_up_status

    if request.method == "GET":
        return render_template("patient/status.html", form=StatusForm(), first_error=None)
    if _csrf_failed():
        abort(400)
    form = StatusForm()
    if not form.validate():
        first_error = next((n for n in ("reference", "date_of_birth") if form[n].errors), None)
        return render_template(
            "patient/status.html", form=form, first_error=first_error, notice=FORM_HAS_ERRORS
        ), 400
    found = look_up_status(
        db.session,
        current_app.extensions["intake.keyring"],
        form.reference.data,
        form.date_of_birth.data,
        _client_ip_hmac(),
    )
    log.info("status_looked_up", found=found is not None)
    return render_template(
        "patient/status.html",
        form=form,
        first_error=None,
        result=STATUS_TEXT[found] if found else STATUS_NOT_FOUND,
        found=found is not None,
    )
