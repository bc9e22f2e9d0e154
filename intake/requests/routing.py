"""Routing rules: which team gets a request, at what priority, with what SLA.

The rules are data (``config/routing.toml``), read and checked once at start-up. A mistake in
the file must stop the process with a message naming the line, never misroute a patient.
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import structlog

from config.settings import DEFAULT_ROUTING_FILE

log = structlog.get_logger(__name__)

CONDITIONS = ("kind", "topic", "location", "language")
PRIORITIES = ("urgent", "high", "normal", "low")
CHANNELS = ("log", "email", "webhook")
SLA_RE = re.compile(r"^(\d+)(m|h|d|bd)$")
LANGUAGE_CODE_RE = re.compile(r"^[a-z]{2,3}$")
# Every team serves English; a request needs nothing more when English is what it needs.
BASE_LANGUAGE = "en"
ASSIGN = "assign"
# Automatic assignment per team (intake.requests.assignment): who gets a routed request.
ASSIGNMENT_STRATEGIES = ("off", "round_robin", "least_loaded")
DEFAULT_CAP = 10
MAX_CAP = 500
SKILL_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


class RoutingError(ValueError):
    """The routing file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Team:
    id: str
    name: str
    # The languages the whole team works in: a request needing one of them may go to anyone.
    languages: frozenset[str] = frozenset({BASE_LANGUAGE})
    notify: tuple[str, ...] = ("log",)
    email: str | None = None
    webhook: str | None = None
    # Automatic assignment: "off", "round_robin" or "least_loaded"; at most ``cap`` open
    # requests per person (a user's own cap overrides it); only members holding every one of
    # ``skills`` and speaking every one of ``required_languages``; an assigned request nobody
    # touched for ``claim_timeout_minutes`` goes back to the pool (None: never).
    assignment: str = "off"
    cap: int = DEFAULT_CAP
    skills: frozenset[str] = frozenset()
    required_languages: frozenset[str] = frozenset()
    claim_timeout_minutes: int | None = None

    @property
    def assigns(self) -> bool:
        return self.assignment != "off"

    @property
    def spanish(self) -> bool:
        return "es" in self.languages

    def serves(self, language: str) -> bool:
        return language in self.languages


@dataclass(frozen=True)
class Language:
    """A language patients may need: offered on the forms' interpreter list, served by rules."""

    code: str
    # Its own name (what a speaker looks for), and its names in English and Spanish.
    own_name: str
    names: Mapping[str, str]

    def name_in(self, page_language: str) -> str:
        return self.names.get(page_language) or self.names[BASE_LANGUAGE]


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
    # What to do when the team does not serve the language a request needs: "assign" (to a
    # member who speaks it) or "team:<id>" (that, then the other team); see routing.toml.
    language_fallback: str = ASSIGN

    @property
    def fallback_team(self) -> str | None:
        return (
            self.language_fallback.removeprefix("team:")
            if self.language_fallback != ASSIGN
            else None
        )

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
    # Where overdue-request escalations and unmet language needs go ([supervisors]).
    supervisors: Team = Team(id="supervisors", name="Supervisors")
    # The languages a request may need besides English, in the file's order.
    languages: Mapping[str, Language] = field(default_factory=dict)

    @property
    def skills(self) -> frozenset[str]:
        """Every skill some team asks of the people it assigns work to."""
        return frozenset().union(*(team.skills for team in self.teams.values()))

    def language_name(self, code: str | None, page_language: str = BASE_LANGUAGE) -> str:
        """A language's name for people ("Spanish"; "vietnamita" on a Spanish page)."""
        if code == BASE_LANGUAGE:
            return "English"
        language = self.languages.get(code or "")
        return language.name_in(page_language) if language else str(code)

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

    languages = _parse_languages(doc, text, path)
    served = {BASE_LANGUAGE, *languages}

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
            languages=_team_languages(raw, where, team_id, served),
            notify=notify,
            email=raw.get("email"),
            webhook=raw.get("webhook"),
            **_team_assignment(raw, where, team_id, served),
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
    known = {**known, "location": set(locations), "language": served}

    rule_lines = _header_lines(text, "rules")
    rules: list[Rule] = []
    for index, raw in enumerate(doc.get("rules", [])):
        line = rule_lines[index] if index < len(rule_lines) else 0
        where = f"{path}:{line}"
        name = str(raw.get("name", f"rule {index + 1}"))
        unknown_keys = set(raw) - {
            *CONDITIONS,
            "name",
            "team",
            "priority",
            "sla",
            "language_fallback",
        }
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
        unserved = sorted(
            code for code in conditions.get("language", ()) if not teams[team].serves(code)
        )
        if unserved:
            raise RoutingError(
                f"{where}: rule {name!r} sends requests needing {unserved[0]!r} to team "
                f"{team!r}, which does not serve {unserved[0]!r} (add it to the team's "
                "'languages', or send the rule to a team that has it)"
            )
        fallback = _language_fallback(raw, where, name, team, teams)
        rule = Rule(name, line, conditions, team, priority, sla, fallback)
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
        path=path,
        teams=teams,
        locations=locations,
        rules=tuple(rules),
        supervisors=supervisors,
        languages=languages,
    )


