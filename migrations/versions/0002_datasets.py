"""datasets: versions, frozen flag, cached report; per-image mode, format and perceptual hash

Revision ID: 0002_datasets
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_datasets"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Only operations SQLite does in place (ADD COLUMN with constant defaults, CREATE INDEX):
    # a table rebuild would drop `dataset`, which its foreign keys refuse or cascade from.
    with op.batch_alter_table("dataset", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("previous_version_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("next_version_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("frozen", sa.Boolean(), nullable=False, server_default="0"))
        # Datasets created before this revision passed the upload checks of their time.
        batch_op.add_column(sa.Column("trainable", sa.Boolean(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("report", sa.JSON(), nullable=False, server_default="{}"))
        # An index, not a constraint: SQLite adds it without rebuilding the table.
        batch_op.create_index(batch_op.f("ix_dataset_next_version_id"), ["next_version_id"], unique=True)
    with op.batch_alter_table("dataset_image", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("mode", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("format", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("phash", sa.String(length=16), nullable=True))
    # A dataset some job already used must not change under it from now on.
    op.execute("UPDATE dataset SET frozen = (1 = 1) WHERE id IN (SELECT dataset_id FROM job)")


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+), never a table rebuild: rebuilding `dataset` drops
    # it, which SQLite's enforced foreign keys refuse (or cascade to every image row).
    with op.batch_alter_table("dataset_image", recreate="never") as batch_op:
        batch_op.drop_column("phash")
        batch_op.drop_column("format")
        batch_op.drop_column("mode")
    with op.batch_alter_table("dataset", recreate="never") as batch_op:
        batch_op.drop_index(batch_op.f("ix_dataset_next_version_id"))
        batch_op.drop_column("report")
        batch_op.drop_column("trainable")
        batch_op.drop_column("frozen")
        batch_op.drop_column("next_version_id")
        batch_op.drop_column("previous_version_id")
        batch_op.drop_column("version")
