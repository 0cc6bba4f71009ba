"""assessment figures (heatmaps rendered once per assessment) and merged module pairs

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 09:52:05.129280

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('assessment_figures',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('assessment_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('content', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['assessment_id'], ['assessments.id'], name=op.f('fk_assessment_figures_assessment_id_assessments'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_assessment_figures')),
    sa.UniqueConstraint('assessment_id', 'name', name=op.f('uq_assessment_figures_assessment_id_name'))
    )
    with op.batch_alter_table('assessment_figures', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_assessment_figures_assessment_id'), ['assessment_id'], unique=False)

    with op.batch_alter_table('module_pairs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('contributions', sa.JSON(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('module_pairs', schema=None) as batch_op:
        batch_op.drop_column('contributions')

    with op.batch_alter_table('assessment_figures', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_assessment_figures_assessment_id'))

    op.drop_table('assessment_figures')
