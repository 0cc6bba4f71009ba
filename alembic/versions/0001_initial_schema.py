"""initial schema: bases, adapters, assessments, transfer jobs, audit, lineage

Revision ID: 0001
Revises: 
Create Date: 2026-11-29 01:56:59.071963

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('base_model_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('weights_digest', sa.String(length=128), nullable=True),
    sa.Column('status', sa.Enum('active', 'deprecated', 'missing', name=op.f('ck_base_model_versions_status'), native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('superseded_by', sa.String(length=320), nullable=True),
    sa.Column('discovered_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_base_model_versions')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_base_model_versions_name_version'))
    )
    op.create_table('adapter_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('base_id', sa.Integer(), nullable=False),
    sa.Column('format', sa.Enum('lora', 'lorax', 'lorax-compact', name=op.f('ck_adapter_versions_format'), native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('layout', sa.Enum('peft', 'kohya', 'diffusers', 'compact', name=op.f('ck_adapter_versions_layout'), native_enum=False, create_constraint=True, length=32), nullable=True),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('digest', sa.String(length=128), nullable=True),
    sa.Column('origin', sa.Enum('registered', 'transferred', name=op.f('ck_adapter_versions_origin'), native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['base_id'], ['base_model_versions.id'], name=op.f('fk_adapter_versions_base_id_base_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter_versions')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_adapter_versions_name_version'))
    )
    op.create_index(op.f('ix_adapter_versions_base_id'), 'adapter_versions', ['base_id'], unique=False)

    op.create_table('assessments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source_base_id', sa.Integer(), nullable=False),
    sa.Column('target_base_id', sa.Integer(), nullable=False),
    sa.Column('parameters', sa.JSON(), nullable=False),
    sa.Column('params_hash', sa.String(length=64), nullable=False),
    sa.Column('atc_left', sa.Float(), nullable=False),
    sa.Column('atc_right', sa.Float(), nullable=False),
    sa.Column('atc', sa.Float(), nullable=False),
    sa.Column('timings', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['source_base_id'], ['base_model_versions.id'], name=op.f('fk_assessments_source_base_id_base_model_versions')),
    sa.ForeignKeyConstraint(['target_base_id'], ['base_model_versions.id'], name=op.f('fk_assessments_target_base_id_base_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_assessments')),
    sa.UniqueConstraint('source_base_id', 'target_base_id', 'params_hash', name=op.f('uq_assessments_source_base_id_target_base_id_params_hash'))
    )
    op.create_index(op.f('ix_assessments_target_base_id'), 'assessments', ['target_base_id'], unique=False)

    op.create_table('module_pairs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('assessment_id', sa.Integer(), nullable=False),
    sa.Column('source_module', sa.String(length=512), nullable=True),
    sa.Column('target_module', sa.String(length=512), nullable=False),
    sa.Column('phi_left', sa.Float(), nullable=True),
    sa.Column('phi_right', sa.Float(), nullable=True),
    sa.Column('transport_mass', sa.Float(), nullable=True),
    sa.Column('decision', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['assessment_id'], ['assessments.id'], name=op.f('fk_module_pairs_assessment_id_assessments'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_module_pairs'))
    )
    op.create_index(op.f('ix_module_pairs_assessment_id'), 'module_pairs', ['assessment_id'], unique=False)

    op.create_table('transfer_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_version_id', sa.Integer(), nullable=False),
    sa.Column('target_base_id', sa.Integer(), nullable=False),
    sa.Column('source_base_id', sa.Integer(), nullable=False),
    sa.Column('assessment_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.Enum('planned', 'pending_approval', 'approved', 'running', 'succeeded', 'failed', 'skipped', 'rejected', name=op.f('ck_transfer_jobs_status'), native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('policy_decision', sa.Enum('planned', 'pending_approval', 'approved', 'running', 'succeeded', 'failed', 'skipped', 'rejected', name=op.f('ck_transfer_jobs_policy_decision'), native_enum=False, create_constraint=True, length=32), nullable=True),
    sa.Column('policy_reason', sa.Text(), nullable=True),
    sa.Column('atc', sa.Float(), nullable=True),
    sa.Column('mode', sa.String(length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('lease_owner', sa.String(length=255), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('result_adapter_version_id', sa.Integer(), nullable=True),
    sa.Column('result_ref', sa.String(length=320), nullable=True),
    sa.Column('mlflow_run_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_version_id'], ['adapter_versions.id'], name=op.f('fk_transfer_jobs_adapter_version_id_adapter_versions')),
    sa.ForeignKeyConstraint(['assessment_id'], ['assessments.id'], name=op.f('fk_transfer_jobs_assessment_id_assessments'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['result_adapter_version_id'], ['adapter_versions.id'], name=op.f('fk_transfer_jobs_result_adapter_version_id_adapter_versions'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['source_base_id'], ['base_model_versions.id'], name=op.f('fk_transfer_jobs_source_base_id_base_model_versions')),
    sa.ForeignKeyConstraint(['target_base_id'], ['base_model_versions.id'], name=op.f('fk_transfer_jobs_target_base_id_base_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_transfer_jobs')),
    sa.UniqueConstraint('adapter_version_id', 'target_base_id', name=op.f('uq_transfer_jobs_adapter_version_id_target_base_id'))
    )
    op.create_index(op.f('ix_transfer_jobs_assessment_id'), 'transfer_jobs', ['assessment_id'], unique=False)
    op.create_index('ix_transfer_jobs_status_lease_expires_at', 'transfer_jobs', ['status', 'lease_expires_at'], unique=False)
    op.create_index('ix_transfer_jobs_status_next_attempt_at', 'transfer_jobs', ['status', 'next_attempt_at'], unique=False)
    op.create_index(op.f('ix_transfer_jobs_target_base_id'), 'transfer_jobs', ['target_base_id'], unique=False)

    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('action', sa.Enum('approve', 'reject', 'force', 'retry', 'policy', name=op.f('ck_audit_events_action'), native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('from_status', sa.Enum('planned', 'pending_approval', 'approved', 'running', 'succeeded', 'failed', 'skipped', 'rejected', name=op.f('ck_audit_events_from_status'), native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('to_status', sa.Enum('planned', 'pending_approval', 'approved', 'running', 'succeeded', 'failed', 'skipped', 'rejected', name=op.f('ck_audit_events_to_status'), native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['transfer_jobs.id'], name=op.f('fk_audit_events_job_id_transfer_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    op.create_index(op.f('ix_audit_events_job_id'), 'audit_events', ['job_id'], unique=False)

    op.create_table('lineage',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=False),
    sa.Column('child_id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['child_id'], ['adapter_versions.id'], name=op.f('fk_lineage_child_id_adapter_versions')),
    sa.ForeignKeyConstraint(['job_id'], ['transfer_jobs.id'], name=op.f('fk_lineage_job_id_transfer_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['parent_id'], ['adapter_versions.id'], name=op.f('fk_lineage_parent_id_adapter_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lineage')),
    sa.UniqueConstraint('parent_id', 'child_id', name=op.f('uq_lineage_parent_id_child_id'))
    )
    op.create_index(op.f('ix_lineage_child_id'), 'lineage', ['child_id'], unique=False)
    op.create_index(op.f('ix_lineage_job_id'), 'lineage', ['job_id'], unique=False)



def downgrade() -> None:
    op.drop_table('lineage')
    op.drop_table('audit_events')
    op.drop_table('transfer_jobs')
    op.drop_table('module_pairs')
    op.drop_table('assessments')
    op.drop_table('adapter_versions')
    op.drop_table('base_model_versions')
