"""outbox.trace_id: the trace a row was written under, for tasks not published from it

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07

"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade():
    # Nullable and without a default: instant on PostgreSQL and SQLite, whatever the table's
    # size. Rows written before it simply have no trace, as sweep-published tasks had none.
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("trace_id", sa.String(32), nullable=True))


def downgrade():
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("trace_id")
