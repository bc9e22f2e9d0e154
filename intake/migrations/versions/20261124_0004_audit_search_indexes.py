"""audit search indexes: (actor|action|reference, seq) for newest-first filtered pages

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = ("actor", "action", "reference")


def upgrade():
    # Plain CREATE/DROP INDEX: no table rebuild, so the append-only triggers are untouched.
    for column in COLUMNS:
        op.drop_index(f"ix_audit_events_{column}", table_name="audit_events")
        op.create_index(f"ix_audit_events_{column}_seq", "audit_events", [column, "seq"])


def downgrade():
    for column in COLUMNS:
        op.drop_index(f"ix_audit_events_{column}_seq", table_name="audit_events")
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column])
