"""Staff pages: login, queue, request page and its actions, search."""

from __future__ import annotations

from typing import Any

import structlog
from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required, login_user, logout_user

from intake.accounts import services as accounts
from intake.accounts.login import (
    client_ip_hmac,
    client_network_hmac,
    known_device,
    refuse_cross_site_views,
    remember_device,
    roles_required,
    safe_next,
)
from intake.clock import now
from intake.extensions import db, limiter
from intake.forms import clean_phone, options
from intake.models import KINDS, OPEN_STATUSES, STATUSES
from intake.ops import metrics
from intake.requests import casework, labels, outbox
from intake.requests.casework import CaseworkError
from intake.requests.references import normalize_reference
from intake.staff.forms import (
    BreakGlassForm,
    BulkForm,
    LoginForm,
    NoteForm,
    SearchForm,
    StatusForm,
    TransferForm,
)

log = structlog.get_logger(__name__)
bp = Blueprint("staff", __name__, url_prefix="/staff", template_folder="templates")
bp.before_request(refuse_cross_site_views)

LOGIN_FAILED = "The username, password or authenticator code is not right."
LOCKED = "Too many failed attempts. Try again in {seconds} seconds."
BUSY = "Many logins are being checked right now. Try again in a moment."
WORKERS = ("staff", "supervisor")


def _login_limit() -> str:
    return str(current_app.extensions["intake.settings"].login_rate_limit)


def _keyring() -> Any:
    return current_app.extensions["intake.keyring"]


def _team_names() -> dict[str, str]:
    return {t.id: t.name for t in current_app.extensions["intake.routing"].teams.values()}


def _glass_policy() -> casework.BreakGlassPolicy:
    return casework.BreakGlassPolicy.from_settings(current_app.extensions["intake.settings"])


def _not_in_scope(reference: str, form: BreakGlassForm, status: int) -> ResponseReturnValue:
    return render_template(
        "staff/not_in_scope.html",
        reference=reference,
        form=form,
        may_break_glass=current_user.role in _glass_policy().roles,
    ), status


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(_login_limit, methods=["POST"])
def login() -> ResponseReturnValue:
    form = LoginForm()
    if request.method == "GET":
        form.next.data = safe_next(request.args.get("next")) or ""
        return render_template("staff/login.html", form=form)
    if not form.validate():
        return render_template("staff/login.html", form=form), 400
    settings = current_app.extensions["intake.settings"]
    username = form.username.data or ""
    result = accounts.authenticate(
        db.session,
        _keyring(),
        username=username,
        password=form.password.data or "",
        otp=form.otp.data or "",
        now=now(),
        ip_hmac=client_ip_hmac(),
        client=client_network_hmac(),
        known_device=known_device(username),
        policy=accounts.LoginPolicy.from_settings(settings),
        slots=accounts.hash_slots(settings.login_hash_concurrency),
    )
    db.session.commit()
    if result.outbox_ids:
        outbox.publish(db.session, list(result.outbox_ids))
    if result.token is None:
        log.info("login_failed", reason=result.reason)
        metrics.LOGIN_FAILURES.labels(result.reason or "unknown").inc()
        if result.reason in ("locked", "busy"):
            message = (
                LOCKED.format(seconds=result.retry_after) if result.reason == "locked" else BUSY
            )
            page = render_template("staff/login.html", form=form, error=message)
            status = 429 if result.reason == "locked" else 503
            return page, status, {"Retry-After": str(result.retry_after)}
        return render_template("staff/login.html", form=form, error=LOGIN_FAILED), 400
    session.clear()  # a fresh session cookie: nothing from before the login survives it
    from intake.accounts.login import StaffPrincipal

    assert result.user is not None
    login_user(StaffPrincipal(result.token, result.user))
    session.permanent = True
    log.info("login", user_id=result.user.id)
    target = safe_next(form.next.data)
    if result.user.role == "compliance":
        target = target or url_for("compliance.index")
    response = redirect(target or url_for("staff.queue"), 303)
    remember_device(response, result.user.username)
    return response


@bp.post("/logout")
@login_required
def logout() -> ResponseReturnValue:
    accounts.logout(db.session, current_user.token, now(), client_ip_hmac())
    logout_user()
    session.clear()
    return redirect(url_for("staff.login"), 303)


AWAY = "You are marked away: automatic assignment gives you no new requests."
BACK = "Welcome back: automatic assignment gives you requests again."


