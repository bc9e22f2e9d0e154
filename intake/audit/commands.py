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
    TrailReport,
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
        click.echo(_witness_line(trail))
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


def _witness_line(trail: TrailReport) -> str:
    """Who cosigned the latest checkpoint, in words."""
    if trail.latest is None:
        return "The latest checkpoint is not a Merkle tree head, so no witness could cosign it."
    if not trail.cosigned_by and not current_app.extensions["intake.settings"].audit_witnesses:
        return (
            f"The latest checkpoint (tree size {trail.latest.size}) has no witness: none is "
            "configured (INTAKE_AUDIT_WITNESSES), so only the pharmacy's own key vouches for it."
        )
    if not trail.cosigned_by:
        return (
            f"The latest checkpoint (tree size {trail.latest.size}) is cosigned by none of the "
            "configured witnesses."
        )
    return (
        f"The latest checkpoint (tree size {trail.latest.size}) is cosigned by "
        f"{', '.join(trail.cosigned_by)}."
    )


@audit.command("signer")
@click.option("--once", is_flag=True, help="Sign one checkpoint (if needed) and exit.")
@with_appcontext
def signer_command(once: bool) -> None:
    """Run the checkpoint signer: the only process given INTAKE_AUDIT_SIGNING_KEY."""
    from intake.audit.signer import run_signer

    try:
        run_signer(current_app._get_current_object(), once=once)  # type: ignore[attr-defined]
    except (CheckpointError, keys.AuditKeyError) as error:
        raise click.ClickException(str(error)) from None


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


# -- proofs and witnesses -------------------------------------------------------------------


@audit.command("prove")
@click.argument("reference")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the proof here (default: intake-proof-<REF>-<size>.json in this folder).",
)
@with_appcontext
def prove(reference: str, output: Path | None) -> None:
    """Write an offline-checkable proof of a request's events (recorded as audit.exported).

    Check it anywhere with `intake-verify proof FILE --key VKEY`.
    """
    from intake.audit.proofs import ProofUnavailable, recorded_proof
    from intake.requests.references import normalize_reference

    normalized = normalize_reference(reference)
    if normalized is None:
        raise click.BadParameter("not a reference like R-7K3M-Q9P2", param_hint="REFERENCE")
    settings = current_app.extensions["intake.settings"]
    try:
        proof = recorded_proof(db.session, settings, normalized, actor=cli_actor())
    except ProofUnavailable as error:
        raise click.ClickException(str(error)) from None
    target = output or Path(proof.filename)
    target.write_text(proof.to_json(), encoding="utf-8")
    click.echo(
        f"Wrote {target}: {len(proof.events)} events of {normalized} proven against the signed "
        f"checkpoint of size {proof.size}"
        + (f"; {proof.pending} more after it, not yet provable." if proof.pending else ".")
    )


@audit.command("consistency")
@click.argument("old_size", type=click.IntRange(min=1))
@click.argument("new_size", type=click.IntRange(min=1), required=False)
@click.option(
    "-o",
    "--output",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write OLD.note, NEW.note and the proof into this folder, for intake-verify.",
)
@with_appcontext
def consistency(old_size: int, new_size: int | None, folder: Path | None) -> None:
    """Print the proof that the checkpoint of NEW_SIZE (default: latest) extends OLD_SIZE's.

    One base64 hash per line. Check it with
    `intake-verify consistency OLD.note NEW.note PROOF --key VKEY`.
    """
    from intake.audit.proofs import ProofUnavailable, consistency_between

    settings = current_app.extensions["intake.settings"]
    try:
        found = consistency_between(db.session, settings, old_size, new_size)
    except ProofUnavailable as error:
        raise click.ClickException(str(error)) from None
    finally:
        db.session.rollback()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        old, new = found.old.size, found.new.size
        (folder / f"checkpoint-{old}.note").write_text(found.old.note, encoding="utf-8")
        (folder / f"checkpoint-{new}.note").write_text(found.new.note, encoding="utf-8")
        (folder / f"consistency-{old}-{new}.proof").write_text(found.proof_text(), "utf-8")
    click.echo(found.proof_text(), nl=False)


@audit.command(
    "witness", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
)
@click.pass_context
def witness(ctx: click.Context) -> None:
    """Run a witness: cosign checkpoints that extend the last one seen, refuse a fork.

    A thin wrapper of `intake-verify witness` (no database, no app): for example
    `intake audit witness serve --listen 0.0.0.0:8380 --state witness.json --key witness.skey
    --log VKEY`. Without --log, the log's public keys from INTAKE_AUDIT_VERIFY_KEYS are used.
    """
    from intake_verify import cli as verify_cli

    args = list(ctx.args)
    if "--log" not in args and args[:1] == ["serve"]:
        try:
            settings = current_app.extensions["intake.settings"]
        except RuntimeError:
            settings = None
        if settings is not None:
            for verifier in keys.load_verifiers(settings):
                args += ["--log", verifier.vkey]
    ctx.exit(verify_cli.main(["witness", *args]))
