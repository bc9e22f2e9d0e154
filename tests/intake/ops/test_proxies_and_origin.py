"""Forwarded headers from named proxies only; cross-site writes refused; production over HTTPS.

Each test here is an attack or a deployment that failed before: a client reaching the app
server directly with a rotating ``X-Forwarded-For``, a form posted from another site, and the
production profile refusing every same-origin POST because browsers send no Referer.
"""

from __future__ import annotations

import ipaddress

import pytest

from config import Settings, SettingsError
from intake.crypto.phi import ip_pseudonym
from intake.ops.proxies import TrustedProxies
from tests.conftest import Patient, hidden_fields, reference_from, valid_contact
from tests.intake.staff.conftest import (
    PASSWORD,
    create_staff_user,
    create_teams,
    install_clock,
    post_login,
)


@pytest.fixture(params=["sqlite"])
def backend(request):
    return request.param


def _remote_addr_seen(make_app, settings, **environ):
    app = make_app(settings)

    @app.get("/_ip")
    def show_ip():
        from flask import request

        return f"{request.remote_addr} {request.scheme}"

    headers = environ.pop("headers", {})
    return app.test_client().get("/_ip", headers=headers, environ_base=environ).get_data(
        as_text=True
    )


def nets(*items: str):
    return tuple(ipaddress.ip_network(item) for item in items)


def test_forwarded_headers_are_believed_from_a_listed_proxy(make_app, settings):
    seen = _remote_addr_seen(
        make_app,
        settings.replace(trusted_proxies=nets("10.0.0.0/8")),
        REMOTE_ADDR="10.1.2.3",
        headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
    )
    assert seen == "203.0.113.7 https"


def test_forwarded_headers_from_anyone_else_are_ignored(make_app, settings):
    """A client that reaches the app server directly cannot choose its own address."""
    seen = _remote_addr_seen(
        make_app,
        settings.replace(trusted_proxies=nets("10.0.0.0/8")),
        REMOTE_ADDR="198.51.100.9",
        headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
    )
    assert seen == "198.51.100.9 http"
    # With no proxy configured at all, nobody's headers count.
    assert _remote_addr_seen(
        make_app, settings, headers={"X-Forwarded-For": "203.0.113.7"}
    ) == "127.0.0.1 http"


def test_a_client_cannot_prepend_addresses_past_the_proxy():
    """The proxy appends the address it saw; whatever the client wrote before it is ignored."""
    middleware = TrustedProxies(None, nets("10.0.0.0/8"))
    peer = ipaddress.ip_address("10.0.0.2")
    chain = "203.0.113.99, 198.51.100.4, 10.0.0.7"  # client lie, real client, inner proxy
    assert str(middleware.client_address(peer, chain)) == "198.51.100.4"
    assert str(middleware.client_address(peer, "not-an-address")) == "10.0.0.2"
    assert str(middleware.client_address(peer, "[2001:db8::1]:443")) == "2001:db8::1"


def test_rotating_forwarded_for_from_a_direct_client_is_throttled_as_one(make_app, settings):
    """25 wrong passwords from one socket with a new X-Forwarded-For each time: the throttle
    and the audit pseudonym see one client, because that client is no trusted proxy."""
    app = make_app(settings.replace(trusted_proxies=nets("10.0.0.1")))
    create_teams(app)
    user = create_staff_user(app, "rosa", teams=("refills-main",))
    install_clock(app)
    client = app.test_client()
    statuses = [
        post_login(
            client,
            "rosa",
            "Wrong-password-4417",
            "000000",
            headers={"X-Forwarded-For": f"203.0.113.{n}"},
        ).status_code
        for n in range(25)
    ]
    assert 429 in statuses
    assert statuses[-1] == 429
    assert user.username == "rosa"
    import sqlalchemy as sa

    from intake.extensions import db
    from intake.models import AuditEvent

    with app.app_context():
        pseudonyms = set(
            db.session.scalars(
                sa.select(AuditEvent.ip_hmac).where(AuditEvent.action == "user.login_failed")
            )
        )
    assert pseudonyms == {ip_pseudonym(app.extensions["intake.keyring"], "127.0.0.1")}


@pytest.mark.parametrize("value", ["1", "2"])
def test_a_proxy_count_is_refused_with_the_new_meaning(value):
    with pytest.raises(SettingsError, match="INTAKE_TRUSTED_PROXIES lists the addresses"):
        Settings.from_env({"INTAKE_TRUSTED_PROXIES": value})


