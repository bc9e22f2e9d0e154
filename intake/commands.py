"""Operator commands: serve, users, teams, demo data."""

from __future__ import annotations

import getpass
import json
import sys

import click
from flask import current_app
from flask.cli import with_appcontext

from intake import accounts
from intake.clock import now
from intake.extensions import db

CLI_ACTOR = "system:cli"


def _actor() -> str:
    try:
        return f"{CLI_ACTOR}:{getpass.getuser()}"
    except (KeyError, OSError):
        return CLI_ACTOR


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--web-only", is_flag=True, help="Run the web app without a worker and beat.")
@with_appcontext
def serve(host: str, port: int, web_only: bool) -> None:
    """Run the web app, a Celery worker and beat on this machine; Ctrl-C stops all three."""
    from intake.serve import run

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
@click.option("--json", "as_json", is_flag=True, help='Print {"username", "totp_secret"}.')
@with_appcontext
def users_create(username: str, role: str, teams: tuple[str, ...], as_json: bool) -> None:
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
        )
        db.session.commit()
    except accounts.AccountError as error:
        db.session.rollback()
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps({"username": username, "totp_secret": created.totp_secret}))
        return
    click.echo(f"Created {role} {username!r}" + (f" in {', '.join(teams)}" if teams else ""))
    click.echo(f"TOTP secret: {created.totp_secret}")
    click.echo(f"Authenticator URI: {created.otpauth_uri}")


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
    from intake.demo import seed

    settings = current_app.extensions["intake.settings"]
    if not settings.embedded:
        raise click.ClickException("demo data is only for the embedded profile")
    for line in seed(
        current_app._get_current_object(),
        count=count,  # type: ignore[attr-defined]
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


COMMANDS: list[click.Command] = [serve, users, teams, demo, demo_otp]
