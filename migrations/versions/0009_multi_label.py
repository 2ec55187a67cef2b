"""multi-label datasets: several labels per image (issue 17).

- dataset_image.labels: the image's labels (JSON list, possibly empty: none of the labels) in a
  multi-label dataset; NULL in a single-label one, where `label` is the one class.
- dataset.task: "single_label" or "multi_label".

Revision ID: 0009_multi_label
Revises: 0008_batch_predictions
"""
import sqlalchemy as sa
from alembic import op

revision = "0009_multi_label"
down_revision = "0008_batch_predictions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain columns added in place (SQLite cannot rebuild tables that keys point at).
    with op.batch_alter_table("dataset_image", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("labels", sa.JSON(), nullable=True))
    with op.batch_alter_table("dataset", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("task", sa.String(length=16), nullable=False, server_default="single_label"))


def downgrade() -> None:
    with op.batch_alter_table("dataset", recreate="never") as batch_op:
        batch_op.drop_column("task")
    with op.batch_alter_table("dataset_image", recreate="never") as batch_op:
        batch_op.drop_column("labels")
