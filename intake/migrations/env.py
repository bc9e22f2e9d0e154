"""Alembic environment: migrate the database of the running Intake app."""

from __future__ import annotations

from alembic import context
from flask import current_app

target_db = current_app.extensions["migrate"].db


def run_migrations_online() -> None:
    connectable = target_db.engine
    with connectable.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch migrations rebuild tables; with foreign keys enforced, dropping the old
            # table would cascade-delete the rows that refer to it. The pragma only takes
            # effect outside a transaction, so set it on the raw connection first.
            connection.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")
        context.configure(
            connection=connection,
            target_metadata=target_db.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        if connection.dialect.name == "sqlite":
            connection.commit()
            connection.connection.driver_connection.execute("PRAGMA foreign_keys = ON")


if context.is_offline_mode():
    context.configure(
        url=str(target_db.engine.url), target_metadata=target_db.metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
