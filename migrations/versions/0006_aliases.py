"""aliases: per-project named pointers to models, and the history of every move.

- model_alias: (project_id, name) unique, pointing at one model.
- alias_move: every move (from, to, which key, when), kept by (project_id, alias) so it outlives
  a deleted alias.
- api_key.aliases: a predict key limited to these alias names (JSON list); NULL: any model.

Revision ID: 0006_aliases
Revises: 0005_tenants
"""
import sqlalchemy as sa
from alembic import op

import service.store.db

revision = "0006_aliases"
down_revision = "0005_tenants"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_alias",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("model_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", service.store.db.UTCDateTime(), nullable=False),
        sa.Column("updated_at", service.store.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["model.id"], name=op.f("fk_model_alias_model_id_model")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_alias")),
    )
    with op.batch_alter_table("model_alias", recreate="never") as batch_op:
        batch_op.create_index(batch_op.f("ix_model_alias_project_id"), ["project_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_alias_model_id"), ["model_id"], unique=False)
        batch_op.create_index("uq_model_alias_project_id_name", ["project_id", "name"], unique=True)
    op.create_table(
        "alias_move",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=False),
        sa.Column("alias", sa.String(length=63), nullable=False),
        sa.Column("from_model_id", sa.String(length=32), nullable=True),
        sa.Column("to_model_id", sa.String(length=32), nullable=True),
        sa.Column("key_id", sa.String(length=32), nullable=True),
        sa.Column("moved_at", service.store.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_move")),
    )
    with op.batch_alter_table("alias_move", recreate="never") as batch_op:
        batch_op.create_index("ix_alias_move_project_id_alias", ["project_id", "alias"], unique=False)
    with op.batch_alter_table("api_key", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("aliases", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_key", recreate="never") as batch_op:
        batch_op.drop_column("aliases")
    op.drop_table("alias_move")
    op.drop_table("model_alias")