def _parse_languages(doc: Mapping[str, Any], text: str, path: Path) -> dict[str, Language]:
    """The ``[[languages]]`` a request may need besides English, checked."""
    lines = _header_lines(text, "languages")
    # A file from before languages were configurable: Spanish, as the forms always offered.
    raw_list = doc.get(
        "languages", [{"code": "es", "name": "Español", "name_en": "Spanish", "name_es": "español"}]
    )
    if not isinstance(raw_list, list):
        raise RoutingError(f"{path}: write each language as a [[languages]] table")
    languages: dict[str, Language] = {}
    for index, raw in enumerate(raw_list):
        where = f"{path}:{lines[index] if index < len(lines) else '?'}"
        code = raw.get("code")
        if not isinstance(code, str) or not LANGUAGE_CODE_RE.match(code):
            raise RoutingError(
                f"{where}: a language needs a 'code' of 2 or 3 lower-case letters (ISO 639)"
            )
        if code == BASE_LANGUAGE:
            raise RoutingError(f"{where}: English is always served; do not list it")
        if code in languages:
            raise RoutingError(f"{where}: language {code!r} is listed twice")
        unknown_keys = set(raw) - {"code", "name", "name_en", "name_es"}
        if unknown_keys:
            raise RoutingError(
                f"{where}: language {code!r} has unknown key {sorted(unknown_keys)[0]!r}"
            )
        names = {k: raw.get(k) for k in ("name", "name_en", "name_es")}
        if not all(isinstance(v, str) and v.strip() for v in names.values()):
            raise RoutingError(
                f"{where}: language {code!r} needs 'name' (its own name), 'name_en' and 'name_es'"
            )
        languages[code] = Language(
            code=code,
            own_name=str(names["name"]),
            names={"en": str(names["name_en"]), "es": str(names["name_es"])},
        )
    return languages


def _team_languages(
    raw: Mapping[str, Any], where: str, team_id: str, served: set[str]
) -> frozenset[str]:
    codes = raw.get("languages", [BASE_LANGUAGE])
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes) or not codes:
        raise RoutingError(f"{where}: team {team_id!r}: 'languages' must be a list of codes")
    if "spanish" in raw:
        # The older spelling: spanish = true is languages = ["en", "es"].
        if not isinstance(raw["spanish"], bool) or (
            "languages" in raw and raw["spanish"] != ("es" in codes)
        ):
            raise RoutingError(
                f"{where}: team {team_id!r}: 'spanish' disagrees with 'languages' "
                "(keep only languages = [...])"
            )
        if raw["spanish"]:
            codes = [*codes, "es"]
    unknown = sorted(set(codes) - served)
    if unknown:
        raise RoutingError(
            f"{where}: team {team_id!r} serves unknown language {unknown[0]!r} "
            "(list it under [[languages]] first)"
        )
    return frozenset({BASE_LANGUAGE, *codes})


