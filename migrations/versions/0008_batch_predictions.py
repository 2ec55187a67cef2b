"""batch prediction jobs: a job kind that predicts a dataset with a model.

A batch prediction is a row of the job table (same queue, leases, retries and checkpoints) with
kind "batch_predict" and the model it predicts with; the images are the job's dataset.

Revision ID: 0008_batch_predictions
Revises: 0007_webhooks
"""
import sqlalchemy as sa
from alembic import op

revision = "0008_batch_predictions"
down_revision = "0007_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain columns added in place: SQLite cannot rebuild the job table (keys point at it).
    with op.batch_alter_table("job", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="train"))
        batch_op.add_column(sa.Column("source_model_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job", recreate="never") as batch_op:
        batch_op.drop_column("source_model_id")
        batch_op.drop_column("kind")
