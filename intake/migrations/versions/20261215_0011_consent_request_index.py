"""consent_acceptances.request_id index: the request page reads a request's consents by it

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade():
    # Without it every request page scans all consents (about four per request ever sent):
    # bench/pages.py measured 100-300 ms at 100,000 requests, growing with the table.
    op.create_index("ix_consent_acceptances_request_id", "consent_acceptances", ["request_id"])


def downgrade():
    op.drop_index("ix_consent_acceptances_request_id", table_name="consent_acceptances")
