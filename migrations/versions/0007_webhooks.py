"""webhooks: per-project receivers, and every delivery attempt.

- webhook: a project's receiver (url, events, signing secret).
- webhook_delivery: the outbox, one row per event and webhook, claimed by the dispatcher.
- webhook_attempt: one row per try (status code or error, duration, next retry).

Revision ID: 0007_webhooks
Revises: 0006_aliases
"""
import sqlalchemy as sa
from alembic import op

import service.store.db

revision = "0007_webhooks"
down_revision = "0006_aliases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("secret", sa.String(length=64), nullable=False),
        sa.Column("created_at", service.store.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["project.id"], name=op.f("fk_webhook_project_id_project"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook")),
    )
    with op.batch_alter_table("webhook") as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_project_id"), ["project_id"], unique=False)
    op.create_table(
        "webhook_delivery",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("webhook_id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", service.store.db.UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", service.store.db.UTCDateTime(), nullable=False),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("claimed_until", service.store.db.UTCDateTime(), nullable=True),
        sa.Column("finished_at", service.store.db.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["webhook_id"], ["webhook.id"], name=op.f("fk_webhook_delivery_webhook_id_webhook"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_delivery")),
    )
    with op.batch_alter_table("webhook_delivery") as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_delivery_webhook_id"), ["webhook_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_webhook_delivery_project_id"), ["project_id"], unique=False)
        batch_op.create_index("ix_webhook_delivery_due", ["status", "next_attempt_at"], unique=False)
    op.create_table(
        "webhook_attempt",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.String(length=32), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("started_at", service.store.db.UTCDateTime(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("next_retry_at", service.store.db.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["delivery_id"], ["webhook_delivery.id"],
                                name=op.f("fk_webhook_attempt_delivery_id_webhook_delivery"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempt")),
    )
    with op.batch_alter_table("webhook_attempt") as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_attempt_delivery_id"), ["delivery_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("webhook_attempt") as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_attempt_delivery_id"))
    op.drop_table("webhook_attempt")
    with op.batch_alter_table("webhook_delivery") as batch_op:
        batch_op.drop_index("ix_webhook_delivery_due")
        batch_op.drop_index(batch_op.f("ix_webhook_delivery_project_id"))
        batch_op.drop_index(batch_op.f("ix_webhook_delivery_webhook_id"))
    op.drop_table("webhook_delivery")
    with op.batch_alter_table("webhook") as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_project_id"))
    op.drop_table("webhook")
