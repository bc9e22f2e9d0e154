"""backfill priority_rank from priority for requests routed before it was kept

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.execute(
        "UPDATE requests SET priority_rank = CASE priority "
        "WHEN 'urgent' THEN 0 WHEN 'high' THEN 1 WHEN 'normal' THEN 2 WHEN 'low' THEN 3 "
        "ELSE 2 END"
    )


def downgrade():
    pass
