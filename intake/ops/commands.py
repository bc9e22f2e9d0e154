"""Operator commands: serve, users, teams, demo data."""

from __future__ import annotations

import getpass
import json
import sys

import click
from flask import current_app
from flask.cli import with_appcontext
from flask_migrate.cli import db as migrate_db

from intake.accounts import services as accounts
from intake.audit.commands import audit
from intake.audit.commands import cli_actor as _actor
from intake.clock import now
from intake.extensions import db
from intake.ops.backup import backup


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--web-only", is_flag=True, help="Run the web app without a worker and beat.")
@with_appcontext
def serve(host: str, port: int, web_only: bool) -> None:
    """Run the web app, a Celery worker and beat on this machine; Ctrl-C stops all three."""
    from intake.ops.serve import run

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    run(app, host=host, port=port, with_workers=not web_only)


@click.group("users")
def users() -> None:
    """Create and manage staff accounts."""


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password (12+ characters): ")
        if getpass.getpass("Again: ") != first:
            raise click.ClickException("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


@users.command("create")
@click.argument("username")
@click.option(
    "--role", type=click.Choice(["staff", "supervisor", "compliance", "admin"]), required=True
)
@click.option("--team", "teams", multiple=True, help="A team the user works for (repeatable).")
@click.option(
    "--language",
    "languages",
    multiple=True,
    help="A language the user works in, e.g. es (repeatable; default: en).",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"username", "totp_secret"}.')
@with_appcontext
def users_create(
    username: str, role: str, teams: tuple[str, ...], languages: tuple[str, ...], as_json: bool
) -> None:
    """Create USERNAME; the password is read from standard input."""
    password = _read_password()
    try:
        created = accounts.create_user(
            db.session,
            current_app.extensions["intake.keyring"],
            username=username,
            password=password,
            role=role,
            teams=list(teams),
            actor=_actor(),
            languages=list(languages) or None,
            known_languages=_known_languages(),
        )
        db.session.commit()
    except accounts.AccountError as error:
        db.session.rollback()
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps({"username": username, "totp_secret": created.totp_secret}))
        return
    click.echo(f"Created {role} {username!r}" + (f" in {', '.join(teams)}" if teams else ""))
    click.echo(f"Languages: {', '.join(created.user.language_codes)}")
    click.echo(f"TOTP secret: {created.totp_secret}")
    click.echo(f"Authenticator URI: {created.otpauth_uri}")


def _known_languages() -> set[str]:
    """English and the languages of the routing file: the ones routing can serve."""
    return {"en", *current_app.extensions["intake.routing"].languages}


@users.command("set-languages")
@click.argument("username")
@click.argument("languages", nargs=-1, required=True)
@with_appcontext
def users_set_languages(username: str, languages: tuple[str, ...]) -> None:
    """Set the languages USERNAME works in (all of them, e.g. `en es`); new requests that need
    one of them can be assigned to USERNAME."""
    try:
        codes = accounts.set_languages(
            db.session, username, list(languages), _actor(), _known_languages()
        )
        db.session.commit()
    except accounts.AccountError as error:
        db.session.rollback()
        raise click.ClickException(str(error)) from None
    click.echo(f"{username!r} works in: {', '.join(codes)}")


@users.command("set-skills")
@click.argument("username")
@click.argument("skills", nargs=-1)
@click.option("--none", "clear", is_flag=True, help="Take every skill away.")
@with_appcontext
def users_set_skills(username: str, skills: tuple[str, ...], clear: bool) -> None:
    """Set the skills USERNAME holds (all of them, e.g. `ivig`): automatic assignment gives a
    team's requests only to members with every skill the team asks for."""
    from intake.requests import assignment

    if bool(skills) == clear:
        raise click.UsageError("give the skills, or --none to take them all away")
    table = current_app.extensions["intake.routing"]
    try:
        names = assignment.set_skills(db.session, username, skills, _actor(), table.skills)
        db.session.commit()
    except assignment.AssignmentError as error:
        db.session.rollback()
        raise click.ClickException(str(error)) from None
    click.echo(f"{username!r} holds: {', '.join(names) or 'no skills'}")


@users.command("set-cap")
@click.argument("username")
@click.argument("cap")
@with_appcontext
def users_set_cap(username: str, cap: str) -> None:
    """Set how many open requests automatic assignment may give USERNAME (a number, or `team`
    for their team's cap); raising it gives them waiting requests at once."""
    from intake.requests import assignment

    if cap != "team" and not cap.isdigit():
        raise click.UsageError("CAP is a whole number, or `team` for the team's cap")
    try:
        assignment.set_cap(db.session, username, None if cap == "team" else int(cap), _actor())
        db.session.commit()
    except assignment.AssignmentError as error:
        db.session.rollback()
        raise click.ClickException(str(error)) from None
    click.echo(f"{username!r}: cap " + ("of their team" if cap == "team" else cap))


