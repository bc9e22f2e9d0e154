"""The ``intake`` command: Flask's CLI with Intake's commands added."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import click
from flask.cli import FlaskGroup

from intake import create_app

# The commands that sign checkpoints: the only ones given the audit signing key.
SIGNER_COMMANDS = (["audit", "signer"], ["audit", "checkpoint"])


def _runs_the_signer() -> bool:
    return sys.argv[1:3] in SIGNER_COMMANDS


@click.group(
    cls=FlaskGroup,
    create_app=lambda: create_app(signer=_runs_the_signer()),
    add_version_option=False,
    load_dotenv=False,
    set_debug_flag=False,
)
def cli() -> None:
    """Intake: secure refill-request intake for specialty pharmacies."""


# Intake's own commands are registered on the app (intake.register_commands), so they appear
# here and in app.test_cli_runner() alike.


# Commands that only read an installation's data: run where there is none, they would create a
# fresh data folder with new keys and then fail on its empty database.
READERS_OF_EXISTING_DATA = ("demo-otp",)
DATABASE_FILE = "intake.sqlite3"


def find_data_dir(env: Mapping[str, str], cwd: Path) -> Path | None:
    """The embedded profile's data folder for a reading command, or None if there is none.

    INTAKE_DATA_DIR if set, else ``./var``, else the ``var`` of the checkout Intake runs from
    (where scripts/start puts it), whichever holds a database.
    """
    if env.get("INTAKE_DATA_DIR"):
        candidates = [Path(env["INTAKE_DATA_DIR"])]
    else:
        candidates = [cwd / "var", Path(__file__).resolve().parents[1] / "var"]
    return next((c for c in candidates if (c / DATABASE_FILE).is_file()), None)


def asks_only_for_help(args: Sequence[str]) -> bool:
    """``intake``, ``intake --help`` or ``intake CMD --help``: nothing runs but the help text.

    Only command words may come before ``--help``: after an option (``--display-name --help``)
    or after ``--`` it is a value, and the command runs for real, so it must not be given a
    throwaway data folder and keyring.
    """
    if not args:
        return True
    if "--help" not in args:
        return False
    return not any(word.startswith("-") for word in args[: args.index("--help")])


def _embedded() -> bool:
    return os.environ.get("INTAKE_PROFILE", "embedded") in ("", "embedded")


def main() -> None:
    args = sys.argv[1:]
    if asks_only_for_help(args):
        # Listing the commands builds the app, and an app with no data folder would generate
        # one, with new keys, wherever the help was asked for; the production profile would
        # refuse to build without its secrets. The commands are the same in every profile, so
        # help is built from a throwaway embedded installation: it reads and writes nothing of a
        # real one (not its keys, not its database) and announces nothing.
        from intake.crypto.phi import Keyring

        with tempfile.TemporaryDirectory(prefix="intake-help-") as scratch:
            for name in [name for name in os.environ if name.startswith("INTAKE_")]:
                if name != "INTAKE_LOG_LEVEL":
                    del os.environ[name]
            os.environ["INTAKE_DATA_DIR"] = scratch
            os.environ["INTAKE_SECRET_KEY"] = os.urandom(32).hex()
            os.environ["INTAKE_KEYRING"] = Keyring.generate().to_json()
            cli(prog_name="intake")
        return
    command = args[0] if args else ""
    if command in READERS_OF_EXISTING_DATA and _embedded():
        found = find_data_dir(os.environ, Path.cwd())
        if found is None:
            where = os.environ.get("INTAKE_DATA_DIR") or "./var"
            click.echo(
                f"Error: no Intake database in {where}. Run `intake {command}` in the folder "
                "where you ran scripts/start, or set INTAKE_DATA_DIR to its data folder "
                "(the var/ folder there).",
                err=True,
            )
            sys.exit(2)
        os.environ["INTAKE_DATA_DIR"] = str(found.resolve())
    cli(prog_name="intake")
