"""Operator commands: serve, demo data, key and audit maintenance."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@with_appcontext
def serve(host: str, port: int) -> None:
    """Run the web app (and, on the embedded profile, the worker and beat) on one machine."""
    from intake.serve import run

    run(current_app._get_current_object(), host=host, port=port)  # type: ignore[attr-defined]


COMMANDS: list[click.Command] = [serve]
