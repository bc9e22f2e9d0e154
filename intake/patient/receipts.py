"""The thanks page's summary of what a patient just sent, kept in that patient's own browser.

Why: ``/thanks/<reference>`` must not tell a stranger whether a reference exists, so it shows
nothing looked up on the server. The browser that sent the request gets a short summary in its
signed session cookie instead, keyed by reference (so a repeated POST that lands on the same
thanks page finds it too): the kind, topic, number of prescriptions, pick-up/delivery/ship,
contact method, when it was received and what the routing rules promise. No name, birth date,
phone, prescription number or message goes in: the cookie is signed, not encrypted. Summaries
last ``KEEP_HOURS``, at most ``KEEP`` of them, and the cookie itself ends with the browser.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import current_app, session
from flask_babel import gettext, ngettext
from flask_babel import lazy_gettext as _l

from intake.pharmacy import local_date, local_datetime, local_day, local_time
from intake.requests.routing import SLA_RE, needed_language

CONTACT_BY = {
    "phone": _l("by phone"),
    "sms": _l("by text message"),
    "email": _l("by e-mail"),
}
SESSION_KEY = "receipts"
KEEP = 5
KEEP_HOURS = 12


@dataclass(frozen=True)
class Receipt:
    kind: str
    topic: str | None
    prescriptions: int
    fulfillment: str | None
    location: str | None
    contact_method: str | None
    received_at: datetime
    priority: str
    sla: str
    due_at: datetime

    @property
    def sla_amount(self) -> int:
        match = SLA_RE.match(self.sla)
        return int(match[1]) if match else 0

    @property
    def sla_unit(self) -> str:
        match = SLA_RE.match(self.sla)
        return match[2] if match else "d"

    @property
    def urgent(self) -> bool:
        return self.priority == "urgent"

    def within(self) -> str:
        """The routing rule's SLA in words: 'within 1 hour', 'en 1 día hábil'."""
        n, unit = self.sla_amount, self.sla_unit
        if unit == "m":
            return ngettext("within %(num)d minute", "within %(num)d minutes", n)
        if unit == "h":
            return ngettext("within %(num)d hour", "within %(num)d hours", n)
        if unit == "bd":
            return ngettext("within %(num)d business day", "within %(num)d business days", n)
        return ngettext("within %(num)d day", "within %(num)d days", n)

    def due(self) -> str:
        """When the SLA ends, as precisely as it means: a time for hours, a day for days."""
        if self.sla_unit in ("m", "h"):
            if local_date(self.due_at) == local_date(self.received_at):
                return gettext("by about %(time)s", time=local_time(self.due_at))
            return gettext("by %(date_and_time)s", date_and_time=local_datetime(self.due_at))
        return gettext("by %(date)s", date=local_day(self.due_at))

    def contact_by(self) -> str:
        return str(CONTACT_BY.get(self.contact_method or "", ""))


def _now() -> datetime:
    now: datetime = current_app.extensions["intake.clock"]()
    return now


def remember(
    kind: str,
    form: Any,
    reference: str,
    language: str,
    received_at: datetime | None = None,
    *,
    keep_existing: bool = False,
) -> None:
    """Keep the summary of the request accepted as ``reference`` in this browser's session.

    ``form`` is the validated form. ``received_at`` is when the request was stored (default:
    now). A repeated submission answered with an earlier request's reference passes
    ``keep_existing``, so a summary this browser already holds keeps its original time.
    """
    now = _now()
    if keep_existing and reference in _fresh(session.get(SESSION_KEY), now):
        return
    received = received_at or now
    data = form.data
    facts = {
        "kind": kind,
        "topic": data.get("topic") if kind == "contact" else None,
        "location": data.get("location") if kind == "refill" else None,
        # The language the request will be worked in, as routing sees it (an interpreter's).
        "language": needed_language(language, form.interpreter_needed),
    }
    decision = current_app.extensions["intake.routing"].decide(facts, received)
    entry = {
        "kind": kind,
        "topic": facts["topic"],
        "rx": len(form.cleaned.get("rx_numbers", [])),
        "fulfillment": form.cleaned.get("fulfillment"),
        "location": facts["location"],
        "contact": form.cleaned.get("contact_method"),
        "at": received.isoformat(),
        "priority": decision.priority,
        "sla": decision.rule.sla,
        "due": decision.sla_due_at.isoformat(),
    }
    kept = {
        ref: item for ref, item in _fresh(session.get(SESSION_KEY), now).items() if ref != reference
    }
    kept[reference] = entry
    session[SESSION_KEY] = dict(list(kept.items())[-KEEP:])


def _fresh(stored: Any, now: datetime) -> dict[str, dict[str, Any]]:
    if not isinstance(stored, dict):
        return {}
    fresh = {}
    for reference, item in stored.items():
        try:
            at = datetime.fromisoformat(item["at"])
        except (KeyError, TypeError, ValueError):
            continue
        if now - at < timedelta(hours=KEEP_HOURS):
            fresh[reference] = item
    return fresh


def recall(reference: str) -> Receipt | None:
    """The summary this browser keeps for ``reference``, or None."""
    item = _fresh(session.get(SESSION_KEY), _now()).get(reference)
    if item is None:
        return None
    try:
        return Receipt(
            kind=str(item["kind"]),
            topic=item.get("topic"),
            prescriptions=int(item.get("rx") or 0),
            fulfillment=item.get("fulfillment"),
            location=item.get("location"),
            contact_method=item.get("contact"),
            received_at=datetime.fromisoformat(item["at"]),
            priority=str(item["priority"]),
            sla=str(item["sla"]),
            due_at=datetime.fromisoformat(item["due"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
