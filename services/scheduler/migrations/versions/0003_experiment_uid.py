"""experiments.uid: a never-reused identity that keys artifacts and worker request ids

Experiments stored before this revision get their id as uid, so the artifact directories
they already wrote (named by id) stay theirs; new experiments get a UUID, which no id equals.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 22:10:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('experiments', sa.Column('uid', sa.String(length=36), nullable=True))
    op.execute("UPDATE experiments SET uid = CAST(id AS VARCHAR(36))")
    with op.batch_alter_table('experiments') as batch:
        batch.alter_column('uid', existing_type=sa.String(length=36), nullable=False)
        batch.create_unique_constraint('uq_experiments_uid', ['uid'])


def downgrade() -> None:
    with op.batch_alter_table('experiments') as batch:
        batch.drop_constraint('uq_experiments_uid', type_='unique')
        batch.drop_column('uid')