@users.command("set-away")
@click.argument("username")
@click.option("--back", is_flag=True, help="Available again: backfilled at once.")
@with_appcontext
def users_set_away(username: str, back: bool) -> None:
    """Mark USERNAME away (automatic assignment gives them nothing new) or, with --back,
    available again; what they hold stays theirs."""
    from sqlalchemy import select

    from intake.models import User
    from intake.requests import assignment

    user_id = db.session.execute(select(User.id).where(User.username == username)).scalar()
    if user_id is None:
        raise click.ClickException(f"no user {username!r}")
    changed = assignment.set_away(db.session, user_id, not back, now(), actor=_actor())
    db.session.commit()
    state = "available" if back else "away"
    click.echo(f"{username!r} is {state}" + ("" if changed else " already"))


@users.command("assignment")
@click.argument("username")
@click.option("--json", "as_json", is_flag=True)
@with_appcontext
def users_assignment(username: str, as_json: bool) -> None:
    """Show what automatic assignment knows of USERNAME: teams, languages, skills, cap, away."""
    from intake.requests import assignment

    table = current_app.extensions["intake.routing"]
    try:
        facts = assignment.describe(db.session, table, username)
    except assignment.AssignmentError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(facts))
        return
    teams = ", ".join(f"{t} ({mode})" for t, mode in facts["teams"].items()) or "none"
    click.echo(f"{username}: {'away' if facts['away'] else 'available'}; teams {teams}")
    click.echo(
        f"languages {', '.join(facts['languages'])}; skills {', '.join(facts['skills']) or 'none'}"
    )
    click.echo(f"open requests {facts['open']}; cap {facts['cap'] or 'of their team'}")


@users.command("disable")
@click.argument("username")
@with_appcontext
def users_disable(username: str) -> None:
    """Disable USERNAME and end all of their sessions."""
    try:
        accounts.disable_user(db.session, username, _actor(), now())
        db.session.commit()
    except accounts.AccountError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Disabled {username!r}; their sessions are ended.")


@users.command("reset-mfa")
@click.argument("username")
@click.option("--json", "as_json", is_flag=True)
@with_appcontext
def users_reset_mfa(username: str, as_json: bool) -> None:
    """Give USERNAME a new TOTP secret (the old one stops working) and end their sessions."""
    try:
        created = accounts.reset_mfa(
            db.session, current_app.extensions["intake.keyring"], username, _actor(), now()
        )
        db.session.commit()
    except accounts.AccountError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps({"username": username, "totp_secret": created.totp_secret}))
        return
    click.echo(f"TOTP secret: {created.totp_secret}")
    click.echo(f"Authenticator URI: {created.otpauth_uri}")


@users.command("set-password")
@click.argument("username")
@with_appcontext
def users_set_password(username: str) -> None:
    """Give USERNAME a new password (read from standard input) and end all of their sessions."""
    password = _read_password()
    try:
        accounts.set_password(db.session, username, password, _actor(), now())
        db.session.commit()
    except accounts.AccountError as error:
        db.session.rollback()
        raise click.ClickException(str(error)) from None
    click.echo(f"New password set for {username!r}; their sessions are ended.")


@users.command("unfreeze")
@click.argument("username")
@with_appcontext
def users_unfreeze(username: str) -> None:
    """Clear USERNAME's frozen second factor and per-account login delay.

    Check with the person first: a freeze means someone typed the right password and then
    wrong codes, so it may be time for `users set-password` and `users reset-mfa` instead.
    """
    try:
        cleared = accounts.unfreeze(
            db.session, current_app.extensions["intake.keyring"], username, _actor(), now()
        )
        db.session.commit()
    except accounts.AccountError as error:
        db.session.rollback()
        raise click.ClickException(str(error)) from None
    names = {
        "mfa_frozen": "the frozen second factor",
        "otp_failures": "the count of wrong codes",
        "account_delay": "the login delay",
    }
    what = ", ".join(names[item] for item in cleared) or "nothing was frozen or delayed"
    click.echo(f"Unfroze {username!r}: {what}.")


@click.group("teams")
def teams() -> None:
    """Create teams of pharmacy staff."""


@teams.command("create")
@click.argument("name")
@click.option("--spanish", is_flag=True, help="The team serves Spanish-speaking patients.")
@click.option("--display-name", default=None, help="A readable name (defaults to NAME).")
@with_appcontext
def teams_create(name: str, spanish: bool, display_name: str | None) -> None:
    """Create team NAME (its id in config/routing.toml)."""
    table = current_app.extensions["intake.routing"]
    try:
        accounts.create_team(
            db.session,
            name,
            display_name or (table.teams[name].name if name in table.teams else name),
            spanish,
            _actor(),
        )
        db.session.commit()
    except accounts.AccountError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Created team {name!r}" + (" (Spanish-speaking)" if spanish else ""))
    if name not in table.teams:
        click.echo(f"Note: no rule routes to {name!r} yet; add it to the routing file.", err=True)


@click.command("demo")
@click.option("--if-empty", is_flag=True, help="Do nothing if demo users already exist.")
@click.option("--requests", "count", default=36, show_default=True)
@with_appcontext
def demo(if_empty: bool, count: int) -> None:
    """Seed demo teams, users (credentials printed) and requests (embedded profile only)."""
    from intake.ops.demo import seed

    settings = current_app.extensions["intake.settings"]
    if not settings.embedded:
        raise click.ClickException("demo data is only for the embedded profile")
    for line in seed(
        current_app._get_current_object(),  # type: ignore[attr-defined]
        count=count,
        if_empty=if_empty,
    ):
        click.echo(line)