def _team_assignment(
    raw: Mapping[str, Any], where: str, team_id: str, served: set[str]
) -> dict[str, Any]:
    """A team's automatic-assignment keys, checked (see routing.toml)."""
    strategy = raw.get("assignment", "off")
    if strategy not in ASSIGNMENT_STRATEGIES:
        raise RoutingError(
            f"{where}: team {team_id!r} has assignment {strategy!r}; use "
            + ", ".join(f'"{s}"' for s in ASSIGNMENT_STRATEGIES)
        )
    cap = raw.get("cap", DEFAULT_CAP)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_CAP:
        raise RoutingError(
            f"{where}: team {team_id!r}: 'cap' must be a whole number from 1 to {MAX_CAP}"
        )
    skills = raw.get("skills", [])
    if not isinstance(skills, list) or not all(
        isinstance(s, str) and SKILL_RE.match(s) for s in skills
    ):
        raise RoutingError(
            f"{where}: team {team_id!r}: 'skills' must be a list of names of lower-case "
            'letters, digits and "-" (e.g. ["ivig"])'
        )
    required = raw.get("required_languages", [])
    if not isinstance(required, list) or not all(isinstance(c, str) for c in required):
        raise RoutingError(f"{where}: team {team_id!r}: 'required_languages' must be a list")
    unknown = sorted(set(required) - served)
    if unknown:
        raise RoutingError(
            f"{where}: team {team_id!r} requires unknown language {unknown[0]!r} "
            "(list it under [[languages]] first)"
        )
    timeout = raw.get("claim_timeout_minutes")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1
    ):
        raise RoutingError(
            f"{where}: team {team_id!r}: 'claim_timeout_minutes' must be a whole number of "
            "minutes, 1 or more"
        )
    return {
        "assignment": strategy,
        "cap": cap,
        "skills": frozenset(skills),
        "required_languages": frozenset(required) - {BASE_LANGUAGE},
        "claim_timeout_minutes": timeout,
    }


def _language_fallback(
    raw: Mapping[str, Any], where: str, name: str, team: str, teams: Mapping[str, Team]
) -> str:
    fallback = raw.get("language_fallback", ASSIGN)
    if fallback == ASSIGN:
        return ASSIGN
    other = fallback.removeprefix("team:") if isinstance(fallback, str) else None
    if other is None or other == fallback:
        raise RoutingError(
            f"{where}: rule {name!r} has language_fallback {fallback!r}; "
            'use "assign" or "team:<team id>"'
        )
    if other not in teams:
        raise RoutingError(
            f"{where}: rule {name!r} falls back to unknown team {other!r} for language needs"
        )
    if other == team:
        raise RoutingError(
            f'{where}: rule {name!r} falls back to its own team {other!r}; use "assign"'
        )
    if teams[other].languages == {BASE_LANGUAGE}:
        raise RoutingError(
            f"{where}: rule {name!r} falls back to team {other!r} for language needs, but that "
            "team serves no language besides English"
        )
    return f"team:{other}"


def known_values() -> dict[str, set[str]]:
    """Valid condition values the file itself does not define (locations and languages it
    does)."""
    from intake.models import KINDS, TOPICS

    return {"kind": set(KINDS), "topic": set(TOPICS)}


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
LANGUAGE_NOTICE_TASK = "notify_language_need"
# How many waiting requests one routing task routes in its transaction (its own first). One
# commit, one turn of the audit chain's lock and one anchor write then serve them all, which is
# what lets routing keep up with a burst; the tasks of the others find them routed and stop.
# A batch of 25 holds its rows and the chain's lock for about 50 ms on the benchmark machine.
ROUTING_BATCH = 25


@dataclass(frozen=True)
class Routed:
    reference: str
    team: str
    priority: str
    notify_outbox_id: int
    # How the request's language need was met: "none" (English), "team" (the team serves it),
    # "assigned" (to a member who speaks it) or "unmet" (flagged; the supervisors are told).
    language_outcome: str = "none"
    assignee: str | None = None
    language_outbox_id: int | None = None
    request_id: str = ""
    received_at: datetime | None = None
    # The trace its submission was logged under (intake.ops.tracing), also when it was routed
    # in another request's batch: its notices are published, and its lines logged, under it.
    trace_id: str | None = None
    # The routing rows the batch closed for it: the tasks still queued for them can be revoked.
    route_outbox_ids: tuple[int, ...] = ()

    @property
    def outgoing(self) -> list[Any]:
        """The notices to publish once committed (``outbox.publish_outgoing``)."""
        from intake.requests.outbox import Outgoing

        tasks = [(self.notify_outbox_id, NOTIFY_TASK)]
        if self.language_outbox_id:
            tasks.append((self.language_outbox_id, LANGUAGE_NOTICE_TASK))
        return [
            Outgoing(outbox_id, task, self.request_id, self.trace_id) for outbox_id, task in tasks
        ]


def needed_language(language: str, interpreter_language: str | None) -> str:
    """The language a request must be worked in: the interpreter asked for, else the form's."""
    return interpreter_language or language


@dataclass(frozen=True)
class Speaker:
    user_id: int
    username: str
    open_requests: int


