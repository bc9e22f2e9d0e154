"""``intake-verify``: check proofs and consistency offline, run a witness, make keys.

Exit status: 0 when what was checked holds, 1 when it does not, 2 for a usage error (a missing
file, a malformed key).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from intake_verify.checkpoint import Checkpoint, CheckpointError
from intake_verify.encoding import b64decode
from intake_verify.merkle import ProofError, verify_consistency
from intake_verify.note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    NoteError,
    Signer,
    Verifier,
    generate_key,
    open_note,
)
from intake_verify.proof import verify_proof
from intake_verify.witness import Witness, make_server

OK, FAILED, USAGE = 0, 1, 2


class UsageError(Exception):
    """The command cannot run as asked: exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except UsageError as exc:
        print(f"intake-verify: {exc}", file=sys.stderr)
        return USAGE
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intake-verify", description="Check Intake audit proofs offline."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    proof = commands.add_parser("proof", help="check a proof file")
    proof.add_argument("file", type=Path)
    proof.add_argument(
        "--key",
        action="append",
        required=True,
        metavar="VKEY",
        help="the log's verifier key (repeat for rotated keys)",
    )
    proof.add_argument(
        "--witness",
        action="append",
        default=[],
        metavar="VKEY",
        help="a witness whose cosignature is required (repeatable)",
    )
    proof.set_defaults(run=_proof)

    consistency = commands.add_parser("consistency", help="check that a log only grew")
    consistency.add_argument("old", type=Path, metavar="OLD.note")
    consistency.add_argument("new", type=Path, metavar="NEW.note")
    consistency.add_argument(
        "proof", type=Path, metavar="PROOF", help="the consistency proof: one base64 hash a line"
    )
    consistency.add_argument("--key", action="append", required=True, metavar="VKEY")
    consistency.set_defaults(run=_consistency)

    witness = commands.add_parser("witness", help="run a witness")
    witness_commands = witness.add_subparsers(required=True, metavar="COMMAND")
    serve = witness_commands.add_parser("serve", help="serve the tlog-witness HTTP API")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT")
    serve.add_argument("--state", required=True, type=Path, metavar="FILE")
    serve.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="SKEYFILE",
        help="file holding the witness's cosigner key",
    )
    serve.add_argument(
        "--log",
        action="append",
        required=True,
        metavar="VKEY",
        help="a log to witness; its key name is its origin (repeatable)",
    )
    serve.set_defaults(run=_serve)

    keygen = commands.add_parser("keygen", help="make a key pair; prints the skey, then the vkey")
    keygen.add_argument("name")
    keygen.add_argument("--witness", action="store_true", help="a cosigner key for a witness")
    keygen.set_defaults(run=_keygen)
    return parser


def _verifiers(vkeys: Sequence[str]) -> list[Verifier]:
    try:
        return [Verifier.from_vkey(vkey) for vkey in vkeys]
    except NoteError as exc:
        raise UsageError(str(exc)) from exc


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc


def _proof(args: argparse.Namespace) -> int:
    logs, witnesses = _verifiers(args.key), _verifiers(args.witness)
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc}") from exc
    report = verify_proof(data, logs, witnesses)
    if not report.ok:
        print(f"PROOF FAILED: {report.problem}")
        return FAILED
    signed = (
        f", signed {report.checkpoint_time:%Y-%m-%d %H:%M:%S} UTC" if report.checkpoint_time else ""
    )
    print(
        f"Proof verified: {len(report.events)} event(s) of {report.reference} are in the audit "
        f"log {report.origin} of {report.size} events{signed}."
    )
    for event in report.events:
        team = f" by team {event['team']}" if event["team"] else ""
        when, what, outcome = event["created_at"], event["action"], event["outcome"]
        print(f"  seq {event['seq']}  {when}  {what}{team}  {outcome}")
    if report.cosigned_by:
        print("Cosigned by: " + ", ".join(report.cosigned_by) + ".")
    if report.pending:
        print(
            f"The log says {report.pending} more event(s) are too recent for this checkpoint; "
            "they are not proven here."
        )
    return OK


def _consistency(args: argparse.Namespace) -> int:
    logs = _verifiers(args.key)
    try:
        old, new = (_checkpoint(_read(path), logs) for path in (args.old, args.new))
        proof = [b64decode(line) for line in _read(args.proof).split()]
        if old.origin != new.origin:
            raise ProofError(f"the checkpoints are of two logs, {old.origin} and {new.origin}")
        if old.size != 0:  # the empty tree is a prefix of every tree
            verify_consistency(old.size, new.size, old.root, new.root, proof)
    except (NoteError, CheckpointError, ProofError, ValueError) as exc:
        print(f"NOT CONSISTENT: {exc}")
        return FAILED
    print(f"Consistent: {new.origin} at size {new.size} extends size {old.size}.")
    return OK


def _checkpoint(note: str, logs: list[Verifier]) -> Checkpoint:
    return Checkpoint.parse(open_note(note, logs).text)


def _serve(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError("--listen takes HOST:PORT")
    try:
        signer = Signer.from_skey(_read(args.key))
        witness = Witness(args.state, signer, _verifiers(args.log))
    except NoteError as exc:
        raise UsageError(str(exc)) from exc
    server = make_server(witness, host, int(port))
    bound_host, bound_port = server.server_address[:2]
    print(f"Witness {signer.name} listening on {bound_host!s}:{bound_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return OK


def _keygen(args: argparse.Namespace) -> int:
    try:
        skey, vkey = generate_key(args.name, ALG_COSIGNATURE_V1 if args.witness else ALG_ED25519)
    except NoteError as exc:
        raise UsageError(str(exc)) from exc
    print(skey)
    print(vkey)
    return OK


if __name__ == "__main__":
    sys.exit(main())