@bp.post("/away")
@login_required
def set_away() -> ResponseReturnValue:
    """Mark oneself away (no new automatic assignments) or back (backfilled at once)."""
    from intake.requests import assignment

    if current_user.role not in WORKERS:
        abort(404)
    away = request.form.get("away") == "1"
    assignment.set_away(
        db.session,
        current_user.user_id,
        away,
        now(),
        actor=f"user:{current_user.user_id}",
        actor_role=current_user.role,
        ip_hmac=client_ip_hmac(),
    )
    db.session.commit()
    flash(AWAY if away else BACK)
    return redirect(safe_next(request.form.get("next")) or url_for("staff.queue"), 303)


@bp.get("/")
@login_required
def home() -> ResponseReturnValue:
    if current_user.role == "compliance":
        return redirect(url_for("compliance.index"))
    return redirect(url_for("staff.queue"))


def _languages() -> dict[str, str]:
    """The languages a request may need, by code, with their English names."""
    table = current_app.extensions["intake.routing"]
    return {code: table.language_name(code) for code in table.languages}


def _queue_filters() -> dict[str, Any]:
    status = request.args.get("status") or None
    team = request.args.get("team") or None
    kind = request.args.get("kind") or None
    language_need = request.args.get("language_need") or None
    assignee = request.args.get("assignee") or None
    if status not in (None, *STATUSES) or kind not in (None, *KINDS):
        abort(400)
    if language_need not in (None, "any", *_languages()):
        abort(400)
    if assignee not in (None, *casework.ASSIGNEE_FILTERS):
        abort(400)
    if team is not None and current_user.role != "supervisor" and team not in current_user.teams:
        abort(404)
    return {
        "status": status,
        "team": team,
        "kind": kind,
        "language_need": language_need,
        "assignee": assignee,
    }


def _queue_sort() -> str:
    sort = request.args.get("sort") or None
    if sort is not None and casework.sort_key(sort) != sort:
        abort(400)
    return casework.sort_key(sort)


def _status_choices() -> tuple[str, ...]:
    """The statuses the queue can be filtered by, for this user.

    A ``received`` request has not been routed yet, so it is in no team's queue: routing gives
    it its team as it makes it ``queued`` (``intake.requests.routing.route_request``). Staff see
    only their teams' requests, so for them that filter could never show anything and is not
    offered; supervisors see every request, and there it shows what waits for the router
    (during a broker outage, for instance).
    """
    if current_user.role == "supervisor":
        return STATUSES
    return tuple(s for s in STATUSES if s != "received")


def _queue_args(filters: dict[str, Any], current_sort: str, **changes: Any) -> dict[str, Any]:
    """The queue's query string with ``changes``: only what is set, so URLs stay short."""
    args = {**filters, "sort": current_sort, **changes}
    if args["sort"] == "priority":
        args["sort"] = None
    return {key: value for key, value in args.items() if value}


@bp.get("/queue")
@roles_required(*WORKERS)
def queue() -> ResponseReturnValue:
    filters = _queue_filters()
    sort = _queue_sort()
    after = request.args.get("after") or None
    when = now()
    actor = current_user.actor()
    # The version stamp is that of the rows and counts shown (see casework.queue_view).
    view = casework.queue_view(
        db.session, _keyring(), actor, when, after=after, sort=sort, **filters
    )
    rows = view.rows
    people = casework.assignable_people(db.session) if current_user.role == "supervisor" else []
    # The queue shows first name and last initial: a minimum-necessary view, still recorded.
    # The references shown go in the details so a patient's access report can list queue views.
    actor.record(
        db.session,
        "phi.viewed",
        None,
        view="queue",
        rows=len(rows),
        after=after is not None,
        references=[row.reference for row in rows],
    )
    db.session.commit()
    teams = _team_names()
    visible_teams = sorted(teams) if current_user.role == "supervisor" else list(current_user.teams)
    template = "staff/_queue_rows.html" if request.args.get("fragment") else "staff/queue.html"
    return render_template(
        template,
        rows=rows,
        filters=filters,
        sort=sort,
        queue_args=lambda **changes: _queue_args(filters, sort, **changes),
        counts=view.counts,
        people=people,
        now=when,
        teams=teams,
        visible_teams=visible_teams,
        statuses=_status_choices(),
        open_statuses=OPEN_STATUSES,
        kinds=KINDS,
        languages=_languages(),
        next_cursor=rows[-1].cursor if len(rows) == 50 else None,
        after=after,
        version=view.version,
        bulk_form=BulkForm(),
        transfer_teams=teams,
    )


@bp.get("/queue/version")
@roles_required(*WORKERS)
def queue_version() -> ResponseReturnValue:
    """A fingerprint of the queue (no PHI): the page reloads its rows only when it changes."""
    return {
        "version": _queue_version(
            _queue_filters(), _queue_sort(), request.args.get("after") or None
        )
    }


