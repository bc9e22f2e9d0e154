"""Routing rules: which team gets a request, at what priority, with what SLA.

The rules are data (``config/routing.toml``), read and checked once at start-up. A mistake in
the file must stop the process with a message naming the line, never misroute a patient.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from config.settings import DEFAULT_ROUTING_FILE

CONDITIONS = ("kind", "topic", "location", "language")
PRIORITIES = ("urgent", "high", "normal", "low")
CHANNELS = ("log", "email", "webhook")
SLA_RE = re.compile(r"^(\d+)(m|h|d|bd)$")


class RoutingError(ValueError):
    """The routing file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Team:
    id: str
    name: str
    spanish: bool = False
    notify: tuple[str, ...] = ("log",)
    email: str | None = None
    webhook: str | None = None


@dataclass(frozen=True)
class Location:
    id: str
    names: Mapping[str, str]


@dataclass(frozen=True)
class Rule:
    name: str
    line: int
    conditions: Mapping[str, frozenset[str]]
    team: str
    priority: str
    sla: str

    def matches(self, facts: Mapping[str, str | None]) -> bool:
        return all(facts.get(key) in values for key, values in self.conditions.items())

    def covers(self, other: Rule) -> bool:
        """True when every request ``other`` matches is matched by this rule too."""
        return all(
            key in other.conditions and other.conditions[key] <= values
            for key, values in self.conditions.items()
        )


@dataclass(frozen=True)
class Decision:
    rule: Rule
    team: str
    priority: str
    sla_due_at: datetime


@dataclass(frozen=True)
class RoutingTable:
    path: Path
    teams: Mapping[str, Team]
    locations: Mapping[str, Location]
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    # Where overdue-request escalations go (the [supervisors] table of the file).
    supervisors: Team = Team(id="supervisors", name="Supervisors")

    def decide(self, facts: Mapping[str, str | None], now: datetime) -> Decision:
        for rule in self.rules:
            if rule.matches(facts):
                return Decision(rule, rule.team, rule.priority, sla_deadline(rule.sla, now))
        raise RoutingError(f"{self.path}: no rule matched and there is no default rule")


def sla_deadline(sla: str, start: datetime) -> datetime:
    """Add an SLA like '1h', '30m', '2d' or '1bd' (business days, Monday-Friday) to ``start``."""
    match = SLA_RE.match(sla)
    if not match:
        raise RoutingError(f"bad SLA {sla!r}")
    amount, unit = int(match[1]), match[2]
    if unit == "m":
        return start + timedelta(minutes=amount)
    if unit == "h":
        return start + timedelta(hours=amount)
    if unit == "d":
        return start + timedelta(days=amount)
    due = start
    while amount > 0:
        due += timedelta(days=1)
        if due.weekday() < 5:
            amount -= 1
    return due


def _header_lines(text: str, header: str) -> list[int]:
    pattern = re.compile(rf"^\s*\[\[\s*{header}\s*\]\]")
    return [n for n, line in enumerate(text.splitlines(), start=1) if pattern.match(line)]


def _values(raw: Any, where: str, key: str) -> frozenset[str]:
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise RoutingError(f"{where}: '{key}' must be a name or a list of names")
    return frozenset(items)


