"""Intake: a secure refill-request intake pipeline for specialty pharmacies."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from flask import Flask

from config import Settings
from intake.audit import anchor, keys
from intake.clock import utcnow
from intake.crypto.phi import Keyring
from intake.ops import embedded, private_files, tracing, transport
from intake.ops.proxies import TrustedProxies
from intake.pharmacy import load_pharmacy
from intake.requests.consents import load_consents
from intake.requests.routing import load_routing


def create_app(settings: Settings | None = None, *, signer: bool = False) -> Flask:
    """Build the web application for ``settings`` (read from the environment by default).

    Only ``signer`` apps (``intake audit signer`` and ``intake audit checkpoint``) may be given
    the audit signing key in production; web and workers refuse to start with it.
    """
    from intake.ops.logs import configure_logging

    settings = settings or Settings.from_env()
    if not signer:
        keys.refuse_signing_key(settings)
    data_dir = Path(settings.data_dir)
    private_files.protect_data_dir(data_dir)
    configure_logging(settings.log_level, data_dir / "logs")
    private_files.protect_existing(data_dir, settings)

    app = Flask(__name__)
    # X-Forwarded-* (client address for rate limits and audit pseudonyms, https for Secure
    # cookies) are believed from the listed proxies only, and stripped from everyone else.
    app.wsgi_app = TrustedProxies(  # type: ignore[method-assign]
        app.wsgi_app, settings.trusted_proxies
    )
    app.config.update(
        SECRET_KEY=_secret_key(settings),
        SQLALCHEMY_DATABASE_URI=settings.effective_database_url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True},
        MAX_CONTENT_LENGTH=settings.max_content_length,
        MAX_FORM_MEMORY_SIZE=settings.max_content_length,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=not settings.embedded,
        # "__Host-": browsers keep such a cookie only if it is Secure, for path / and for this
        # host alone, so a sibling subdomain cannot plant a session of its choosing (login
        # CSRF by cookie tossing, which no POST check sees). Plain http (embedded) cannot use it.
        SESSION_COOKIE_NAME="intake_session" if settings.embedded else "__Host-intake_session",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=12),
        WTF_CSRF_TIME_LIMIT=int(settings.max_form_age_seconds) or None,
        # The Referer check of Flask-WTF cannot work with "Referrer-Policy: no-referrer"; the
        # origin of every unsafe request is checked by intake.web.refuse_cross_site_writes.
        WTF_CSRF_SSL_STRICT=False,
        BABEL_DEFAULT_LOCALE="en",
        BABEL_TRANSLATION_DIRECTORIES=str(Path(__file__).with_name("translations")),
        RATELIMIT_STORAGE_URI=settings.redis_url or "memory://",
        RATELIMIT_KEY_PREFIX="intake-limits",
        RATELIMIT_SWALLOW_ERRORS=True,
        RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=True,
    )
    # rediss://: the limiter's storage verifies Redis's certificate like the broker does.
    app.config["RATELIMIT_STORAGE_OPTIONS"] = transport.redis_ssl_options(settings)
    app.extensions["intake.settings"] = settings
    anchor.install(app, settings)
    app.extensions["intake.keyring"] = _keyring(settings)
    app.extensions["intake.routing"] = load_routing(settings.routing_file)
    app.extensions["intake.clock"] = utcnow
    # Who the pharmacy is and the legal texts patients accept: checked now, like the routing.
    pharmacy = app.extensions["intake.pharmacy"] = load_pharmacy(settings)
    consents = app.extensions["intake.consents"] = load_consents(settings.consents_dir)
    app.config["BABEL_DEFAULT_TIMEZONE"] = pharmacy.timezone
    app.extensions["intake.timezone"] = pharmacy.timezone  # intake.clock.pharmacy_zone
    if not settings.embedded:
        _warn_about_samples(settings, consents.samples)

    register_extensions(app)
    register_task_queue(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_commands(app)
    # Last, so its before-request hook runs first: every line of a request carries its trace id.
    tracing.init_app(app)
    return app


def _warn_about_samples(settings: Settings, sample_documents: list[str]) -> None:
    """Say loudly when production shows patients the shipped sample pharmacy or legal texts."""
    import structlog

    from config.settings import DEFAULT_PHARMACY_FILE

    log = structlog.get_logger("intake")
    if Path(settings.pharmacy_file) == DEFAULT_PHARMACY_FILE:
        log.warning(
            "sample_pharmacy_in_use",
            advice="set INTAKE_PHARMACY_FILE to your pharmacy's own file",
        )
    if sample_documents:
        log.warning(
            "sample_consents_in_use",
            documents=sample_documents,
            advice="set INTAKE_CONSENTS_DIR to a folder with your pharmacy's own texts",
        )


def _secret_key(settings: Settings) -> str:
    if settings.secret_key:
        return embedded.read_secret_setting(settings.secret_key)
    return embedded.ensure_secret_file(
        Path(settings.data_dir) / "secret_key", embedded.generate_secret_key, "flask secret key"
    )


def _keyring(settings: Settings) -> Keyring:
    if settings.keyring:
        return Keyring.from_json(embedded.read_secret_setting(settings.keyring))
    text = embedded.ensure_secret_file(
        Path(settings.data_dir) / "keyring.json",
        lambda: Keyring.generate().to_json(),
        "keyring",
    )
    return Keyring.from_json(text)


def format_duration(delta: timedelta) -> str:
    """'3 d 4 h', '2 h 5 min', '12 min' for queue countdowns."""
    minutes = max(0, int(delta.total_seconds() // 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min"


def register_extensions(app: Flask) -> None:
    from intake import i18n, pharmacy
    from intake.accounts.login import login_manager
    from intake.extensions import babel, csrf, db, limiter, migrate

    db.init_app(app)
    migrate.init_app(app, db, directory=str(Path(__file__).with_name("migrations")))
    csrf.init_app(app)
    babel.init_app(app, locale_selector=i18n.select_locale)
    limiter.init_app(app)
    i18n.init_app(app)
    pharmacy.init_app(app)
    login_manager.init_app(app)
    app.add_template_filter(format_duration, "duration")


def register_task_queue(app: Flask) -> None:
    """Hand the outbox its publisher: the one place intake/ reaches into workers/."""
    from intake.requests import outbox
    from workers.publish import init_publisher

    outbox.init_app(app, init_publisher(app))


def register_blueprints(app: Flask) -> None:
    from intake.compliance.views import bp as compliance
    from intake.ops import health as ops
    from intake.ops import metrics
    from intake.patient.views import bp as patient
    from intake.staff.views import bp as staff

    app.register_blueprint(patient)
    app.register_blueprint(staff)
    app.register_blueprint(compliance)
    app.register_blueprint(ops.bp)
    app.register_blueprint(metrics.bp)


def register_commands(app: Flask) -> None:
    from intake.ops import commands

    for command in commands.COMMANDS:
        app.cli.add_command(command)


def register_errorhandlers(app: Flask) -> None:
    from intake import web

    web.init_app(app)
