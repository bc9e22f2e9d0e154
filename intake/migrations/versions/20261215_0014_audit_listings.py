"""audit_listings: which references each queue view and search listed, for the reference filter

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-15

"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

APPEND_ONLY_SQLITE = (
    "CREATE TRIGGER audit_listings_no_update BEFORE UPDATE ON audit_listings "
    "BEGIN SELECT RAISE(ABORT, 'audit_listings is append-only'); END",
    "CREATE TRIGGER audit_listings_no_delete BEFORE DELETE ON audit_listings "
    "BEGIN SELECT RAISE(ABORT, 'audit_listings is append-only'); END",
)
APPEND_ONLY_POSTGRESQL = (
    """CREATE FUNCTION audit_listings_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_listings is append-only' USING ERRCODE = 'insufficient_privilege';
    END $$""",
    "CREATE TRIGGER audit_listings_no_update_delete BEFORE UPDATE OR DELETE ON audit_listings "
    "FOR EACH ROW EXECUTE FUNCTION audit_listings_append_only()",
    "CREATE TRIGGER audit_listings_no_truncate BEFORE TRUNCATE ON audit_listings "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_listings_append_only()",
)
# The references every existing queue view and search listed, from its details, in one
# statement (no rows leave the database): what intake.audit.listings.record_event writes for
# new ones. Frozen here rather than imported, as a migration must be.
BACKFILL = {
    "postgresql": """
        INSERT INTO audit_listings (reference, seq)
        SELECT DISTINCT item #>> '{}', e.seq
        FROM audit_events AS e
        CROSS JOIN LATERAL json_array_elements(e.details::json -> 'references') AS item
        WHERE e.reference IS NULL AND e.action IN ('phi.viewed', 'request.searched')
          AND json_typeof(e.details::json -> 'references') = 'array'
          AND json_typeof(item) = 'string'
    """,
    "sqlite": """
        INSERT OR IGNORE INTO audit_listings (reference, seq)
        SELECT DISTINCT item.value, e.seq
        FROM audit_events AS e, json_each(e.details, '$.references') AS item
        WHERE e.reference IS NULL AND e.action IN ('phi.viewed', 'request.searched')
          AND json_valid(e.details) AND json_type(e.details, '$.references') = 'array'
          AND item.type = 'text'
    """,
}


def upgrade():
    op.create_table(
        "audit_listings",
        sa.Column("reference", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("reference", "seq", name="pk_audit_listings"),
    )
    dialect = op.get_bind().dialect.name
    op.execute(BACKFILL[dialect])
    for statement in APPEND_ONLY_POSTGRESQL if dialect == "postgresql" else APPEND_ONLY_SQLITE:
        op.execute(statement)


def downgrade():
    op.drop_table("audit_listings")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_listings_append_only()")