def _queue_version(filters: dict[str, Any], sort: str, after: str | None) -> str:
    """The rows of the page and the counts above them: either changing refreshes the page."""
    version = casework.queue_version(
        db.session, current_user.actor(), now(), sort=sort, after=after, **filters
    )
    db.session.rollback()
    return version


BULK_ACTIONS = ("claim", "assign", "transfer")


@bp.post("/queue/bulk")
@roles_required(*WORKERS)
def queue_bulk() -> ResponseReturnValue:
    """Claim, assign or transfer the requests ticked on the queue: one POST, one event each.

    A transfer is confirmed first: without ``confirm`` the answer is a page saying what will
    move where, whose button sends the same form back with ``confirm``.
    """
    form = BulkForm()
    if not form.validate():
        abort(400)
    references = request.form.getlist("reference")
    action = form.action.data or ""
    back = _bulk_return_args()
    actor = current_user.actor()
    when = now()
    try:
        if action not in BULK_ACTIONS:
            raise CaseworkError("choose claim, assign or transfer")
        if action == "claim":
            done = casework.bulk_claim(db.session, references, actor, when)
            flash(f"You claimed {_requests_list(done)}.")
        elif action == "assign":
            try:
                person = int(form.assignee.data or "")
            except ValueError:
                raise CaseworkError("choose the person to assign to") from None
            done = casework.bulk_assign(db.session, references, actor, person, when)
            name = dict((p[0], p[1]) for p in casework.assignable_people(db.session))
            flash(f"Assigned {_requests_list(done)} to {name.get(person, '?')}.")
        else:
            team = form.team.data or ""
            reason = form.reason.data or ""
            if form.confirm.data != "yes":
                preview = casework.preview_transfer(
                    db.session, references, actor, team, reason, list(_team_names()), when
                )
                return _confirm_transfer(preview, team, reason, url_for("staff.queue_bulk"), back)
            outbox_ids = casework.bulk_transfer(
                db.session,
                references,
                actor,
                team,
                reason,
                list(_team_names()),
                when,
                team_languages=_team_languages(),
            )
            outbox.publish(db.session, outbox_ids)
            moved = list(dict.fromkeys(r.strip().upper() for r in references if r.strip()))
            flash(f"Transferred {_requests_list(moved)} to {_team_names().get(team, '?')}.")
    except CaseworkError as error:
        db.session.rollback()
        return render_template(
            "staff/bulk_error.html", message=str(error), back=back, status=error.status
        ), error.status
    return redirect(url_for("staff.queue", **back), 303)


def _requests_list(references: list[str]) -> str:
    if len(references) == 1:
        return references[0]
    return f"{len(references)} requests ({', '.join(references)})"


def _bulk_return_args() -> dict[str, Any]:
    """The queue's filters the bulk form carried, kept only when they are valid ones."""
    back: dict[str, Any] = {}
    fields = {
        "status": STATUSES,
        "kind": KINDS,
        "assignee": casework.ASSIGNEE_FILTERS,
        "language_need": ("any", *_languages()),
        "team": tuple(_team_names()),
    }
    for name, allowed in fields.items():
        value = request.form.get(f"back_{name}") or ""
        if value in allowed:
            back[name] = value
    sort = request.form.get("back_sort") or ""
    if sort and casework.sort_key(sort) == sort and sort != "priority":
        back["sort"] = sort
    return back


def _team_languages() -> dict[str, Any]:
    return {t.id: t.languages for t in current_app.extensions["intake.routing"].teams.values()}


def _confirm_transfer(
    preview: list[casework.TransferPreview],
    team: str,
    reason: str,
    action_url: str,
    back: dict[str, Any],
) -> ResponseReturnValue:
    """The page that asks "transfer these to that team?" before anything moves."""
    return render_template(
        "staff/transfer_confirm.html",
        preview=preview,
        team=team,
        reason=reason,
        teams=_team_names(),
        action_url=action_url,
        back=back,
        form=BulkForm(),
    )


def _render_opened(opened: casework.OpenedRequest, status: int = 200) -> ResponseReturnValue:
    teams = _team_names()
    transfer = TransferForm()
    transfer.team.choices = options(
        (tid, name) for tid, name in teams.items() if tid != opened.request.team
    )
    status_form = StatusForm()
    status_form.status.choices = options((s, labels.status_label(s)) for s in opened.transitions)
    return render_template(
        "staff/request.html",
        opened=opened,
        r=opened.request,
        doc=opened.phi,
        teams=teams,
        labels=labels,
        routing=current_app.extensions["intake.routing"],
        note_form=NoteForm(),
        status_form=status_form,
        transfer_form=transfer,
        claimed_by_other=opened.claimed_by_other(current_user.actor()),
        now=now(),
    ), status


