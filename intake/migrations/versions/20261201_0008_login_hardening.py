"""login hardening: the second-factor freeze, and outbox rows that alert about an account

Revision ID: 20261201_0008_login_hardening
Revises: 20261201_0006
Create Date: 2026-12-01

"""

import sqlalchemy as sa
from alembic import op

import intake.clock

# revision identifiers, used by Alembic.
revision = "20261201_0008_login_hardening"
down_revision = "20261201_0006"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("otp_failures", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("otp_frozen_at", intake.clock.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.alter_column("request_id", existing_type=sa.String(length=36), nullable=True)
        batch_op.add_column(sa.Column("user_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("alert", sa.String(length=32), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_outbox_user_id_users"), "users", ["user_id"], ["id"], ondelete="CASCADE"
        )


def downgrade():
    op.execute("DELETE FROM outbox WHERE request_id IS NULL")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_outbox_user_id_users"), type_="foreignkey")
        batch_op.drop_column("alert")
        batch_op.drop_column("user_id")
        batch_op.alter_column("request_id", existing_type=sa.String(length=36), nullable=False)
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("otp_frozen_at")
        batch_op.drop_column("otp_failures")
