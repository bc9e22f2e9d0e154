"""Compliance pages: dashboard, audit search and export, access and activity reports,
break-glass review, anomalies, verification. For the ``compliance`` role only."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

import structlog
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user
from sqlalchemy import select

from intake.accounts.login import login_manager, refuse_cross_site_views
from intake.audit import anomalies
from intake.clock import now
from intake.compliance import break_glass, charts, dashboard, patients, reports, verification
from intake.compliance.forms import (
    AccessLookupForm,
    AuditFilterForm,
    PatientSearchForm,
    ReviewForm,
    VerifyForm,
)
from intake.extensions import db
from intake.models import User
from intake.requests.references import normalize_reference

log = structlog.get_logger(__name__)
bp = Blueprint("compliance", __name__, url_prefix="/compliance", template_folder="templates")
bp.before_request(refuse_cross_site_views)

ANOMALY_DAYS = (1, 7, 30)
CSV_FLUSH_ROWS = 200
# Cells a spreadsheet would read as a formula are prefixed with an apostrophe (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


# The pages a break-glass reviewer who is not a compliance officer (a supervisor, where the
# pharmacy names supervisors as reviewers) may reach: the review list and the review itself.
REVIEW_ENDPOINTS = ("compliance.break_glass_list", "compliance.review")


def _reviewers() -> tuple[str, ...]:
    return tuple(current_app.extensions["intake.settings"].break_glass_reviewers)


@bp.before_request
def compliance_only() -> ResponseReturnValue | None:
    """Every page here is for compliance officers; anyone else learns nothing (404), except a
    configured break-glass reviewer on the review pages."""
    if not current_user.is_authenticated:
        return login_manager.unauthorized()  # type: ignore[no-any-return]
    if current_user.role == "compliance":
        return None
    if request.endpoint in REVIEW_ENDPOINTS and break_glass.may_review(
        current_user.role, _reviewers()
    ):
        return None
    abort(404)


@bp.app_context_processor
def break_glass_reviewer() -> dict[str, Any]:
    """Lets the staff layout link a supervisor who reviews break-glass to the review page."""
    if not current_user.is_authenticated or current_user.role == "compliance":
        return {"reviews_break_glass": False}
    return {"reviews_break_glass": break_glass.may_review(current_user.role, _reviewers())}


def _team_names() -> dict[str, str]:
    return {t.id: t.name for t in current_app.extensions["intake.routing"].teams.values()}


# -- dashboard --------------------------------------------------------------------------------


@bp.get("/")
def index() -> ResponseReturnValue:
    moment = now()
    _since, flagged = _flagged(moment, 7)
    return render_template(
        "compliance/dashboard.html",
        now=moment,
        pending_reviews=break_glass.pending_count(db.session),
        anomaly_count=len(flagged),
        last_verified=reports.latest_event(db.session, "audit.verified"),
        lookup=AccessLookupForm(formdata=None),
        verify_form=VerifyForm(),
        definition=reports.PHI_VIEW_DEFINITION,
        **dashboard.build(db.session, moment, _team_names()),
    )


# -- audit search, export, verification -------------------------------------------------------


def _audit_filter() -> tuple[AuditFilterForm, reports.AuditFilter | None]:
    form = AuditFilterForm(request.args)
    if not form.validate():
        return form, None
    return form, form.to_filter()


@bp.get("/audit")
def audit() -> ResponseReturnValue:
    form, filt = _audit_filter()
    if filt is None:
        page = reports.AuditPage([], None, None)
        return render_template(
            "compliance/audit.html",
            form=form,
            filt=None,
            page=page,
            columns=reports.AUDIT_COLUMNS,
            verify_form=VerifyForm(),
        ), 400
    before = request.args.get("before", type=int)
    after = request.args.get("after", type=int)
    if any(bound is not None and not reports.seq_in_range(bound) for bound in (before, after)):
        abort(400)
    page = reports.audit_page(db.session, filt, before=before, after=after)
    return render_template(
        "compliance/audit.html",
        form=form,
        filt=filt,
        page=page,
        paged=before is not None or after is not None,
        columns=reports.AUDIT_COLUMNS,
        verify_form=VerifyForm(),
    )


def spreadsheet_safe(cell: str) -> str:
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def csv_chunks(
    rows: Iterable[Any],
    columns: tuple[str, ...] = reports.AUDIT_COLUMNS,
    cells: Any = lambda row: row.cells,
) -> Iterator[str]:
    """The CSV text of ``rows`` under a header line, a few hundred rows at a time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    for count, row in enumerate(rows, start=1):
        writer.writerow([spreadsheet_safe(cell) for cell in cells(row)])
        if count % CSV_FLUSH_ROWS == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