@bp.get("/requests/<reference>")
@login_required
def request_page(reference: str) -> ResponseReturnValue:
    if current_user.role not in ("staff", "supervisor", "compliance"):
        abort(404)
    try:
        opened = casework.open_request(
            db.session, _keyring(), reference, current_user.actor(), now(), team_names=_team_names()
        )
    except casework.NotFound:
        db.session.rollback()
        return _not_in_scope(reference, BreakGlassForm(), 404)
    except CaseworkError as error:  # e.g. 410: the request's data was purged by retention
        db.session.rollback()
        return render_template(
            "staff/action_error.html",
            reference=reference,
            message=str(error),
            status=error.status,
        ), error.status
    return _render_opened(opened)


@bp.post("/requests/<reference>/<action>")
@login_required
def act(reference: str, action: str) -> ResponseReturnValue:
    actor = current_user.actor()
    when = now()
    try:
        if action == "break-glass":
            form = BreakGlassForm()
            if not form.validate():
                return _not_in_scope(reference, form, 400)
            opened = casework.open_request(
                db.session,
                _keyring(),
                reference,
                actor,
                when,
                break_glass_reason=form.reason.data,
                policy=_glass_policy(),
                team_names=_team_names(),
            )
            if opened.alert_outbox_id is not None:
                outbox.publish(db.session, [opened.alert_outbox_id])
            return _render_opened(opened)
        if current_user.role not in WORKERS:
            abort(404)
        if action == "claim":
            casework.claim(db.session, reference, actor, when)
            flash("You claimed this request.")
        elif action == "release":
            casework.release(db.session, reference, actor, when)
            flash("You released this request.")
        elif action == "status":
            form = StatusForm()
            form.validate()
            casework.change_status(db.session, reference, actor, form.status.data or "", when)
            flash(f"Status changed to {str(form.status.data).replace('_', ' ')}.")
        elif action == "note":
            note = NoteForm()
            if not note.validate():
                raise CaseworkError("a note needs 1 to 4000 characters")
            casework.add_note(db.session, _keyring(), reference, actor, note.text.data or "", when)
            flash("Note added.")
        elif action == "transfer":
            transfer = TransferForm()
            transfer.validate()
            team, reason = transfer.team.data or "", transfer.reason.data or ""
            if request.form.get("confirm") != "yes":
                # Checked as the transfer will be, then shown for confirmation: nothing moves.
                preview = casework.preview_transfer(
                    db.session, [reference], actor, team, reason, list(_team_names()), when
                )
                return _confirm_transfer(
                    preview,
                    team,
                    reason,
                    url_for("staff.act", reference=reference, action="transfer"),
                    {},
                )
            outbox_id = casework.transfer(
                db.session,
                reference,
                actor,
                team,
                reason,
                list(_team_names()),
                when,
                team_languages=_team_languages(),
            )
            outbox.publish(db.session, [outbox_id])
            flash(f"Transferred to {_team_names().get(team, '?')}.")
            return redirect(url_for("staff.queue"), 303)
        else:
            abort(404)
    except CaseworkError as error:
        db.session.rollback()
        return render_template(
            "staff/action_error.html", reference=reference, message=str(error), status=error.status
        ), error.status
    return redirect(url_for("staff.request_page", reference=reference), 303)


@bp.route("/search", methods=["GET", "POST"])
@roles_required(*WORKERS)
def search() -> ResponseReturnValue:
    """Find a request. A POST, so phone numbers, names and birth dates never sit in a URL
    (access logs, browser history, the login page's ``next``)."""
    form = SearchForm()
    results = None
    error = None
    status = 200
    if request.method == "POST":
        if not form.validate():
            error, status = "Check the search fields.", 400
        else:
            try:
                reference = (
                    normalize_reference(form.reference.data or "") if form.reference.data else None
                )
                phone = clean_phone(form.phone.data) if form.phone.data else None
                found = casework.search(
                    db.session,
                    _keyring(),
                    current_user.actor(),
                    reference=reference,
                    phone_e164=phone,
                    last_name=form.last_name.data or None,
                    date_of_birth=form.date_of_birth.data or None,
                )
                results = casework.queue_rows_for(db.session, _keyring(), found)
            except (CaseworkError, ValueError) as problem:
                db.session.rollback()
                error, status = str(problem) or "Check the search fields.", 400
    page = render_template(
        "staff/search.html",
        form=form,
        results=results,
        error=error,
        teams=_team_names(),
        languages=_languages(),
        now=now(),
    )
    return page, status
