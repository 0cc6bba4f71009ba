"""registry cursors, webhook marks, base problems

registry_cursors: how far the watcher has read each registry (versions listed, jobs whose pages
are published, passes since the last full reconcile); registry_marks: versions a webhook
delivery said changed (a tag set, which the registry's search cannot show);
base_model_versions.problem: why a base version's weights cannot be used, so that a pass need
not download it again to know.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 12:29:24.665584

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('registry_cursors',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('registry_key', sa.String(length=64), nullable=False),
    sa.Column('listed_ms', sa.BigInteger(), nullable=False),
    sa.Column('listed_seen', sa.JSON(), nullable=False),
    sa.Column('bases_digest', sa.String(length=64), nullable=True),
    sa.Column('passes_since_full', sa.Integer(), nullable=False),
    sa.Column('full_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('published_seen', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_registry_cursors')),
    sa.UniqueConstraint('registry_key', name=op.f('uq_registry_cursors_registry_key'))
    )
    op.create_table('registry_marks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('marked_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_registry_marks'))
    )
    with op.batch_alter_table('base_model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('problem', sa.Text(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('base_model_versions', schema=None) as batch_op:
        batch_op.drop_column('problem')

    op.drop_table('registry_marks')
    op.drop_table('registry_cursors')
