"""audit_listings (seq, reference) index: verify reads the listings in seq order

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07

"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade():
    # `intake audit verify` streams audit_listings grouped by event in seq order beside the
    # chain (intake.audit.listings.listings_by_event); the primary key starts with the
    # reference, so without this both databases sorted every listing row before the first
    # group came back. Covering, so the stream is an index-only scan. Plain CREATE INDEX: on a
    # big trail it takes a while (docs/deploy.md, upgrades), and the table's append-only
    # triggers are untouched.
    op.create_index("ix_audit_listings_seq_reference", "audit_listings", ["seq", "reference"])


def downgrade():
    op.drop_index("ix_audit_listings_seq_reference", table_name="audit_listings")
