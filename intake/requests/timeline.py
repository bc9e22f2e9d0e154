"""The staff timeline of a request: what people (and Intake) did, one line per action, in words.

Why: the audit trail is compliance's record. It holds break-glass reasons, review comments,
refused attempts and every opening of the page (each action reloads it, so a pharmacist who
claims, notes and completes a request "views" it four times). Staff who can see a request need
to know who worked it and how, not what compliance wrote about a colleague, so this is an allow
list read from audit events only (their details hold no PHI): received, routed, team notices,
claimed, released, status changes, transfers (with their reason, which passed the PHI filter),
notes (the text is on the page, under Notes), escalations, the patient's status look-ups and
the retention purge. Break-glass openings, reviews and every refused or failed event except a
failed team notice are left out.

Views fold: a person's view within ``FOLD_WINDOW`` of their previous view joins that view's line
("Viewed by ana, 3 times"), even when their own actions came in between; a view after a longer
gap starts a new line. People are named by the username recorded in the event, never by the
``user:<id>`` the chain keys on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from flask import has_app_context, has_request_context
from flask_babel import force_locale, gettext, ngettext

from intake.requests.labels import priority_label, status_label, team_label

FOLD_WINDOW = timedelta(minutes=10)
DEFAULT_LANGUAGE = "en"
# Notifications staff may see: a request's own team notices and overdue escalations. An alert
# about a break-glass access is the supervisors' and compliance's business, like the access.
WORKFLOW_NOTICES = ("new", "overdue")


@dataclass(frozen=True)
class TimelineLine:
    """One line: when it happened (the first time, for folded views), what, and by whom."""

    at: datetime
    action: str
    text: str
    actor: str = ""
    times: int = 1
    last_at: datetime | None = None  # the last folded view, when ``times`` > 1


def _details(event: Any) -> dict[str, Any]:
    raw = event.details
    if not raw:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        loaded = json.loads(raw)
    except ValueError:  # a row the app did not write: read as no details, not a 500
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _who(event: Any, details: Mapping[str, Any]) -> str:
    if event.actor == "patient":
        return gettext("the patient")
    if str(event.actor).startswith("system:"):
        return "Intake"
    return str(details.get("username") or gettext("a former user"))


def _viewed(who: str, times: int) -> str:
    if times == 1:
        return gettext("Viewed by %(who)s", who=who)
    return ngettext(
        "Viewed by %(who)s, %(num)d time", "Viewed by %(who)s, %(num)d times", times, who=who
    )


def describe(event: Any, team_names: Mapping[str, str]) -> str | None:
    """One event in words, or None when it is not the staff's business."""
    d = _details(event)
    action = event.action
    who = _who(event, d)

    def team(key: str) -> str:
        return team_label(team_names, str(d.get(key) or "") or None)

    if action == "notification.failed" and d.get("reason", "new") in WORKFLOW_NOTICES:
        return gettext("Notifying %(team)s failed", team=team("team"))
    if event.outcome != "success":
        return None
    if action == "request.submitted":
        return gettext("Received from the patient")
    if action == "request.routed":
        return gettext(
            "Routed to %(team)s, %(priority)s priority",
            team=team("team"),
            priority=priority_label(d.get("priority")).lower(),
        )
    if action == "notification.sent" and d.get("reason", "new") in WORKFLOW_NOTICES:
        if d.get("reason") == "overdue":
            return gettext("Supervisors told it is overdue")
        return gettext("%(team)s notified", team=team("team"))
    if action == "request.claimed" and d.get("assigned_to_username"):
        return gettext(
            "Assigned to %(person)s by %(who)s", person=str(d["assigned_to_username"]), who=who
        )
    if action == "request.claimed":
        return gettext("Claimed by %(who)s", who=who)
    if action == "request.assigned":
        return gettext(
            "Assigned to %(person)s automatically (%(reason)s)",
            person=str(d.get("assignee") or "?"),
            reason=str(d.get("reason") or ""),
        )
    if action == "request.left_in_pool":
        return gettext("Left unassigned (%(reason)s)", reason=str(d.get("reason") or ""))
    if action == "request.released" and d.get("by") == "system:assign":
        return gettext("Returned to the pool (%(reason)s)", reason=str(d.get("reason") or ""))
    if action == "request.released":
        return gettext("Released by %(who)s", who=who)
    if action == "request.status_changed":
        return gettext(
            "Status: %(new)s, by %(who)s (was %(old)s)",
            new=status_label(d.get("new")).lower(),
            old=status_label(d.get("old")).lower(),
            who=who,
        )
    if action == "request.transferred":
        return gettext(
            "Transferred to %(team)s by %(who)s (from %(old)s): %(reason)s",
            team=team("to_team"),
            who=who,
            old=team("from_team"),
            reason=str(d.get("reason") or ""),
        )
    if action == "note.added":
        return gettext("Note added by %(who)s", who=who)
    if action == "request.escalated":
        return gettext(
            "Priority raised to %(priority)s: past its due time",
            priority=priority_label(d.get("new_priority")).lower(),
        )
    if action == "status.looked_up":
        return gettext("Status checked by the patient online")
    if action == "retention.purged":
        return gettext("Patient details shredded by the retention policy")
    return None


def build_timeline(events: Iterable[Any], team_names: Mapping[str, str]) -> list[TimelineLine]:
    """The lines of a request's timeline from its audit events, oldest first.

    In the page's language; outside a request (a command, a test in an app context) the
    locale selector has no page to ask, so the lines are in the default language.
    """
    if has_app_context() and not has_request_context():
        with force_locale(DEFAULT_LANGUAGE):
            return _build(events, team_names)
    return _build(events, team_names)


def _build(events: Iterable[Any], team_names: Mapping[str, str]) -> list[TimelineLine]:
    lines: list[TimelineLine] = []
    # Per person: the index of their open "viewed" line and the time of its last view.
    open_views: dict[str, tuple[int, datetime]] = {}
    for event in events:
        d = _details(event)
        if event.action == "phi.viewed":
            if event.outcome != "success" or d.get("break_glass"):
                continue
            who = _who(event, d)
            at: datetime = event.created_at
            seen = open_views.get(event.actor)
            if seen is not None and at - seen[1] <= FOLD_WINDOW:
                index = seen[0]
                line = lines[index]
                times = line.times + 1
                lines[index] = replace(line, times=times, last_at=at, text=_viewed(who, times))
                open_views[event.actor] = (index, at)
                continue
            lines.append(TimelineLine(at, event.action, _viewed(who, 1), actor=event.actor))
            open_views[event.actor] = (len(lines) - 1, at)
            continue
        text = describe(event, team_names)
        if text is not None:
            lines.append(TimelineLine(event.created_at, event.action, text, actor=event.actor))
    return lines
