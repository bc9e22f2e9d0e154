"""``intake serve``: web, worker and beat for one machine, stopped together on Ctrl-C."""

from __future__ import annotations

from flask import Flask


def run(app: Flask, host: str, port: int) -> None:
    from waitress import serve

    settings = app.extensions["intake.settings"]
    print(f"Intake is running: open http://{host}:{port}/  (profile: {settings.profile})")
    serve(app, host=host, port=port, threads=8, ident="intake")
