"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 16:13:05.411159
"""
from alembic import op
import sqlalchemy as sa
import service.store.db


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dataset',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_at', service.store.db.UTCDateTime(), nullable=False),
    sa.Column('classes', sa.JSON(), nullable=False),
    sa.Column('class_counts', sa.JSON(), nullable=False),
    sa.Column('split_counts', sa.JSON(), nullable=False),
    sa.Column('num_images', sa.Integer(), nullable=False),
    sa.Column('has_val_split', sa.Boolean(), nullable=False),
    sa.Column('rejected', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dataset'))
    )
    op.create_table('dataset_image',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('dataset_id', sa.String(length=32), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('split', sa.String(length=8), nullable=True),
    sa.Column('original_name', sa.String(length=1024), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['dataset.id'], name=op.f('fk_dataset_image_dataset_id_dataset'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dataset_image'))
    )
    with op.batch_alter_table('dataset_image', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dataset_image_dataset_id'), ['dataset_id'], unique=False)

    op.create_table('job',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('dataset_id', sa.String(length=32), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('created_at', service.store.db.UTCDateTime(), nullable=False),
    sa.Column('run_after', service.store.db.UTCDateTime(), nullable=False),
    sa.Column('started_at', service.store.db.UTCDateTime(), nullable=True),
    sa.Column('finished_at', service.store.db.UTCDateTime(), nullable=True),
    sa.Column('worker_id', sa.String(length=200), nullable=True),
    sa.Column('lease_token', sa.String(length=32), nullable=True),
    sa.Column('heartbeat_at', service.store.db.UTCDateTime(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('progress', sa.JSON(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('model_id', sa.String(length=32), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['dataset.id'], name=op.f('fk_job_dataset_id_dataset')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job'))
    )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index('ix_job_claim', ['status', 'priority', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_dataset_id'), ['dataset_id'], unique=False)

    op.create_table('model',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('dataset_id', sa.String(length=32), nullable=False),
    sa.Column('created_at', service.store.db.UTCDateTime(), nullable=False),
    sa.Column('backbone', sa.String(length=64), nullable=False),
    sa.Column('classes', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('recipe', sa.JSON(), nullable=False),
    sa.Column('artifact_dir', sa.String(length=1024), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['dataset.id'], name=op.f('fk_model_dataset_id_dataset')),
    sa.ForeignKeyConstraint(['job_id'], ['job.id'], name=op.f('fk_model_job_id_job')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model')),
    sa.UniqueConstraint('job_id', name=op.f('uq_model_job_id'))
    )
    with op.batch_alter_table('model', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_dataset_id'), ['dataset_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('model', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_dataset_id'))

    op.drop_table('model')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_dataset_id'))
        batch_op.drop_index('ix_job_claim')

    op.drop_table('job')
    with op.batch_alter_table('dataset_image', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dataset_image_dataset_id'))

    op.drop_table('dataset_image')
    op.drop_table('dataset')