@bp.get("/audit.csv")
def audit_csv() -> ResponseReturnValue:
    """Stream the current filter's events as CSV, after recording the export in the trail."""
    _form, filt = _audit_filter()
    if filt is None:
        abort(400)
    # The export is recorded and committed before a byte is sent: an export that cannot be
    # audited does not happen. It covers the events before its own record.
    up_to = reports.last_seq(db.session)
    actor = current_user.actor()
    actor.record(
        db.session, "audit.exported", None, format="csv", up_to_seq=up_to, **filt.as_details()
    )
    db.session.commit()
    log.info("audit_exported", user_id=actor.user_id, up_to_seq=up_to)
    stamp = now().strftime("%Y%m%dT%H%M%SZ")
    rows = reports.export_rows(db.session, filt, up_to)
    return Response(
        stream_with_context(csv_chunks(rows)),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.csv"'},
    )


@bp.post("/verify")
def verify() -> ResponseReturnValue:
    form = VerifyForm()
    if not form.validate():
        abort(400)
    event = verification.run_officer_verification(
        db.session, current_app.extensions["intake.settings"], current_user.actor()
    )
    return redirect(url_for("compliance.verified", seq=event.seq), 303)


@bp.get("/verify/<int:seq>")
def verified(seq: int) -> ResponseReturnValue:
    """Show the result of a verification, as recorded in its ``audit.verified`` event."""
    row = reports.event_row(db.session, seq)
    if row is None or row.action != "audit.verified":
        abort(404)
    result = row.detail_values
    signed = result.get("last_signed_at")
    signed_at = datetime.fromisoformat(signed) if isinstance(signed, str) else None
    return render_template(
        "compliance/verify.html",
        row=row,
        result=result,
        signed_at=signed_at,
        signed_ago=verification.ago(signed_at, row.created_at) if signed_at else None,
    )


# -- access report ----------------------------------------------------------------------------


@bp.get("/access")
def access_lookup() -> ResponseReturnValue:
    form = AccessLookupForm(request.args)
    if not form.validate():
        return render_template("compliance/access_lookup.html", form=form), 400
    reference = normalize_reference(form.reference.data or "")
    return redirect(url_for("compliance.access", reference=reference), 303)


@bp.get("/access/<reference>")
def access(reference: str) -> ResponseReturnValue:
    normalized = normalize_reference(reference)
    if normalized is None:
        abort(404)
    if normalized != reference:
        return redirect(url_for("compliance.access", reference=normalized), 301)
    report = reports.access_report(db.session, normalized)
    status = 200 if report.request is not None or report.entries else 404
    return render_template(
        "compliance/access.html",
        report=report,
        now=now(),
        teams=_team_names(),
        definition=reports.PHI_VIEW_DEFINITION,
        csv_url=url_for("compliance.access_csv", reference=normalized),
        search_url=url_for("compliance.audit", reference=normalized),
        patient=None,
    ), status