def parse_routing(text: str, path: Path, known: Mapping[str, Iterable[str]]) -> RoutingTable:
    """Parse and check a routing file; ``known`` lists the valid values of each condition."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RoutingError(f"{path}: {error}") from None

    supervisors = Team(id="supervisors", name="Supervisors")
    if "supervisors" in doc:
        raw = doc["supervisors"]
        notify = tuple(raw.get("notify", ["log"]))
        if any(c not in CHANNELS for c in notify) or ("email" in notify and not raw.get("email")):
            raise RoutingError(
                f"{path}: [supervisors] needs known channels (and an 'email' "
                "when notified by e-mail)"
            )
        supervisors = Team(
            id="supervisors",
            name=str(raw.get("name", "Supervisors")),
            notify=notify,
            email=raw.get("email"),
            webhook=raw.get("webhook"),
        )

    team_lines = _header_lines(text, "teams")
    teams: dict[str, Team] = {}
    for index, raw in enumerate(doc.get("teams", [])):
        where = f"{path}:{team_lines[index] if index < len(team_lines) else '?'}"
        team_id = raw.get("id")
        if not isinstance(team_id, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", team_id):
            raise RoutingError(f"{where}: a team needs an 'id' of lower-case letters, digits, '-'")
        notify = tuple(raw.get("notify", ["log"]))
        unknown = [c for c in notify if c not in CHANNELS]
        if unknown:
            raise RoutingError(f"{where}: team {team_id!r} has unknown channel {unknown[0]!r}")
        if "email" in notify and not raw.get("email"):
            raise RoutingError(f"{where}: team {team_id!r} notifies by e-mail but has no 'email'")
        if "webhook" in notify and not str(raw.get("webhook", "")).startswith("https://"):
            raise RoutingError(f"{where}: team {team_id!r} needs an https:// 'webhook'")
        teams[team_id] = Team(
            id=team_id,
            name=str(raw.get("name", team_id)),
            spanish=bool(raw.get("spanish", False)),
            notify=notify,
            email=raw.get("email"),
            webhook=raw.get("webhook"),
        )

    locations = {
        str(raw["id"]): Location(
            id=str(raw["id"]),
            names={
                "en": str(raw.get("name_en", raw["id"])),
                "es": str(raw.get("name_es", "")) or str(raw.get("name_en", raw["id"])),
            },
        )
        for raw in doc.get("locations", [])
        if "id" in raw
    }
    known = {**known, "location": set(locations)}

    rule_lines = _header_lines(text, "rules")
    rules: list[Rule] = []
    for index, raw in enumerate(doc.get("rules", [])):
        line = rule_lines[index] if index < len(rule_lines) else 0
        where = f"{path}:{line}"
        name = str(raw.get("name", f"rule {index + 1}"))
        unknown_keys = set(raw) - {*CONDITIONS, "name", "team", "priority", "sla"}
        if unknown_keys:
            raise RoutingError(
                f"{where}: rule {name!r} has unknown key {sorted(unknown_keys)[0]!r}"
            )
        conditions = {k: _values(raw[k], where, k) for k in CONDITIONS if k in raw}
        for key, values in conditions.items():
            bad = sorted(values - set(known.get(key, values)))
            if bad:
                raise RoutingError(f"{where}: rule {name!r} has unknown {key} {bad[0]!r}")
        team = raw.get("team")
        if team not in teams:
            raise RoutingError(f"{where}: rule {name!r} sends to unknown team {team!r}")
        priority = raw.get("priority", "normal")
        if priority not in PRIORITIES:
            raise RoutingError(f"{where}: rule {name!r} has unknown priority {priority!r}")
        sla = str(raw.get("sla", ""))
        if not SLA_RE.match(sla) or int(SLA_RE.match(sla)[1]) == 0:  # type: ignore[index]
            raise RoutingError(
                f"{where}: rule {name!r} has bad SLA {sla!r} (use e.g. '30m', '4h', '2d', '1bd')"
            )
        if conditions.get("language") == frozenset({"es"}) and not teams[team].spanish:
            raise RoutingError(
                f"{where}: rule {name!r} sends Spanish-language requests to team {team!r}, "
                "which is not flagged spanish = true"
            )
        rule = Rule(name, line, conditions, team, priority, sla)
        for earlier in rules:
            if earlier.covers(rule):
                raise RoutingError(
                    f"{where}: rule {name!r} can never match: the rule {earlier.name!r} on "
                    f"line {earlier.line} already takes every request it would"
                )
        rules.append(rule)

    if not rules or rules[-1].conditions:
        raise RoutingError(f"{path}: the last rule must be a default rule with no conditions")
    return RoutingTable(
        path=path, teams=teams, locations=locations, rules=tuple(rules), supervisors=supervisors
    )


def known_values() -> dict[str, set[str]]:
    from intake.models import KINDS, TOPICS

    return {
        "kind": set(KINDS),
        "topic": set(TOPICS),
        "language": {"en", "es"},
    }


@cache
def load_routing(path: Path = DEFAULT_ROUTING_FILE) -> RoutingTable:
    """Read and check the routing file (cached per path)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise RoutingError(f"{path}: cannot read the routing file ({error.strerror})") from None
    return parse_routing(text, Path(path), known_values())


# -- applying the rules to a stored request ------------------------------------------------------

ROUTE_TASK = "route_request"
NOTIFY_TASK = "notify_team"


@dataclass(frozen=True)
class Routed:
    reference: str
    team: str
    priority: str
    notify_outbox_id: int


def route_request(
    session: Any, table: RoutingTable, request_id: str, now: datetime
) -> Routed | None:
    """Route one ``received`` request, exactly once, in one transaction.

    Locks the row (``FOR UPDATE`` on PostgreSQL; SQLite transactions here hold the write lock
    from their first statement), and changes it only with a conditional update on its status, so
    a second delivery of the same task, or two workers racing, change nothing and notify nobody
    twice. Returns what was done, or None when there was nothing to do.
    """
    from sqlalchemy import select, update

    from intake import outbox
    from intake.audit import record_event
    from intake.models import Request

    row = session.execute(
        select(
            Request.reference,
            Request.status,
            Request.kind,
            Request.topic,
            Request.location,
            Request.language,
        )
        .where(Request.id == request_id)
        .with_for_update()
    ).first()
    if row is None or row.status != "received":
        outbox.mark_done(session, request_id, ROUTE_TASK)
        session.commit()
        return None
    decision = table.decide(
        {"kind": row.kind, "topic": row.topic, "location": row.location, "language": row.language},
        now,
    )
    changed = session.execute(
        update(Request)
        .where(Request.id == request_id, Request.status == "received")
        .values(
            status="queued",
            team=decision.team,
            priority=decision.priority,
            priority_rank=PRIORITIES.index(decision.priority),
            sla_due_at=decision.sla_due_at,
            routed_at=now,
            updated_at=now,
        )
    ).rowcount
    if changed != 1:
        session.rollback()
        return None
    record_event(
        session,
        actor=f"system:{ROUTE_TASK}",
        action="request.routed",
        reference=row.reference,
        details={
            "team": decision.team,
            "priority": decision.priority,
            "rule": decision.rule.name,
            "sla_due_at": decision.sla_due_at.isoformat(),
        },
    )
    outbox.mark_done(session, request_id, ROUTE_TASK)
    message = outbox.enqueue(session, request_id, NOTIFY_TASK)
    session.commit()
    return Routed(row.reference, decision.team, decision.priority, message.id)
