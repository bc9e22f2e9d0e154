"""audit_events (created_at, seq) index: a time window's seq range from the index alone

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-15

"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade():
    # The audit search bounds a since/until window by the window's own min and max seq, read
    # by an index-only scan of this index (intake.compliance.reports.window_seq_bounds). It
    # covers every query the created_at index served, so that one goes. Plain CREATE/DROP
    # INDEX: no table rebuild, so the append-only triggers are untouched.
    op.create_index("ix_audit_events_created_at_seq", "audit_events", ["created_at", "seq"])
    op.drop_index("ix_audit_events_created_at", table_name="audit_events")


def downgrade():
    op.create_index("ix_audit_events_created_at", "audit_events", ["created_at"])
    op.drop_index("ix_audit_events_created_at_seq", table_name="audit_events")
