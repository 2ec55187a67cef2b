"""projects and API keys; every dataset, job and model belongs to a project; image sizes for
the storage quota.
Also joins the two branches (0002_datasets, 0003_worker_pool) into one head.

Revision ID: 0004_projects_and_keys
Revises: 0002_datasets, 0003_worker_pool
"""
import sqlalchemy as sa
from alembic import op

import service.store.db

revision = "0004_projects_and_keys"
down_revision = ("0002_datasets", "0003_worker_pool")
branch_labels = None
depends_on = None

OWNED = ("dataset", "job", "model")


def upgrade() -> None:
    project = op.create_table(
        "project",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", service.store.db.UTCDateTime(), nullable=False),
        sa.Column("quotas", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_project")),
        sa.UniqueConstraint("name", name=op.f("uq_project_name")),
    )
    # Everything that existed before keys belongs to the default project.
    op.bulk_insert(project, [{"id": "default", "name": "default", "created_at": service.store.db.utcnow(), "quotas": {}}])
    op.create_table(
        "api_key",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("created_at", service.store.db.UTCDateTime(), nullable=False),
        sa.Column("last_used_at", service.store.db.UTCDateTime(), nullable=True),
        sa.Column("revoked_at", service.store.db.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["project_id"], ["project.id"], name=op.f("fk_api_key_project_id_project"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_key")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_key_key_hash")),
    )
    with op.batch_alter_table("api_key") as batch_op:
        batch_op.create_index(batch_op.f("ix_api_key_project_id"), ["project_id"], unique=False)
    # A plain indexed column, no foreign key: SQLite cannot ALTER TABLE ADD a referencing column
    # with a non-NULL default, and a table rebuild is refused by the keys pointing at these tables.
    with op.batch_alter_table("dataset_image", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    for table in OWNED:
        with op.batch_alter_table(table, recreate="never") as batch_op:
            batch_op.add_column(sa.Column("project_id", sa.String(length=32), nullable=False,
                                          server_default="default"))
            batch_op.create_index(batch_op.f(f"ix_{table}_project_id"), ["project_id"], unique=False)


def downgrade() -> None:
    for table in OWNED:
        with op.batch_alter_table(table, recreate="never") as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{table}_project_id"))
            batch_op.drop_column("project_id")
    with op.batch_alter_table("dataset_image", recreate="never") as batch_op:
        batch_op.drop_column("size_bytes")
    with op.batch_alter_table("api_key") as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_key_project_id"))
    op.drop_table("api_key")
    op.drop_table("project")
