"""What every page gets: security headers, plain error pages, health probes; the settings."""

from __future__ import annotations

import stat

import pytest

from config import Settings, SettingsError
from intake import create_app
from intake.crypto.phi import Keyring


@pytest.fixture(params=["sqlite"])
def backend(request):
    return request.param


EVERY_PATIENT_PAGE = [
    "/",
    "/refill",
    "/contact",
    "/contact?topic=side_effect",
    "/status",
    "/thanks/R-0000-0000",
    "/legal/terms",
    "/legal/npp?lang=es",
    "/legal/privacy/2026-11",
    "/legal/contact/2026-11",
    "/nowhere",
]


@pytest.mark.parametrize("path", EVERY_PATIENT_PAGE)
def test_security_headers_on_every_page(client, path):
    response = client.get(path)
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-store"
    assert "Strict-Transport-Security" not in response.headers  # embedded profile: plain http


def test_pages_have_no_inline_script_or_style_and_no_external_assets(client):
    import re

    for path in EVERY_PATIENT_PAGE:
        html = client.get(path).get_data(as_text=True)
        assert "<script>" not in html and "<style" not in html and " style=" not in html
        assert not re.search(r'(src|href)="(https?:)?//', html), path


def test_production_profile_sends_hsts_and_secure_cookies(settings):
    app = create_app(settings.replace(profile="production"))
    response = app.test_client().get("/refill", base_url="https://intake.example")
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    assert (
        "Secure" in response.headers["Set-Cookie"] and "HttpOnly" in response.headers["Set-Cookie"]
    )


def test_production_session_cookie_cannot_be_planted_by_a_sibling_subdomain(settings):
    """Attack: www.pharmacy.example (or any sibling) sets ``intake_session=<the attacker's own
    logged-in session>; Domain=pharmacy.example``; the pharmacist's browser then sends it to
    Intake and works as the attacker (login CSRF with no POST for fetch metadata to refuse).
    A ``__Host-`` cookie is kept by browsers only when Secure, for ``/`` and without Domain, so
    no other host can set one."""
    app = create_app(settings.replace(profile="production"))
    response = app.test_client().get("/refill", base_url="https://intake.pharmacy.example")
    [cookie] = [c for c in response.headers.getlist("Set-Cookie") if "session=" in c]
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert attributes[0].startswith("__host-intake_session=")
    assert "secure" in attributes and "path=/" in attributes
    assert not any(part.startswith("domain=") for part in attributes)


def test_session_cookie_is_httponly_and_samesite_lax(client):
    response = client.get("/refill")
    cookie = [c for c in response.headers.getlist("Set-Cookie") if c.startswith("intake_session=")]
    assert cookie and "HttpOnly" in cookie[0] and "SameSite=Lax" in cookie[0]


def test_not_found_page_is_plain_and_translated(client):
    response = client.get("/nowhere?lang=es")
    assert response.status_code == 404
    assert "No encontramos la página" in response.get_data(as_text=True)


def test_the_proxys_too_large_page_is_the_apps_413_page(client):
    """nginx fetches this page for a body over its own limit (deploy/nginx)."""
    response = client.get("/errors/too-large", headers={"Accept-Language": "es"})
    assert response.status_code == 413
    assert "Lo que intentó enviar era demasiado grande" in response.get_data(as_text=True)


def test_wrong_method_is_405_not_500(client):
    assert client.delete("/refill").status_code == 405


def test_database_down_gives_503_and_a_plain_message(app, settings):
    broken = create_app(
        settings.replace(
            database_url="postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1"
        )
    )
    client = broken.test_client()
    from tests.conftest import hidden_fields, valid_refill

    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    response = client.post("/refill", data={**valid_refill(), **hidden})
    assert response.status_code == 503
    assert "Nothing was saved" in response.get_data(as_text=True)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "database unreachable" in ready.get_data(as_text=True)


def test_health_probes(client):
    assert client.get("/healthz").get_data(as_text=True) == "ok\n"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_data(as_text=True) == "ready\n"


