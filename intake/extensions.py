"""Extension instances, bound to an app in :func:`intake.create_app`."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

from flask_babel import Babel
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Session, scoped_session

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


db = SQLAlchemy(model_class=Base)

# What domain functions take: a plain Session (scripts, tests) or Flask-SQLAlchemy's scoped
# ``db.session``, which proxies every Session method.
DbSession = Session | scoped_session[Any]
migrate = Migrate()
csrf = CSRFProtect()
babel = Babel()


def client_key() -> str:
    """Rate-limit by a pseudonym of the client's network (an IPv4 address, an IPv6 /64), so the
    limiter's store (Redis) never holds a raw address and one IPv6 customer is one client."""
    from flask import current_app

    from intake.crypto.phi import client_pseudonym

    keyring = current_app.extensions["intake.keyring"]
    return client_pseudonym(keyring, get_remote_address()) or "unknown"


limiter = Limiter(key_func=client_key, default_limits=[], headers_enabled=True)


@event.listens_for(Engine, "connect")
def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    """Make SQLite behave as the embedded production database it is.

    Foreign keys on, WAL so readers do not block the writer, a busy timeout instead of instant
    "database is locked", and transactions begun by us (see ``_begin_immediate``) rather than by
    the driver, so a transaction takes the write lock up front and never dies upgrading to it.
    """
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA busy_timeout = 15000")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


# An execution option of the connections ``reading`` hands out on SQLite.
_OUTSIDE_TRANSACTIONS = "intake_outside_transactions"


@event.listens_for(Engine, "begin")
def _begin_immediate(connection: Any) -> None:
    if connection.dialect.name == "sqlite" and not connection.get_execution_options().get(
        _OUTSIDE_TRANSACTIONS
    ):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextlib.contextmanager
def reading(session: DbSession) -> Iterator[Connection]:
    """A connection of ``session``'s database for reads outside any transaction, each
    statement on its own: no BEGIN and ROLLBACK round trips on PostgreSQL, no write lock on
    SQLite (whose transactions take it up front, see ``_begin_immediate``). For a read that
    decides whether there is anything to do before a transaction that does it.

    On SQLite the driver opens no transaction of its own (``_configure_sqlite``), so skipping
    ``BEGIN IMMEDIATE`` is all it takes, and nothing of it stays on the pooled connection
    (SQLAlchemy's AUTOCOMMIT level would reset the driver to its own transactions when the
    connection goes back to the pool). A session bound to one connection reads in its own
    transaction, which it then ends as it would have."""
    bind = session.get_bind()
    if isinstance(bind, Connection):
        yield session.connection()
        return
    with bind.connect() as connection:
        if connection.dialect.name == "sqlite":
            yield connection.execution_options(**{_OUTSIDE_TRANSACTIONS: True})
        else:
            yield connection.execution_options(isolation_level="AUTOCOMMIT")