def find_speaker(
    session: Any, team: str, language: str, assigned: Mapping[int, int] | None = None
) -> Speaker | None:
    """The member of ``team`` who speaks ``language`` with the fewest open requests assigned
    (ties: the username first in alphabetical order), or None. Disabled accounts never count.

    ``assigned``: requests given to members in the caller's transaction and not yet written
    (a routing batch writes them together at its end), counted as open work."""
    from sqlalchemy import func, select

    from intake.models import OPEN_STATUSES, Request, User, UserTeam

    open_requests = (
        select(func.count(Request.id))
        .where(Request.assignee_id == User.id, Request.status.in_(OPEN_STATUSES))
        .correlate(User)
        .scalar_subquery()
    )
    members = session.execute(
        select(User.id, User.username, User.languages, open_requests.label("open_requests"))
        .join(UserTeam, UserTeam.user_id == User.id)
        .where(
            UserTeam.team_id == team,
            User.disabled.is_(False),
            # Someone who marked themselves away is given nothing (intake.requests.assignment).
            User.away_since.is_(None),
            User.role.in_(("staff", "supervisor")),
        )
    ).all()
    pending = assigned or {}
    speakers = [
        Speaker(m.id, m.username, int(m.open_requests) + pending.get(m.id, 0))
        for m in members
        if language in (m.languages or "").split(",")
    ]
    return min(speakers, key=lambda s: (s.open_requests, s.username), default=None)


@dataclass(frozen=True)
class LanguagePlan:
    team: str
    outcome: str  # none | team | assigned | unmet (see Routed)
    speaker: Speaker | None = None
    via_fallback: bool = False


def plan_language(
    session: Any,
    table: RoutingTable,
    rule: Rule,
    need: str,
    assigned: Mapping[int, int] | None = None,
) -> LanguagePlan:
    """Make sure someone who speaks ``need`` works the request the rule gave to its team.

    The team itself if it serves the language; else the member of it who speaks the language
    and has the least open work; else, with ``language_fallback = "team:<id>"``, the same
    two steps in that team; else nobody: the request stays with the rule's team, flagged.
    ``assigned``: as for :func:`find_speaker`.
    """
    if need == BASE_LANGUAGE:
        return LanguagePlan(rule.team, "none")
    teams = [rule.team, *([rule.fallback_team] if rule.fallback_team else [])]
    for team in teams:
        via_fallback = team != rule.team
        if table.teams[team].serves(need):
            return LanguagePlan(team, "team", via_fallback=via_fallback)
        speaker = find_speaker(session, team, need, assigned)
        if speaker is not None:
            return LanguagePlan(team, "assigned", speaker, via_fallback)
    return LanguagePlan(rule.team, "unmet")


def route_request(
    session: Any, table: RoutingTable, request_id: str, now: datetime
) -> Routed | None:
    """Route one ``received`` request, exactly once, in one transaction (see
    :func:`route_received`); return what was done, or None when there was nothing to do."""
    routed = route_received(session, table, request_id, now, batch=1)
    return routed[0] if routed else None


