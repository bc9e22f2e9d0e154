"""Alembic environment: migrate the database of the running Intake app."""

from __future__ import annotations

from alembic import context
from flask import current_app

target_db = current_app.extensions["migrate"].db


def grant_app_role_after_upgrade(connection) -> None:
    """Re-derive the app role's grants from the new schema, in the migration's transaction.

    With INTAKE_DATABASE_APP_ROLE set, every upgrade (run as the owner) leaves the app role
    with exactly its privileges on every table, new ones included; see intake.ops.database_roles.
    """
    role = current_app.extensions["intake.settings"].database_app_role
    if role and connection.dialect.name == "postgresql":
        from intake.ops.database_roles import grant_app_role

        grant_app_role(connection, role)


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
            grant_app_role_after_upgrade(connection)
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