@click.command("demo-otp")
@click.argument("username")
@with_appcontext
def demo_otp(username: str) -> None:
    """Print the current TOTP code of a demo user (embedded profile only)."""
    import pyotp
    from sqlalchemy import select

    from intake.models import User

    if not current_app.extensions["intake.settings"].embedded:
        raise click.ClickException("only for the embedded profile's demo users")
    user = db.session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None or not user.demo:
        raise click.ClickException("no such demo user")
    secret = accounts.totp_secret(current_app.extensions["intake.keyring"], user)
    click.echo(pyotp.TOTP(secret).now())


@click.group("keys")
def keys() -> None:
    """Generate, rotate and inspect the keyring."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new keyring (JSON) for INTAKE_KEYRING; keep it in your secret store."""
    from intake.crypto.phi import Keyring

    click.echo(Keyring.generate().to_json())


@keys.command("status")
@with_appcontext
def keys_status() -> None:
    """Show the primary KEK and how many rows each KEK protects."""
    from intake.crypto.rotation import key_usage

    keyring = current_app.extensions["intake.keyring"]
    usage = key_usage(db.session)
    click.echo(f"primary: {keyring.primary}")
    for key_id in sorted(keyring.keks):
        count = usage.get(key_id, 0)
        note = (
            " (primary)"
            if key_id == keyring.primary
            else (" (unused: may be removed)" if count == 0 else " (rewrap pending)")
        )
        click.echo(f"  {key_id}: {count} rows{note}")
    unknown = sorted(set(usage) - set(keyring.keks))
    if unknown:
        raise click.ClickException(f"rows use key ids missing from the keyring: {unknown}")


@keys.command("rotate")
@with_appcontext
def keys_rotate() -> None:
    """Add a new primary KEK; data keys are rewrapped by the worker (or `intake keys rewrap`)."""
    from pathlib import Path

    from intake.crypto.rotation import record_rotation, write_keyring_file
    from intake.ops.embedded import read_secret_setting

    settings = current_app.extensions["intake.settings"]
    old = current_app.extensions["intake.keyring"]
    new = old.with_new_primary()
    path: Path | None
    if settings.keyring is None:
        path = Path(settings.data_dir) / "keyring.json"
    else:
        candidate = Path(settings.keyring.strip())
        path = (
            candidate
            if (
                read_secret_setting(settings.keyring) != settings.keyring.strip()
                and candidate.is_file()
            )
            else None
        )  # type: ignore[assignment]
    record_rotation(db.session, old, new, _actor())
    if path is not None:
        write_keyring_file(path, new)
        db.session.commit()
        click.echo(f"New primary key {new.primary} written to {path}.")
    else:
        db.session.commit()
        click.echo(new.to_json())
        click.echo(f"Store this keyring as INTAKE_KEYRING (new primary {new.primary}).", err=True)
    click.echo("Restart web, worker and beat; the worker then rewraps every data key.", err=True)


@keys.command("rewrap")
@with_appcontext
def keys_rewrap() -> None:
    """Rewrap every data key under the primary KEK now."""
    from intake.crypto.rotation import rewrap_data_keys

    keyring = current_app.extensions["intake.keyring"]
    total = 0
    while done := rewrap_data_keys(db.session, keyring):
        total += done
    click.echo(f"Rewrapped {total} data keys under {keyring.primary}.")


@click.group("retention")
def retention() -> None:
    """Crypto-shred requests closed longer than the retention period."""


@retention.command("purge")
@with_appcontext
def retention_purge() -> None:
    """Shred every request closed more than INTAKE_RETENTION_DAYS ago."""
    from intake.requests.retention import purge_expired

    days = current_app.extensions["intake.settings"].retention_days
    total = 0
    while purged := purge_expired(db.session, now(), days):
        total += len(purged)
    click.echo(f"Purged {total} requests closed more than {days} days ago.")


@migrate_db.command("grant-app")
@click.argument("role")
@with_appcontext
def db_grant_app(role: str) -> None:
    """Grant ROLE the app's privileges only (PostgreSQL; run as the owner after each upgrade).

    ROLE may then SELECT and INSERT on audit_events, use the other tables' rows, and nothing
    more: no UPDATE, DELETE or TRUNCATE of audit events, no ALTER or DROP of any table.
    """
    from intake.ops.database_roles import DatabaseRoleError, grant_app_role

    try:
        with db.engine.begin() as connection:
            grants = grant_app_role(connection, role)
    except DatabaseRoleError as error:
        raise click.ClickException(str(error)) from None
    for grant in grants:
        click.echo(f"{grant.table}: {', '.join(grant.privileges)}")
    click.echo(f"Granted {role} the app's privileges on {len(grants)} tables.")


COMMANDS: list[click.Command] = [
    serve,
    users,
    teams,
    keys,
    retention,
    audit,
    backup,
    demo,
    demo_otp,
]