def route_received(
    session: Any,
    table: RoutingTable,
    request_id: str,
    now: datetime,
    *,
    batch: int = ROUTING_BATCH,
) -> list[Routed]:
    """Route ``request_id`` and up to ``batch - 1`` other ``received`` requests (the oldest),
    each exactly once, in one transaction; return what was done, the task's own request first,
    or [] when it was routed already (by another task's batch, a second delivery) or is gone.

    Rows are locked (``FOR NO KEY UPDATE`` on PostgreSQL: the task's own request waiting for a
    worker that holds it, the others ``SKIP LOCKED`` so two batches never wait on each other;
    SQLite transactions here hold the write lock from their first statement) and changed only
    by a conditional update on their status, so a second delivery, or two workers racing,
    change nothing and notify nobody twice. Each routed request gets its own
    ``request.routed`` event and team notice, written as if routed alone.

    Why NO KEY UPDATE: the batch holds its rows while it waits for the audit chain's lock, and
    a transaction already holding that lock may still insert a row pointing at one of them (a
    break-glass opening's alert in the outbox), whose foreign key takes a key-share lock on the
    request. ``FOR UPDATE`` blocks that lock, and the two deadlock; routing changes no key, so
    the weaker lock, which still keeps out every other writer of the row, lets it through.

    A request needing a language other than English (its form's, or the interpreter asked for)
    goes to someone who speaks it (:func:`plan_language`); when nobody does, it is flagged in
    ``language_need`` and the supervisors get a notice (reference and link only).
    """
    from sqlalchemy import select

    from intake.extensions import reading
    from intake.models import OutboxMessage, Request
    from intake.requests import outbox

    # Unlocked first, outside any transaction: a request leaves "received" once and never
    # comes back, so a task whose request was routed by someone else's batch (after a burst,
    # most of them) stops here in one statement, without waiting for that batch, without
    # SQLite's write lock, and without writing anything when its routing row was closed with
    # the routing.
    with reading(session) as connection:
        found = connection.execute(
            select(
                Request.status,
                select(OutboxMessage.id)
                .where(
                    OutboxMessage.request_id == request_id,
                    OutboxMessage.task == ROUTE_TASK,
                    OutboxMessage.status.in_(outbox.OPEN),
                )
                .limit(1)
                .exists(),
            ).where(Request.id == request_id)
        ).first()
    if found is None or found[0] != "received":
        # Taken out of "received" by something that left its routing row open (cancelled
        # before routing): close the row, or the sweep would publish it again and again.
        if found is not None and found[1]:
            outbox.mark_done(session, request_id, ROUTE_TASK)
            session.commit()
        else:
            session.rollback()  # nothing to roll back, unless the read ran in the session
        return []
    columns = _routing_columns()
    own = session.execute(
        select(*columns).where(Request.id == request_id).with_for_update(key_share=True)
    ).first()
    if own is None or own.status != "received":
        outbox.mark_done(session, request_id, ROUTE_TASK)
        session.commit()
        return []
    if batch > 1:
        try:
            return _route_batch(session, table, own, now, batch)
        except Exception as error:  # noqa: BLE001 - one bad row must not hold up the others
            # Whatever broke (one request the rules cannot route, a deadlock) broke the whole
            # batch; route the task's own request alone, so a request that cannot be routed
            # fails its own task only, and every other task still routes its own.
            session.rollback()
            log.warning("routing_batch_failed", error=type(error).__name__)
        own = session.execute(
            select(*columns).where(Request.id == request_id).with_for_update(key_share=True)
        ).first()
        if own is None or own.status != "received":
            session.rollback()
            return []
    return _route_batch(session, table, own, now, 1)


def _route_batch(
    session: Any, table: RoutingTable, own: Any, now: datetime, batch: int
) -> list[Routed]:
    """Route the locked row ``own`` and up to ``batch - 1`` other waiting requests, commit."""
    from sqlalchemy import select

    from intake.audit.chain import NewEvent, record_events
    from intake.models import Request
    from intake.ops import tracing
    from intake.requests import outbox

    request_id = own.id
    rows = [own]
    if batch > 1:
        rows += session.execute(
            select(*_routing_columns())
            .where(Request.status == "received", Request.id != request_id)
            .order_by(Request.created_at, Request.id)
            .limit(batch - 1)
            .with_for_update(key_share=True, skip_locked=True)
        ).all()
    deferred: list[dict[str, Any]] = []
    # Requests given to a speaker so far in this batch: the next one's choice counts them.
    assigned: Counter[int] = Counter()
    planned = [(row, _route_row(session, table, row, now, deferred, assigned)) for row in rows]
    _update_deferred(session, deferred)
    routed_ids = [row.id for row, _planned in planned]
    closed = outbox.mark_done_for(session, routed_ids, ROUTE_TASK)
    # Each request's notices and log lines go under the trace of its own submission: the
    # task's own request under the trace it carried, the others' as their routing rows say.
    traces = _routing_traces(session, [i for i in routed_ids if i != request_id])
    traces[request_id] = tracing.current()
    # Written as published: the caller publishes them after commit (Routed.outgoing).
    notices = []
    for row, (_details, plan, _speaker) in planned:
        with tracing.bound(traces.get(row.id)):
            notice = outbox.enqueue(session, row.id, NOTIFY_TASK, published_by_caller=True)
            language_notice = (
                outbox.enqueue(session, row.id, LANGUAGE_NOTICE_TASK, published_by_caller=True)
                if plan.outcome == "unmet"
                else None
            )
        notices.append((notice, language_notice))
    session.flush()
    # Last: the events take the audit chain's lock, held until commit, so the other writes of
    # this transaction are done before them and the lock is held for the events alone: one
    # head read, one INSERT and one anchor write for the batch.
    record_events(
        session,
        [
            NewEvent(f"system:{ROUTE_TASK}", "request.routed", row.reference, details=details)
            for row, (details, _plan, _speaker) in planned
        ],
    )
    routed = [
        Routed(
            row.reference,
            plan.team,
            details["priority"],
            notice.id,
            plan.outcome,
            speaker.username if speaker else None,
            language_notice.id if language_notice else None,
            row.id,
            row.created_at,
            traces.get(row.id),
            tuple(closed.get(row.id, ())),
        )
        for (row, (details, plan, speaker)), (notice, language_notice) in zip(
            planned, notices, strict=True
        )
    ]
    session.commit()
    return routed


