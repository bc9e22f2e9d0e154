"""The log file in the data folder: one per process, following the app made last."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import structlog


def open_log_files() -> list[str]:
    """The ``intake.log`` files this process holds open."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed since it was listed (the listing's own fd)
            continue
    return sorted(t for t in targets if t.endswith("intake.log"))


def logged_events(folder: Path) -> list[str]:
    path = folder / "logs" / "intake.log"
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def test_an_app_for_another_data_folder_moves_the_log_file_and_closes_the_old_one(
    make_app, settings, tmp_path
):
    """Before: every data folder an app was made for kept its file open and got every line
    written after, so a process making apps (a test run, commands) held one more file each
    time and wrote each line to all of them."""
    first, second = tmp_path / "first", tmp_path / "second"
    make_app(settings.replace(data_dir=first))
    structlog.get_logger("intake.test").warning("for_the_first")
    make_app(settings.replace(data_dir=second))
    structlog.get_logger("intake.test").warning("for_the_second")

    assert open_log_files() == [str((second / "logs" / "intake.log").resolve())]
    assert "for_the_second" not in logged_events(first)
    assert logged_events(second)[-1] == "for_the_second"
    assert "for_the_first" in logged_events(first)


def test_making_the_same_app_again_keeps_one_file_and_one_stderr_handler(make_app, settings):
    make_app(settings)
    make_app(settings)
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_intake", False)]
    assert sorted(type(h).__name__ for h in ours) == ["FileHandler", "StreamHandler"]
    assert len(open_log_files()) == 1