def test_production_refuses_to_start_without_its_secrets():
    with pytest.raises(SettingsError, match="INTAKE_SECRET_KEY"):
        Settings.from_env(
            {"INTAKE_PROFILE": "production", "INTAKE_DATABASE_URL": "postgresql://db/intake"}
        )
    # Every process needs the public keys that check audit checkpoints (the private key is the
    # signer's alone, and not required of the others).
    with pytest.raises(SettingsError, match="INTAKE_AUDIT_VERIFY_KEYS"):
        Settings.from_env(
            {
                "INTAKE_PROFILE": "production",
                "INTAKE_SECRET_KEY": "x" * 40,
                "INTAKE_KEYRING": "{}",
                "INTAKE_DATABASE_URL": "postgresql://db/x",
            }
        )
    with pytest.raises(SettingsError, match="INTAKE_KEYRING"):
        Settings.from_env(
            {
                "INTAKE_PROFILE": "production",
                "INTAKE_SECRET_KEY": "x" * 40,
                "INTAKE_DATABASE_URL": "postgresql://db/intake",
            }
        )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("INTAKE_MIN_FILL_SECONDS", "soon"),
        ("INTAKE_MAX_FORM_AGE_SECONDS", "-1"),
        ("INTAKE_PROFILE", "staging"),
    ],
)
def test_bad_settings_are_named(name, value):
    with pytest.raises(SettingsError, match=name if name != "INTAKE_PROFILE" else "PROFILE"):
        Settings.from_env({name: value})


def test_embedded_profile_generates_its_secrets_once_with_mode_0600(tmp_path, caplog):
    settings = Settings(data_dir=tmp_path / "var")
    first = create_app(settings)
    for name in ("secret_key", "keyring.json"):
        mode = stat.S_IMODE((tmp_path / "var" / name).stat().st_mode)
        assert mode == 0o600, name
    assert sum("secret_generated" in r.getMessage() for r in caplog.records) == 2
    second = create_app(settings)
    assert first.secret_key == second.secret_key
    assert first.extensions["intake.keyring"] == second.extensions["intake.keyring"]


def test_keyring_can_come_from_a_file(tmp_path):
    ring = Keyring.generate()
    path = tmp_path / "keyring.json"
    path.write_text(ring.to_json())
    app = create_app(Settings(data_dir=tmp_path / "var", keyring=str(path), secret_key="s" * 40))
    assert app.extensions["intake.keyring"] == ring
    assert not (tmp_path / "var" / "keyring.json").exists()


def test_pages_answering_a_post_keep_the_headers_and_no_inline_code(app, client):
    """The pages a POST renders (a form sent back, a status answer, a stopped look-up, the
    honeypot's decoy) carry form values or PHI: the same strict policy and no-store."""
    import re

    from tests.conftest import hidden_fields, valid_refill

    def check(response):
        csp = response.headers["Content-Security-Policy"]
        assert "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert response.headers["Cache-Control"] == "no-store"
        html = response.get_data(as_text=True)
        assert "<script>" not in html and "<style" not in html and " style=" not in html
        assert not re.search(r" on[a-z]+=", html)

    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    check(client.post("/refill", data={**hidden, **valid_refill(phone="12")}))  # invalid
    check(client.post("/refill", data={**hidden, **valid_refill(), "switch_language": "es"}))
    check(client.post("/refill", data={**hidden, **valid_refill(extra_comments="x")}))  # decoy
    check(client.post("/refill", data={**hidden, **valid_refill(), "csrf_token": "x"}))
    sent = client.post("/refill", data={**hidden, **valid_refill()})
    check(client.get(sent.headers["Location"]))
    check(client.post("/refill", data={**hidden, **valid_refill(first_name="Eve")}))  # key reused
    token = hidden_fields(client.get("/status").get_data(as_text=True))["csrf_token"]
    for _ in range(6):  # not found five times, then stopped
        answer = client.post(
            "/status",
            data={"csrf_token": token, "reference": "R-0000-0000", "date_of_birth": "1980-01-01"},
        )
        check(answer)
    assert answer.status_code == 429
