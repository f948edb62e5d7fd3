"""stages.queued_seconds: time a stage's requests waited at the scheduler for a worker slot

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 19:40:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('stages', sa.Column('queued_seconds', sa.Float(), server_default='0', nullable=False))


def downgrade() -> None:
    op.drop_column('stages', 'queued_seconds')
