"""submission key: one request per form sent, however often it is sent

Revision ID: 20261201_0006
Revises: 0005
Create Date: 2026-12-01

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '20261201_0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    # A unique index rather than a table constraint: SQLite adds it without rebuilding the
    # table, and existing rows (NULL) never collide.
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('submission_key_index', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_requests_submission_key_index'), ['submission_key_index'], unique=True)


def downgrade():
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_requests_submission_key_index'))
        batch_op.drop_column('submission_key_index')
