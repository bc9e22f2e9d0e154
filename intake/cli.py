"""The ``intake`` command: Flask's CLI with Intake's commands added."""

from __future__ import annotations

import sys

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


def main() -> None:
    cli(prog_name="intake")