def test_a_bad_proxy_address_is_named():
    with pytest.raises(SettingsError, match="INTAKE_TRUSTED_PROXIES"):
        Settings.from_env({"INTAKE_TRUSTED_PROXIES": "10.0.0.1, proxy.local"})
    parsed = Settings.from_env({"INTAKE_TRUSTED_PROXIES": "10.0.0.1, 172.16.0.0/12, ::1"})
    assert [str(n) for n in parsed.trusted_proxies] == ["10.0.0.1/32", "172.16.0.0/12", "::1/128"]


# -- cross-site writes and CSRF over HTTPS --------------------------------------------------------

HTTPS = "https://intake.example"


@pytest.fixture
def production_app(make_app, settings):
    app = make_app(settings.replace(profile="production", public_url=HTTPS))
    app.config["TESTING"] = True
    return app


def _browser_post(client, path, data, fetch_site="same-origin", origin="null"):
    """POST as Chromium does under ``Referrer-Policy: no-referrer``: no Referer, Origin null."""
    headers = {"Sec-Fetch-Site": fetch_site, "Sec-Fetch-Mode": "navigate"}
    if origin is not None:
        headers["Origin"] = origin
    return client.post(path, data=data, base_url=HTTPS, headers=headers)


def test_production_over_https_accepts_a_same_origin_form_without_referer(production_app):
    """The bug that stopped every patient and every login in production."""
    client = production_app.test_client()
    page = client.get("/contact", base_url=HTTPS)
    data = {**valid_contact(), **hidden_fields(page.get_data(as_text=True))}
    response = _browser_post(client, "/contact", data)
    reference_from(response)


def test_production_over_https_lets_staff_log_in_without_referer(production_app):
    create_teams(production_app)
    user = create_staff_user(production_app, "noor", teams=("refills-main",))
    clock = install_clock(production_app)
    client = production_app.test_client()
    page = client.get("/staff/login", base_url=HTTPS)
    data = {
        "csrf_token": hidden_fields(page.get_data(as_text=True))["csrf_token"],
        "username": "noor",
        "password": PASSWORD,
        "otp": user.code(clock()),
    }
    response = _browser_post(client, "/staff/login", data)
    assert response.status_code == 303 and "/staff/queue" in response.headers["Location"]


@pytest.mark.parametrize(
    ("fetch_site", "origin"),
    [("cross-site", "null"), ("same-site", "https://evil.intake.example"), (None, "https://evil.example")],
)
def test_a_form_posted_from_another_site_is_refused_and_stores_nothing(
    production_app, fetch_site, origin
):
    client = production_app.test_client()
    page = client.get("/contact", base_url=HTTPS)
    data = {**valid_contact(), **hidden_fields(page.get_data(as_text=True))}
    headers = {"Origin": origin}
    if fetch_site:
        headers["Sec-Fetch-Site"] = fetch_site
    response = client.post("/contact", data=data, base_url=HTTPS, headers=headers)
    assert response.status_code == 400
    import sqlalchemy as sa

    from intake.extensions import db
    from intake.models import Request

    with production_app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Request)) == 0


def test_an_old_browser_without_fetch_metadata_but_with_our_origin_is_accepted(production_app):
    client = production_app.test_client()
    Patient(client)  # same flow as a browser: GET then POST
    page = client.get("/contact", base_url=HTTPS)
    data = {**valid_contact(), **hidden_fields(page.get_data(as_text=True))}
    response = client.post("/contact", data=data, base_url=HTTPS, headers={"Origin": HTTPS})
    reference_from(response)


def _serve_and_get(app, headers):
    import threading
    import urllib.request

    from intake.ops.serve import make_server

    server = make_server(app, "127.0.0.1", 0)
    port = server.socket.getsockname()[1]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/_ip", headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return response.read().decode()
    finally:
        server.close()
        thread.join(timeout=10)


@pytest.mark.parametrize(("trusted", "expected"), [("127.0.0.1", "203.0.113.7 https"),
                                                   ("10.9.9.9", "127.0.0.1 http")])
def test_intake_serve_behind_a_proxy_tells_clients_apart(make_app, settings, trusted, expected):
    """waitress used to strip X-Forwarded-For, so behind a proxy every user was one client."""
    app = make_app(settings.replace(trusted_proxies=nets(trusted)))

    @app.get("/_ip")
    def show_ip():
        from flask import request

        return f"{request.remote_addr} {request.scheme}"

    seen = _serve_and_get(app, {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    assert seen == expected
