"""Patient pages: landing, refill and contact forms, thanks, status look-up."""

from __future__ import annotations

import secrets
import threading
import time
from datetime import timedelta
from typing import Any

import structlog
from flask import (
    Blueprint,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_babel import lazy_gettext as _l
from flask_wtf.csrf import CSRFError, validate_csrf
from markupsafe import escape
from wtforms.validators import ValidationError

from intake.clock import now
from intake.crypto.phi import client_pseudonym, ip_pseudonym
from intake.extensions import csrf, db, limiter
from intake.i18n import current_language, format_moment, language_switch_requested
from intake.ops import metrics
from intake.patient import receipts
from intake.patient.form_stamp import FormStamp, new_stamp, read_stamp
from intake.patient.forms import TOPICS, ContactForm, PatientForm, RefillForm
from intake.requests import outbox
from intake.requests.consents import accepted_consents, form_consents
from intake.requests.references import REFERENCE_RE, new_reference
from intake.requests.submit import Submission, find_submission, same_as_first, submit_request

log = structlog.get_logger(__name__)
bp = Blueprint("patient", __name__, template_folder="templates")

FORM_STALE = _l(
    "This form was open for a long time, so for your safety we did not send it. "
    "Please check your answers and send it again."
)
FORM_HAS_ERRORS = _l("Please correct the highlighted fields.")
FORM_SEND_AGAIN = _l("We did not send your form yet. Please check your answers and send it again.")
FORM_ALREADY_SENT = _l(
    "This form was already sent with other answers, so we did not send it again. To change "
    "the request you sent, please call us at %(phone)s. To send these answers as a new "
    "request, check them and send the form again."
)

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
    "interpreter",
    "interpreter_language",
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
    "interpreter",
    "interpreter_language",
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


def _is_language_switch() -> bool:
    """A language switch re-renders the form and stores nothing: not a submission to limit.

    Only a switch that carries a valid CSRF token is exempt, so a forged POST that claims to be
    a switch is still counted like every other.
    """
    if language_switch_requested() is None:
        return False
    try:
        validate_csrf(request.form.get("csrf_token"))
    except ValidationError:
        return False
    return True


def _render(kind: str, form: PatientForm, status: int = 200, notice: Any = None) -> Any:
    form.rendered_at.data = _carried_stamp(kind, form).token
    return _page(kind, form, notice), status


# A blank form is the same page for everyone who opens it in one language, but for its CSRF
# token and its stamp; rendering its fields costs more than the rest of a submission's web
# work, so each process renders it once a minute with two slots and fills them per visitor.
# The key is bounded (form, language, a known topic): a query string cannot grow it.
BLANK_PAGE_SECONDS = 60.0
_SLOT = secrets.token_hex(16)
CSRF_SLOT, STAMP_SLOT = f"csrf-{_SLOT}", f"stamp-{_SLOT}"
_blank_lock = threading.Lock()


def _blank_pages() -> dict[tuple[str, str, str | None], tuple[float, str]]:
    """This app's cache (each app has its own pharmacy, so its own pages)."""
    return current_app.extensions.setdefault("intake.blank_pages", {})  # type: ignore[no-any-return]


def _render_blank(kind: str, form: PatientForm) -> Any:
    """The blank form (``_render`` of a form nobody filled), from the process's page cache."""
    token, stamp = form.csrf_token.current_token, new_stamp(kind).token
    key = (kind, current_language(), form.data.get("topic") if kind == "contact" else None)
    moment = time.monotonic()
    pages = _blank_pages()
    cached = pages.get(key)
    if cached is None or moment - cached[0] > BLANK_PAGE_SECONDS:
        form.csrf_token.current_token, form.rendered_at.data = CSRF_SLOT, STAMP_SLOT
        page = _page(kind, form, None)
        if page.count(CSRF_SLOT) != 1 or page.count(STAMP_SLOT) != 1:
            raise RuntimeError(f"the blank {kind} page must hold one CSRF token and one stamp")
        cached = (moment, page)
        with _blank_lock:
            pages[key] = cached
    page = cached[1].replace(CSRF_SLOT, str(escape(token))).replace(STAMP_SLOT, str(escape(stamp)))
    return page, 200


def _page(kind: str, form: PatientForm, notice: Any) -> str:
    _form_class, template, order = FORMS[kind]
    first_error = next((name for name in order if form[name].errors), None)
    return render_template(
        template,
        form=form,
        first_error=first_error,
        error_summary=error_summary(form, order),
        consents=form_consents(kind, current_language()),
        notice=notice,
        language_switch=True,
    )


def error_summary(form: PatientForm, order: tuple[str, ...]) -> list[tuple[str, str]]:
    """(id of the control to focus, message) for each field in error, in page order."""
    summary = []
    for name in order:
        field = form[name]
        if field.errors:
            target = f"{field.id}-0" if field.type == "RadioField" else field.id
            summary.append((target, str(field.errors[0])))
    return summary


def _preselect(kind: str, form: PatientForm) -> PatientForm:
    """A call to action's ``?topic=`` chooses the contact form's topic (only a known one)."""
    topic = request.args.get("topic")
    if kind == "contact" and topic in dict(TOPICS):
        form["topic"].data = topic
    return form


def _carried_stamp(kind: str, form: PatientForm) -> FormStamp:
    """The stamp the form came with while it is good for this form, else a new one.

    Carrying it through every re-render keeps the fill time and the submission key of the
    patient's first view of the form.
    """
    stamp = read_stamp(form.rendered_at.data, kind)
    if stamp is None:
        return new_stamp(kind)
    if stamp.rendered_at > now():
        # Signed by us, yet dated later than now: this server's clock is behind the one that
        # rendered it (another machine, or a clock stepped back). Carried as it is, it would be
        # "too fast" on every send for as long as the gap; re-dated to now, with its key, the
        # patient's next send a moment later goes through and is still recognised if repeated.
        return new_stamp(kind, shown_at=now(), key=stamp.key)
    if _expired(stamp):
        # A genuine form open for hours was filled by a person: its replacement counts as
        # filled already, so sending it again at once is not "too fast".
        filled = now() - timedelta(seconds=_settings().min_fill_seconds)
        return new_stamp(kind, shown_at=filled)
    return stamp


def _expired(stamp: FormStamp) -> bool:
    max_age = _settings().max_form_age_seconds
    return bool(max_age) and stamp.age_seconds() > max_age


def _decided(kind: str, outcome: str, **details: Any) -> None:
    """Count one decision on a patient form (no PHI: form, outcome, field names, reference)."""
    log.info("submission_decision", form=kind, outcome=outcome, **details)
    metrics.SUBMISSIONS.labels(kind, outcome).inc()


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
        return _render_blank(kind, _preselect(kind, form_class()))
    if _csrf_failed():
        return rerender_after_csrf_error(kind)
    form = form_class()
    if language_switch_requested():
        log.info("form_language_switched", form=kind)
        return _render(kind, form)

    if form.extra_comments.data:
        # Only a bot fills a field no person can see: it gets a decoy, and nothing is stored.
        _decided(kind, "honeypot")
        return render_template("patient/thanks.html", reference=new_reference(kind)), 200
    keyring = current_app.extensions["intake.keyring"]
    stamp = read_stamp(form.rendered_at.data, kind)
    if stamp is not None:
        first = find_submission(db.session, keyring, stamp.key)
        if first is not None:
            if not (form.validate() and same_as_first(db.session, keyring, first, form.cleaned)):
                return _already_sent(kind, form)
            _decided(kind, "duplicate", reference=first.reference)
            # The thanks page's summary, if this browser lost the first answer.
            receipts.remember(kind, form, first.reference, current_language(), keep_existing=True)
            return redirect(url_for("patient.thanks", reference=first.reference), 303)
    if stamp is None or _expired(stamp):
        _decided(kind, "stale", reason="expired" if stamp else "no_stamp")
        form.validate()
        return _render(kind, form, 400, notice=FORM_STALE if stamp else FORM_SEND_AGAIN)
    if stamp.age_seconds() < _settings().min_fill_seconds:
        # Sooner than a person fills a form: perhaps a bot, perhaps autofill. The form goes back
        # with its stamp, so sending it again a moment later is accepted.
        _decided(kind, "too_fast")
        form.validate()
        return _render(kind, form, 400, notice=FORM_SEND_AGAIN)
    if not form.validate():
        _decided(kind, "invalid", fields=sorted(form.errors))
        return _render(kind, form, 400)

    language = current_language()
    consents = accepted_consents(kind, language)
    data = form.data
    accepted = submit_request(
        db.session,
        keyring,
        Submission(
            kind=kind,
            language=language,
            phi=form.cleaned,
            consents=consents,
            topic=data.get("topic") if kind == "contact" else None,
            location=data.get("location") if kind == "refill" else None,
            interpreter_language=form.interpreter_needed,
            ip_hmac=_client_ip_hmac(),
            submission_key=stamp.key,
        ),
    )
    if accepted.duplicate:
        # The same form, sent again while the first was being stored: the first one's answer.
        if not same_as_first(db.session, keyring, accepted, form.cleaned):
            return _already_sent(kind, form)
        _decided(kind, "duplicate", reference=accepted.reference, raced=True)
    else:
        published = outbox.publish_outgoing(db.session, accepted.outgoing)
        _decided(kind, "accepted", reference=accepted.reference, published=published)
    receipts.remember(kind, form, accepted.reference, language, keep_existing=accepted.duplicate)
    return redirect(url_for("patient.thanks", reference=accepted.reference), 303)


def _already_sent(kind: str, form: PatientForm) -> ResponseReturnValue:
    """Other answers under a key already used: the form back, never the first one's reference.

    The first request stays as it was (staff work it; a change goes by phone). The form comes
    back with a new stamp (a new key, counted as filled), so sending it again is a deliberate
    new request, not taken for the first one.
    """
    _decided(kind, "key_reused", fields=sorted(form.errors))
    filled = now() - timedelta(seconds=_settings().min_fill_seconds)
    form.rendered_at.data = new_stamp(kind, shown_at=filled).token
    pharmacy = current_app.extensions["intake.pharmacy"]
    notice = str(FORM_ALREADY_SENT) % {"phone": pharmacy.phone.display}
    return _render(kind, form, 400, notice=notice)


def rerender_after_csrf_error(kind: str) -> ResponseReturnValue:
    """A patient whose form token expired gets the form back (400) with what they typed.

    Nothing is validated: a post without a valid token costs no more than rendering the form,
    however it was made.
    """
    form_class, _template, _order = FORMS[kind]
    _decided(kind, "stale", reason="csrf")
    # Not validated; rendered with a fresh token, so the page it gives back can be sent, and
    # with the stamp it came with, so its fill time and submission key are kept.
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
@limiter.limit(_submit_limit, methods=["POST"], exempt_when=_is_language_switch)
def refill() -> ResponseReturnValue:
    return _handle("refill")


@bp.route("/contact", methods=["GET", "POST"])
@csrf.exempt
@limiter.limit(_submit_limit, methods=["POST"], exempt_when=_is_language_switch)
def contact() -> ResponseReturnValue:
    return _handle("contact")


@bp.get("/thanks/<reference>")
def thanks(reference: str) -> ResponseReturnValue:
    # The page shows what is in its address, and a summary only to the browser that sent the
    # request (kept in its own signed session), so it reveals nothing about whether the
    # reference exists.
    if not REFERENCE_RE.match(reference):
        abort(404)
    from intake.requests.locations import location_choices

    return render_template(
        "patient/thanks.html",
        reference=reference,
        receipt=receipts.recall(reference),
        topic_labels=dict(TOPICS),
        location_names=dict(location_choices()),
    )


@bp.get("/legal/<document>")
@bp.get("/legal/<document>/<version>")
def legal(document: str, version: str | None = None) -> ResponseReturnValue:
    """A consent document on its own page, in the page's language (any published version)."""
    from intake.requests.consents import DOCUMENTS, library

    texts = library()
    if document not in DOCUMENTS:
        abort(404)
    version = version or texts.current[document]
    try:
        text = texts.text(document, version, current_language())
    except LookupError:
        abort(404)
    return render_template(
        "patient/legal.html",
        text=text,
        is_current=version == texts.current[document],
        current_version=texts.current[document],
    )


@bp.get("/favicon.ico")
def favicon() -> ResponseReturnValue:
    return current_app.send_static_file("favicon.ico")


STATUS_TEXT = {
    "received": _l("We have your request. It is waiting for a member of our team."),
    "in_progress": _l("A member of our pharmacy team is working on your request."),
    "waiting_on_patient": _l("We need to hear from you. Please call the pharmacy."),
    "waiting_on_prescriber": _l("We are waiting for an answer from your prescriber."),
    "completed": _l("Your request is complete."),
    "cancelled": _l("Your request was closed. Please call the pharmacy if you still need help."),
}
NOTHING_TO_DO = _l("You do not need to do anything now. We will contact you the way you chose.")
NEXT_STEP = {
    "received": NOTHING_TO_DO,
    "in_progress": NOTHING_TO_DO,
    "waiting_on_patient": _l(
        "Please call us as soon as you can, and have your reference number ready."
    ),
    "waiting_on_prescriber": _l(
        "You do not need to do anything now. If your medication is urgent, you can ask your "
        "prescriber's office to call us."
    ),
    "completed": _l(
        "If you have a question about this request, call us with your reference number."
    ),
    "cancelled": _l("If you still need this, call us or send a new request."),
}
# How the answer is framed: only a finished request looks like success, and a request waiting
# on the patient asks for attention.
STATUS_TONE = {"completed": "success", "waiting_on_patient": "warning", "cancelled": "warning"}
STATUSES_TO_CALL_ABOUT = ("waiting_on_patient", "completed", "cancelled")
KIND_TEXT = {"refill": _l("Prescription refill"), "contact": _l("Request to contact you")}
STATUS_THROTTLED = _l(
    "There were too many tries with this reference number, so for your safety we stopped "
    "checking it for a while. Please call us, or try again later."
)
STATUS_NOT_FOUND = _l(
    "We could not find a request with that reference number and date of birth. "
    "Please check both and try again, or call the pharmacy."
)


@bp.route("/status", methods=["GET", "POST"])
@csrf.exempt
@limiter.limit(_submit_limit, methods=["POST"])
def status() -> ResponseReturnValue:
    from intake.patient.forms import TOPICS, StatusForm
    from intake.requests.status_lookup import Throttled, look_up_status

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
    keyring = current_app.extensions["intake.keyring"]
    found = look_up_status(
        db.session,
        keyring,
        form.reference.data,
        form.date_of_birth.data,
        _client_ip_hmac(),
        client=client_pseudonym(keyring, request.remote_addr),
    )
    if isinstance(found, Throttled):
        log.info("status_looked_up", found=False, throttled=True)
        page = render_template(
            "patient/status.html", form=form, first_error=None, throttled=STATUS_THROTTLED
        )
        return page, 429, {"Retry-After": str(found.retry_after_seconds)}
    log.info("status_looked_up", found=found is not None)
    session.pop(PROOF_GRANT, None)
    if found is None:
        return render_template(
            "patient/status.html", form=form, first_error=None, not_found=STATUS_NOT_FOUND
        )
    answer = {
        "reference": form.reference.data,
        "status": found.status,
        "headline": STATUS_TEXT[found.status],
        "next_step": NEXT_STEP[found.status],
        "tone": STATUS_TONE.get(found.status),
        "call_us": found.status in STATUSES_TO_CALL_ABOUT,
        "kind": KIND_TEXT.get(found.kind, found.kind),
        "topic": dict(TOPICS).get(found.topic) if found.topic else None,
        "received_at": found.received_at,
        "received": format_moment(found.received_at),
        "changed_at": found.changed_at,
        "changed": format_moment(found.changed_at),
        "openings": [
            {
                "at": opening.at,
                "when": format_moment(opening.at),
                "team": opening.team,
                "emergency": opening.emergency,
            }
            for opening in found.openings
        ],
    }
    _grant_proof(form.reference.data)
    return render_template("patient/status.html", form=form, first_error=None, answer=answer)


# -- the proof of who opened the request ------------------------------------------------------
#
# Why: the download must not put the reference or date of birth in an address (addresses end
# up in logs and browser history), nor let anyone fetch a proof for a reference they merely
# know. A successful look-up writes the reference into this browser's own signed session
# cookie, good for PROOF_GRANT_SECONDS; the download is a POST with the page's CSRF token that
# reads it from there. The cookie is signed, so it cannot be pointed at another request.

PROOF_GRANT = "status_proof"
PROOF_GRANT_SECONDS = 600
PROOF_EXPIRED = _l(
    "For your safety, the download is only available for a few minutes after you check your "
    "request. Please enter your reference number and date of birth again."
)
PROOF_NOT_READY = _l(
    "The proof for your request is not ready yet: the pharmacy signs its records every few "
    "minutes. Please try again later."
)


def _grant_proof(reference: str) -> None:
    session[PROOF_GRANT] = {
        "reference": reference,
        "until": int(now().timestamp()) + PROOF_GRANT_SECONDS,
    }


def _granted_reference() -> str | None:
    grant = session.get(PROOF_GRANT)
    if not isinstance(grant, dict):
        return None
    reference, until = grant.get("reference"), grant.get("until")
    if not isinstance(reference, str) or not isinstance(until, int):
        return None
    if until < now().timestamp():
        session.pop(PROOF_GRANT, None)
        return None
    return reference


@bp.post("/status/proof")
@csrf.exempt
@limiter.limit(_submit_limit)
def status_proof() -> ResponseReturnValue:
    """Download the proof of the request's audit events (public fields only), and audit it."""
    from intake.patient.forms import StatusForm

    if _csrf_failed():
        abort(400)
    reference = _granted_reference()
    if reference is None:
        log.info("status_proof_downloaded", outcome="expired")
        return render_template(
            "patient/status.html", form=StatusForm(), first_error=None, notice=PROOF_EXPIRED
        ), 403
    from intake.audit.proofs import ProofUnavailable, patient_proof

    try:
        proof = patient_proof(db.session, _settings(), reference, ip_hmac=_client_ip_hmac())
    except ProofUnavailable:
        db.session.rollback()
        log.info("status_proof_downloaded", outcome="not_ready")
        return render_template(
            "patient/status.html", form=StatusForm(), first_error=None, notice=PROOF_NOT_READY
        )
    log.info("status_proof_downloaded", outcome="success", events=len(proof.events))
    return current_app.response_class(
        proof.to_json(),
        mimetype="application/json",
        headers={"Content-Disposition": f'attachment; filename="{proof.filename}"'},
    )
