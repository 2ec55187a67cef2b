"""worker pool: job events, worker registry, GPU requests, attempt history, checkpoints

Revision ID: 0003_worker_pool
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

import service.store.db

revision = "0003_worker_pool"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # recreate="never": plain ALTER TABLE ADD COLUMN; a SQLite table rebuild would be refused by the
    # foreign keys pointing at job.
    with op.batch_alter_table("job", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("requires_gpu", sa.Boolean(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("attempt_history", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("checkpoint_epoch", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("checkpoint_file", sa.String(length=1024), nullable=True))
    op.create_table(
        "job_event",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", service.store.db.UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_job_event_job_id_job"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_event")),
    )
    with op.batch_alter_table("job_event") as batch_op:
        batch_op.create_index(batch_op.f("ix_job_event_job_id"), ["job_id"], unique=False)
    op.create_table(
        "worker",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("started_at", service.store.db.UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", service.store.db.UTCDateTime(), nullable=False),
        sa.Column("current_job_id", sa.String(length=32), nullable=True),
        sa.Column("stopped_at", service.store.db.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker")),
    )


def downgrade() -> None:
    op.drop_table("worker")
    with op.batch_alter_table("job_event") as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_event_job_id"))
    op.drop_table("job_event")
    with op.batch_alter_table("job", recreate="never") as batch_op:
        batch_op.drop_column("checkpoint_file")
        batch_op.drop_column("checkpoint_epoch")
        batch_op.drop_column("attempt_history")
        batch_op.drop_column("requires_gpu")
