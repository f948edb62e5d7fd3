"""rounds: the chunk's walk over the pool and the dead problems it skipped (issue 18, skipping dead problems)

chunk_start / chunk_end: the pool cursors (modulo the pool size) where the round's walk began and where the
next round's begins; skipped_candidates, rollouts_saved (skipped x n_samples_train) and tokens_saved (an
estimate from the skipped problems' last mean response length). All nullable: rounds stored before this
revision have none, and their chunks stay [r*M, (r+1)*M).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 05:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

COLUMNS = (
    ('chunk_start', sa.Integer()),
    ('chunk_end', sa.Integer()),
    ('skipped_candidates', sa.Integer()),
    ('rollouts_saved', sa.Integer()),
    ('tokens_saved', sa.Float()),
)


def upgrade() -> None:
    for name, kind in COLUMNS:
        op.add_column('rounds', sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('rounds') as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
