"""Fixtures for real-browser tests: a live server, a headless Chromium, a page per test.

The browser is Debian's Chromium (``/usr/bin/chromium``) driven through Playwright's sync API
with ``executable_path``; Playwright's own browser download is never used. Without that binary
the browser tests are skipped, except under ``CI=true`` where a missing browser is a failure.

A test chooses its browser context with ``@pytest.mark.browser_context(locale=..., viewport=...)``
(any keyword of ``Browser.new_context``); the default is an English desktop browser. Each test
gets a folder ``test-output/<test name>/`` (git-ignored) for screenshots and reports, emptied
when the test starts; a failing test also leaves ``failure.png`` there.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IN_CI = os.environ.get("CI", "").lower() == "true"
OUTPUT_ROOT = Path(__file__).resolve().parents[2] / "test-output"
DEFAULT_CONTEXT: dict[str, Any] = {"locale": "en-US", "viewport": {"width": 1280, "height": 900}}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "browser_context(**options): options for the Playwright browser context of the test",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's report on the item, so ``page`` can tell a failed test."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """Browser tests run on SQLite only: the browser, not the database, is under test."""
    return str(request.param)


@pytest.fixture
def live_server(app: Flask) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) in a background thread; yield its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def browser(playwright: Any) -> Iterator[Any]:
    if not CHROMIUM.exists():
        message = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
    )
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    """``test-output/<test name>/``, emptied, for what a person may want to look at later."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_")
    folder = OUTPUT_ROOT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest, output_dir: Path) -> Iterator[Any]:
    options = dict(DEFAULT_CONTEXT)
    marker = request.node.get_closest_marker("browser_context")
    if marker is not None:
        options.update(marker.kwargs)
    context = browser.new_context(**options)
    context.set_default_timeout(10_000)
    page = context.new_page()
    try:
        yield page
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed and not page.is_closed():
            try:
                page.screenshot(path=str(output_dir / "failure.png"), full_page=True)
            except Exception as error:  # noqa: BLE001 - a failed screenshot must not hide the failure
                print(f"could not take the failure screenshot: {error}")
        context.close()