def _update_deferred(session: Any, deferred: list[dict[str, Any]]) -> None:
    """One executemany UPDATE for the batch's rows (pipelined by psycopg, one statement for
    SQLite), grouped by the columns they set. The rows are locked and were ``received``, so
    the condition on the status holds for each; if it did not, the batch is rolled back."""
    from sqlalchemy import bindparam, update

    from intake.models import Request

    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for values in deferred:
        groups.setdefault(tuple(sorted(values)), []).append(values)
    table = Request.__table__
    for columns, rows in groups.items():
        names = [name for name in columns if name != "routed_id"]
        statement = (
            update(table)
            .where(table.c.id == bindparam("routed_id"), table.c.status == "received")
            .values({name: bindparam(f"new_{name}", type_=table.c[name].type) for name in names})
        )
        params = [
            {"routed_id": row["routed_id"], **{f"new_{name}": row[name] for name in names}}
            for row in rows
        ]
        changed = session.execute(statement, params).rowcount
        if changed != len(rows):
            raise RuntimeError(f"routing updated {changed} of {len(rows)} locked requests")


def _routing_columns() -> tuple[Any, ...]:
    from intake.models import Request

    return (
        Request.id,
        Request.reference,
        Request.status,
        Request.kind,
        Request.topic,
        Request.location,
        Request.language,
        Request.interpreter_language,
        Request.created_at,
    )


def _routing_traces(session: Any, request_ids: list[str]) -> dict[str, str | None]:
    """The trace ids the routing rows of ``request_ids`` were written under."""
    if not request_ids:
        return {}
    from sqlalchemy import select

    from intake.models import OutboxMessage

    found = session.execute(
        select(OutboxMessage.request_id, OutboxMessage.trace_id).where(
            OutboxMessage.request_id.in_(request_ids),
            OutboxMessage.task == ROUTE_TASK,
            OutboxMessage.trace_id.is_not(None),
        )
    ).all()
    return {row.request_id: row.trace_id for row in found}


def _route_row(
    session: Any,
    table: RoutingTable,
    row: Any,
    now: datetime,
    deferred: list[dict[str, Any]],
    assigned: Counter[int],
) -> tuple[dict[str, Any], LanguagePlan, Speaker | None]:
    """Decide the routing of one locked ``received`` row inside the caller's transaction and
    add its new values to ``deferred``, for the caller's one UPDATE of the batch, and a member
    it is given to to ``assigned``. Returns the details of its ``request.routed`` event, its
    language plan and the member it was given to."""
    need = needed_language(row.language, row.interpreter_language)
    decision = table.decide(
        {"kind": row.kind, "topic": row.topic, "location": row.location, "language": need},
        now,
    )
    plan = plan_language(session, table, decision.rule, need, assigned)
    values: dict[str, Any] = {
        "routed_id": row.id,
        "status": "queued",
        "team": plan.team,
        "priority": decision.priority,
        "priority_rank": PRIORITIES.index(decision.priority),
        "sla_due_at": decision.sla_due_at,
        "routed_at": now,
        "updated_at": now,
        "language_need": need if plan.outcome == "unmet" else None,
    }
    # A team with automatic assignment on gives the request out itself, right after routing,
    # to a member who speaks the language and is under their cap (intake.requests.assignment).
    speaker = plan.speaker if not table.teams[plan.team].assigns else None
    if speaker is not None:
        values.update(assignee_id=speaker.user_id, claimed_at=now, last_activity_at=now)
        assigned[speaker.user_id] += 1
    deferred.append(values)
    details: dict[str, Any] = {
        "team": plan.team,
        "priority": decision.priority,
        "rule": decision.rule.name,
        "sla_due_at": decision.sla_due_at.isoformat(),
    }
    if plan.outcome != "none":
        details.update(language=need, language_outcome=plan.outcome)
        if plan.via_fallback:
            details["rule_team"] = decision.rule.team
    if speaker is not None:
        details.update(
            assignee=speaker.username,
            assignment_reason=(
                f"speaks {table.language_name(need)}, {speaker.open_requests} open before this one"
            ),
        )
    elif table.teams[plan.team].assigns:
        details["assignment"] = table.teams[plan.team].assignment
    return details, plan, speaker
