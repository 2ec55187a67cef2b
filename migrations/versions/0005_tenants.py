"""tenants: server operators apart from project admins, project names unique as a person reads
them, and job events numbered per job (their ids no longer count every tenant's events).

- api_key.operator: the key may act on the whole server (projects, quotas, every worker).
- project.name_key: the normalized name (NFC, case-folded, trimmed, no trailing punctuation),
  unique. Projects that already collide keep working; the later ones get their id appended.
- job.event_seq (the job's last event number) and job_event.seq, unique per job.

Revision ID: 0005_tenants
Revises: 0004_projects_and_keys
"""
import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0005_tenants"
down_revision = "0004_projects_and_keys"
branch_labels = None
depends_on = None


def _name_key(raw: str) -> str:
    # A copy, as of this revision, of service.datasets.names.name_key: a migration must not change
    # when the code does.
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", raw).casefold()).strip()
    while text and (unicodedata.category(text[-1]).startswith("P") or text[-1].isspace()):
        text = text[:-1]
    return text


def upgrade() -> None:
    with op.batch_alter_table("api_key", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("operator", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("project", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("name_key", sa.String(length=100), nullable=True))
    conn = op.get_bind()
    taken = set()
    for project_id, name in conn.execute(sa.text("SELECT id, name FROM project ORDER BY created_at, id")).all():
        key = _name_key(name)
        key = key if key not in taken else f"{key}#{project_id}"[:100]
        taken.add(key)
        conn.execute(sa.text("UPDATE project SET name_key = :key WHERE id = :id"), {"key": key, "id": project_id})
    with op.batch_alter_table("project", recreate="never") as batch_op:
        batch_op.create_index(batch_op.f("uq_project_name_key"), ["name_key"], unique=True)

    with op.batch_alter_table("job", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("event_seq", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("job_event", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("seq", sa.Integer(), nullable=False, server_default="0"))
    # Existing events are numbered 1, 2, ... within their job, in the order they were written.
    op.execute("UPDATE job_event SET seq = (SELECT count(*) FROM job_event AS e "
               "WHERE e.job_id = job_event.job_id AND e.id <= job_event.id)")
    op.execute("UPDATE job SET event_seq = (SELECT count(*) FROM job_event WHERE job_event.job_id = job.id)")
    with op.batch_alter_table("job_event", recreate="never") as batch_op:
        batch_op.create_index("uq_job_event_job_id_seq", ["job_id", "seq"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("job_event", recreate="never") as batch_op:
        batch_op.drop_index("uq_job_event_job_id_seq")
        batch_op.drop_column("seq")
    with op.batch_alter_table("job", recreate="never") as batch_op:
        batch_op.drop_column("event_seq")
    with op.batch_alter_table("project", recreate="never") as batch_op:
        batch_op.drop_index(batch_op.f("uq_project_name_key"))
        batch_op.drop_column("name_key")
    with op.batch_alter_table("api_key", recreate="never") as batch_op:
        batch_op.drop_column("operator")