def _report_csv(report: reports.AccessReport, filename: str, kind: str, **details: Any) -> Response:
    """The report's lines as CSV, oldest first, after recording the export in the trail."""
    up_to = reports.last_seq(db.session)
    actor = current_user.actor()
    actor.record(
        db.session, "audit.exported", None, format="csv", report=kind, up_to_seq=up_to, **details
    )
    db.session.commit()
    log.info("access_report_exported", user_id=actor.user_id, up_to_seq=up_to)
    entries = [e for e in report.entries if e.seq <= up_to]
    return Response(
        csv_chunks(entries, reports.ACCESS_COLUMNS, reports.access_cells),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@bp.get("/access/<reference>.csv")
def access_csv(reference: str) -> ResponseReturnValue:
    """The access report as CSV (``access-R-XXXX-XXXX.csv``), recorded as ``audit.exported``."""
    normalized = normalize_reference(reference)
    if normalized is None:
        abort(404)
    if normalized != reference:
        return redirect(url_for("compliance.access_csv", reference=normalized), 301)
    report = reports.access_report(db.session, normalized)
    if report.request is None and not report.entries:
        abort(404)
    return _report_csv(
        report, f"access-{normalized}.csv", kind="access", filter_reference=normalized
    )


# -- patient-level report ---------------------------------------------------------------------


@bp.get("/patients")
def patient_search() -> ResponseReturnValue:
    return render_template("compliance/patient_search.html", form=PatientSearchForm(formdata=None))


@bp.post("/patients")
def patient_search_post() -> ResponseReturnValue:
    """Find one patient's requests through the blind indexes; the search is recorded with the
    references found (never the terms), and its event number addresses the report."""
    form = PatientSearchForm()
    if not form.validate():
        return render_template("compliance/patient_search.html", form=form), 400
    found = patients.find_patient(
        db.session,
        current_app.extensions["intake.keyring"],
        current_user.actor(),
        phone_e164=form.phone_e164,
        last_name=None if form.phone_e164 else form.last_name.data,
        date_of_birth=None if form.phone_e164 else form.date_of_birth.data,
    )
    return redirect(url_for("compliance.patient_report", seq=found.seq), 303)


def _patient_search_or_404(seq: int) -> patients.PatientSearch:
    found = patients.recorded_search(db.session, seq)
    if found is None:
        abort(404)
    return found


@bp.get("/patients/<int:seq>")
def patient_report(seq: int) -> ResponseReturnValue:
    found = _patient_search_or_404(seq)
    report = reports.access_report(db.session, found.references)
    return render_template(
        "compliance/access.html",
        report=report,
        now=now(),
        teams=_team_names(),
        definition=reports.PHI_VIEW_DEFINITION,
        csv_url=url_for("compliance.patient_csv", seq=seq),
        search_url=None,
        patient=found,
    )


@bp.get("/patients/<int:seq>.csv")
def patient_csv(seq: int) -> ResponseReturnValue:
    found = _patient_search_or_404(seq)
    report = reports.access_report(db.session, found.references)
    return _report_csv(report, f"access-patient-{seq}.csv", kind="patient", search_seq=seq)


@bp.post("/access/<reference>/proof")
def access_proof(reference: str) -> ResponseReturnValue:
    """Download the request's proof file (with openings), recorded as ``audit.exported``."""
    from intake.audit.proofs import ProofUnavailable, recorded_proof

    normalized = normalize_reference(reference)
    if normalized is None:
        abort(404)
    actor = current_user.actor()
    try:
        proof = recorded_proof(
            db.session,
            current_app.extensions["intake.settings"],
            normalized,
            actor=actor.audit_name,
            actor_role=actor.role,
            ip_hmac=actor.ip_hmac,
            username=actor.username,
        )
    except ProofUnavailable as error:
        db.session.rollback()
        flash(f"No proof could be made: {error}.")
        return redirect(url_for("compliance.access", reference=normalized), 303)
    log.info("audit_proof_exported", user_id=actor.user_id, events=len(proof.events))
    return Response(
        proof.to_json(),
        mimetype="application/json",
        headers={"Content-Disposition": f'attachment; filename="{proof.filename}"'},
    )


# -- users ------------------------------------------------------------------------------------


@bp.get("/users")
def users() -> ResponseReturnValue:
    moment = now()
    since = reports.start_of_day(moment) - timedelta(days=29)
    per_user = reports.views_per_day(db.session, since)
    people = db.session.execute(select(User).order_by(User.username)).scalars().all()
    views = {u: sum(v[0] for v in days.values()) for u, days in per_user.items()}
    return render_template("compliance/users.html", people=people, views=views)


@bp.get("/users/<username>")
def user(username: str) -> ResponseReturnValue:
    person = db.session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if person is None:
        abort(404)
    moment = now()
    activity = reports.user_activity(db.session, person, moment)
    chart = charts.bar_chart(
        "chart-user-views",
        f"{person.username}: requests opened per day, last 30 days",
        f"Bars per UTC day of how many times {person.username} opened a request's page; "
        f"{sum(d.views for d in activity.days)} in all. The table below lists each day.",
        [d.day.strftime("%m-%d") for d in activity.days],
        [("request views", [d.views for d in activity.days])],
        label_every=5,
    )
    counts = reports.hourly_request_views(db.session, activity.since - anomalies.BASELINE)
    flagged = [
        a
        for a in anomalies.find_anomalies(counts, since=activity.since)
        if a.user == person.username
    ]
    return render_template(
        "compliance/user.html",
        person=person,
        activity=activity,
        chart=chart,
        flagged=flagged,
        action_names=reports.ACTION_NAMES,
        definition=reports.PHI_VIEW_DEFINITION,
    )


# -- break-glass review -----------------------------------------------------------------------


def _break_glass_page(
    status: int = 200, error: str | None = None, error_seq: int | None = None, form: Any = None
) -> ResponseReturnValue:
    entries = break_glass.break_glass_entries(db.session)
    return render_template(
        "compliance/break_glass.html",
        entries=entries,
        pending=[e for e in entries if e.pending],
        reviewed=[e for e in entries if not e.pending],
        form=form or ReviewForm(formdata=None),
        error=error,
        error_seq=error_seq,
        outcomes=break_glass.OUTCOMES,
    ), status


@bp.get("/break-glass")
def break_glass_list() -> ResponseReturnValue:
    return _break_glass_page()


@bp.post("/break-glass/<int:seq>/review")
def review(seq: int) -> ResponseReturnValue:
    form = ReviewForm()
    if not form.validate():
        message = (
            "Choose an outcome."
            if form.outcome.errors
            else "Write a review comment of 5 to 1000 characters."
        )
        return _break_glass_page(400, message, seq, form)
    try:
        break_glass.review_break_glass(
            db.session,
            current_user.actor(),
            seq,
            form.comment.data or "",
            now(),
            _reviewers(),
            outcome=form.outcome.data or "",
        )
    except break_glass.ReviewError as error:
        db.session.rollback()
        message = str(error)
        return _break_glass_page(error.status, message[:1].upper() + message[1:] + ".", seq, form)
    outcome = break_glass.OUTCOMES.get(form.outcome.data or "", "")
    flash(f"Break-glass access #{seq} reviewed: {outcome.lower()}.")
    return redirect(url_for("compliance.break_glass_list"), 303)


# -- anomalies --------------------------------------------------------------------------------


def _flagged(moment: datetime, days: int) -> tuple[datetime, list[anomalies.Anomaly]]:
    """The hours flagged by the anomaly rule in the last ``days`` days (whole clock hours)."""
    since = (moment - timedelta(days=days)).replace(minute=0, second=0, microsecond=0)
    counts = reports.hourly_request_views(db.session, since - anomalies.BASELINE)
    return since, anomalies.find_anomalies(counts, since=since)


@bp.get("/anomalies")
def anomaly_list() -> ResponseReturnValue:
    days = request.args.get("days", default=7, type=int)
    if days not in ANOMALY_DAYS:
        abort(404)
    since, flagged = _flagged(now(), days)
    return render_template(
        "compliance/anomalies.html",
        flagged=flagged,
        days=days,
        choices=ANOMALY_DAYS,
        since=since,
        floor=anomalies.FLOOR,
        factor=anomalies.FACTOR,
        baseline_days=anomalies.BASELINE.days,
        timedelta=timedelta,
    )
