"""policy signals: the pair's drift and functional check on assessments, every signal of a
job's decisions on the job

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:55:28.624068

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('assessments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('signals', sa.JSON(), nullable=True))

    with op.batch_alter_table('transfer_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('signals', sa.JSON(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('transfer_jobs', schema=None) as batch_op:
        batch_op.drop_column('signals')

    with op.batch_alter_table('assessments', schema=None) as batch_op:
        batch_op.drop_column('signals')

