"""lease start times, registry events (reconciler audit) and webhook delivery ids

transfer_jobs.started_at: when the work of the current lease began (attempts are counted then,
not at claim time); registry_events: what the reconciler changed in the registry;
webhook_deliveries: delivery ids accepted inside the timestamp window (replays refused).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:42:59.219553

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('delivery_id', sa.String(length=255), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    sa.UniqueConstraint('delivery_id', name=op.f('uq_webhook_deliveries_delivery_id'))
    )
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_webhook_deliveries_sent_at'), ['sent_at'], unique=False)

    op.create_table('registry_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('action', sa.Enum('duplicate_marked', name=op.f('ck_registry_events_action'), native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('kept_version', sa.String(length=64), nullable=True),
    sa.Column('job_tag', sa.String(length=64), nullable=True),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['transfer_jobs.id'], name=op.f('fk_registry_events_job_id_transfer_jobs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_registry_events'))
    )
    with op.batch_alter_table('registry_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_registry_events_job_id'), ['job_id'], unique=False)

    with op.batch_alter_table('transfer_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('started_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('transfer_jobs', schema=None) as batch_op:
        batch_op.drop_column('started_at')

    with op.batch_alter_table('registry_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_registry_events_job_id'))

    op.drop_table('registry_events')
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhook_deliveries_sent_at'))

    op.drop_table('webhook_deliveries')
