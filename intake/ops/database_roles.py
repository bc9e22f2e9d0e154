"""Least privilege in PostgreSQL: the app's role may append to the audit trail, never change it.

Why: the migrations' triggers refuse UPDATE, DELETE and TRUNCATE on ``audit_events``, but whoever
owns a table may drop its triggers, disable them or drop the table. So the schema belongs to an
owner role that only migrations use, and the web, worker and beat processes connect as an app
role that owns nothing. The app role gets SELECT and INSERT on the append-only tables, SELECT,
INSERT, UPDATE and DELETE on the others, and USAGE on their sequences; it has no TRUNCATE,
REFERENCES or TRIGGER privilege, and without ownership it can neither ALTER nor DROP a table nor
a trigger. A stolen app password (or an SQL injection) can then still add events, which the hash
chain, the anchor and the signed checkpoints catch, but cannot rewrite or remove one.

The grants are derived from the schema each time they are applied (after every upgrade, by the
owner) rather than left to ``ALTER DEFAULT PRIVILEGES``: a default privilege would hand full DML
on a future append-only table to the app role, and would not take back a privilege granted by
hand. Applying them revokes everything the role (and PUBLIC) held on the schema's tables and
sequences first, in the same transaction, so the app never sees a moment without its grants.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

# Tables the app may only read and append to.
# audit_listings is the trail's index of listed references (intake.audit.listings).
APPEND_ONLY_TABLES = ("audit_events", "audit_listings")
# Tables the app may only read: Alembic's record of the schema version.
READ_ONLY_TABLES = ("alembic_version",)
FULL_DML = ("SELECT", "INSERT", "UPDATE", "DELETE")


class DatabaseRoleError(Exception):
    """The app role cannot be granted safely (it is missing, a superuser, or an owner)."""


@dataclass(frozen=True)
class Grant:
    table: str
    privileges: tuple[str, ...]


def privileges_for(table: str) -> tuple[str, ...]:
    """What the app role may do on ``table``."""
    if table in APPEND_ONLY_TABLES:
        return ("SELECT", "INSERT")
    if table in READ_ONLY_TABLES:
        return ("SELECT",)
    return FULL_DML


def grant_app_role(connection: Connection, role: str) -> list[Grant]:
    """Give ``role`` exactly the app's privileges on the current schema; return what was granted.

    Runs as the owner of the tables, inside the caller's transaction. Refuses a role that does
    not exist, a superuser (who bypasses every privilege) and the owner or any role that is a
    member of an owner (who could drop the triggers).
    """
    if connection.dialect.name != "postgresql":
        raise DatabaseRoleError("database roles apply to PostgreSQL only")
    found = connection.execute(
        text(
            "SELECT rolsuper, EXISTS (SELECT 1 FROM pg_roles AS w"
            " WHERE w.rolname = 'pg_write_all_data' AND pg_has_role(r.oid, w.oid, 'MEMBER'))"
            " AS writes_all FROM pg_roles AS r WHERE r.rolname = :role"
        ),
        {"role": role},
    ).first()
    if found is None:
        raise DatabaseRoleError(
            f"role {role!r} does not exist; create it first (CREATE ROLE ... LOGIN PASSWORD ...)"
        )
    if found.rolsuper:
        raise DatabaseRoleError(f"role {role!r} is a superuser; superusers bypass every privilege")
    if found.writes_all:
        raise DatabaseRoleError(
            f"role {role!r} is a member of pg_write_all_data, which may change any table"
        )
    schema = connection.execute(text("SELECT current_schema()")).scalar_one()
    tables = connection.execute(
        text(
            "SELECT tablename, tableowner, pg_has_role(:role, tableowner, 'MEMBER') AS owns "
            "FROM pg_tables WHERE schemaname = :schema ORDER BY tablename"
        ),
        {"role": role, "schema": schema},
    ).all()
    if not tables:
        raise DatabaseRoleError(f"schema {schema!r} has no tables; run intake db upgrade first")
    me = connection.execute(text("SELECT current_user")).scalar_one()
    for table in tables:
        if table.owns:
            raise DatabaseRoleError(
                f"role {role!r} owns (or is a member of the owner of) table {table.tablename!r};"
                " the app role must own nothing"
            )
        if table.tableowner != me:
            raise DatabaseRoleError(
                f"table {table.tablename!r} belongs to {table.tableowner!r}, not {me!r};"
                " grant as the role that ran the migrations"
            )

    quote = connection.dialect.identifier_preparer.quote_identifier
    grantee, in_schema = quote(role), quote(schema)
    statements = [
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {in_schema} FROM {grantee}, PUBLIC",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {in_schema} FROM {grantee}, PUBLIC",
        f"GRANT USAGE ON SCHEMA {in_schema} TO {grantee}",
    ]
    grants = [Grant(table.tablename, privileges_for(table.tablename)) for table in tables]
    for grant in grants:
        statements.append(
            f"GRANT {', '.join(grant.privileges)} ON TABLE {in_schema}.{quote(grant.table)}"
            f" TO {grantee}"
        )
    # nextval() for serial ids; the sequences' own values stay the owner's to set.
    statements.append(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {in_schema} TO {grantee}")
    for statement in statements:
        connection.execute(text(statement))
    return grants
