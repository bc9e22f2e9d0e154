"""Operator commands: serve, demo data, key and audit maintenance."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext


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


COMMANDS: list[click.Command] = [serve]
