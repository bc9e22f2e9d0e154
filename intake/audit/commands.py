"""``intake audit``: verify the audit trail and its signed checkpoints, sign a checkpoint."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import click
from flask import current_app
from flask.cli import with_appcontext

from intake.audit import keys
from intake.audit.chain import record_event
from intake.audit.checkpoints import (
    CheckpointError,
    checkpoints_path,
    verify_trail,
    write_checkpoint,
)
from intake.extensions import db

CLI_ACTOR = "system:cli"


def cli_actor() -> str:
    """The audit actor of a command run by hand: ``system:cli:<os user>``."""
    try:
        return f"{CLI_ACTOR}:{getpass.getuser()}"
    except (KeyError, OSError):
        return CLI_ACTOR


@click.group("audit")
def audit() -> None:
    """Verify the audit trail and sign checkpoints of it."""


@audit.command("verify")
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"ok", "events", "first_bad_seq", "problem"}.'
)
@click.option(
    "--checkpoints",
    "checkpoints_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A checkpoints file to check against (default: INTAKE_AUDIT_CHECKPOINTS).",
)
@with_appcontext
def verify(as_json: bool, checkpoints_file: Path | None) -> None:
    """Recompute the hash chain, hold it against every signed checkpoint; exit 1 if broken."""
    settings = current_app.extensions["intake.settings"]
    try:
        trail = verify_trail(db.session, settings, checkpoints_file)
    except CheckpointError as error:
        raise click.ClickException(str(error)) from None
    report = trail.chain
    # Recorded after the check, so the event is never part of what it vouches for.
    record_event(
        db.session,
        actor=cli_actor(),
        action="audit.verified",
        outcome="success" if report.ok else "failure",
        details={
            "events": report.events,
            "first_bad_seq": report.first_bad_seq,
            "problem": report.problem,
            "checkpoints": report.checkpoints,
        },
    )
    db.session.commit()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "events": report.events,
                    "first_bad_seq": report.first_bad_seq,
                    "problem": report.problem,
                    "checkpoints": trail.summary(),
                }
            )
        )
    elif report.ok:
        click.echo(
            f"Audit trail intact: {report.events} events (seq 1 to {report.last_seq}); "
            f"{report.checkpoints} of {trail.lines} signed checkpoints match ({trail.path})."
        )
    else:
        click.echo(f"AUDIT TRAIL BROKEN at seq {report.first_bad_seq}: {report.problem}")
        click.echo(
            f"Read {report.events} events; {report.checkpoints} of {trail.lines} signed "
            f"checkpoints matched before that ({trail.path})."
        )
    click.get_current_context().exit(0 if report.ok else 1)


@audit.group("keys")
def keys_group() -> None:
    """Make the checkpoint signing key pair."""


@keys_group.command("generate")
@click.option("--name", default=None, help="The log's name (default: INTAKE_AUDIT_ORIGIN).")
@with_appcontext
def keys_generate(name: str | None) -> None:
    """Print a new private key (for the signer's env only) and its public key (for everyone)."""
    settings = current_app.extensions["intake.settings"]
    skey, vkey = keys.generate_keys(name or keys.log_origin(settings))
    click.echo("# The signer's env file only (never web, worker or beat):")
    click.echo(f"INTAKE_AUDIT_SIGNING_KEY={skey}")
    click.echo("# Everyone who verifies (web, worker, beat, signer, auditors); keep old ones too:")
    click.echo(f"INTAKE_AUDIT_VERIFY_KEYS={vkey}")


@audit.command("checkpoint")
@with_appcontext
def checkpoint() -> None:
    """Sign the chain's head into the checkpoints file (and record audit.checkpointed)."""
    settings = current_app.extensions["intake.settings"]
    try:
        signed = write_checkpoint(db.session, settings, actor=cli_actor())
    except CheckpointError as error:
        raise click.ClickException(str(error)) from None
    if signed is None:
        click.echo("Nothing to sign: the audit trail is empty or its head is already signed.")
        return
    click.echo(
        f"Signed checkpoint at seq {signed.seq} (key {signed.key_id}) "
        f"into {checkpoints_path(settings)}."
    )
