"""automatic assignment: staff skills, caps, away; round robin's memory; who returned a request

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-15

"""

import sqlalchemy as sa
from alembic import op

import intake.clock

# revision identifiers, used by Alembic.
revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade():
    # Existing staff hold no skills, follow their team's cap and are available.
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("skills", sa.String(length=128), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("assignment_cap", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("away_since", intake.clock.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("last_assigned_at", intake.clock.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_assignee_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("returned_by_id", sa.Integer(), nullable=True))


def downgrade():
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("returned_by_id")
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_column("last_assignee_id")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("last_assigned_at")
        batch_op.drop_column("away_since")
        batch_op.drop_column("assignment_cap")
        batch_op.drop_column("skills")
