"""language routing: staff languages, interpreter asked for, unmet language need

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade():
    # Existing staff are taken to work in English; `intake users set-languages` adds more.
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("languages", sa.String(length=64), server_default="en", nullable=False)
        )
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("interpreter_language", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("language_need", sa.String(length=8), nullable=True))


def downgrade():
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("language_need")
        batch_op.drop_column("interpreter_language")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("languages")
