"""The retention flag as a column: ``jobs.spool_removed_at``.

Revision 0001 kept it inside the ``outputs`` JSON (``outputs["spool_removed_at"]``, an ISO
8601 string); this moves every such value into the new column and out of ``outputs``, and
back on downgrade.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = "spool_removed_at"


def _jobs(*columns: sa.ColumnClause[Any]) -> sa.TableClause:
    return sa.table("jobs", sa.column("id", sa.Integer()), sa.column("outputs", sa.JSON()), *columns)


def _to_column(value: datetime) -> datetime:
    """As the store writes it: UTC, naive on SQLite (which keeps no offset)."""
    value = value.astimezone(UTC)
    return value.replace(tzinfo=None) if op.get_bind().dialect.name == "sqlite" else value


def _from_column(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column(_KEY, sa.DateTime(timezone=True), nullable=True))
    jobs = _jobs(sa.column(_KEY, sa.DateTime(timezone=True)))
    bind = op.get_bind()
    for job_id, outputs in bind.execute(sa.select(jobs.c.id, jobs.c.outputs)).all():
        if not isinstance(outputs, dict) or _KEY not in outputs:
            continue
        rest = {k: v for k, v in outputs.items() if k != _KEY}
        removed = datetime.fromisoformat(outputs[_KEY])
        if removed.tzinfo is None:
            removed = removed.replace(tzinfo=UTC)
        bind.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(outputs=rest, **{_KEY: _to_column(removed)})
        )


def downgrade() -> None:
    jobs = _jobs(sa.column(_KEY, sa.DateTime(timezone=True)))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(jobs.c.id, jobs.c.outputs, jobs.c[_KEY]).where(jobs.c[_KEY].is_not(None))
    ).all()
    for job_id, outputs, removed in rows:
        merged = {**(outputs or {}), _KEY: _from_column(removed).isoformat()}
        bind.execute(jobs.update().where(jobs.c.id == job_id).values(outputs=merged))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column(_KEY)
