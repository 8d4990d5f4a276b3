"""service/migrations on SQLite and PostgreSQL, with data in the database.

Revision 0002 moves the retention flag from ``outputs["spool_removed_at"]`` into the
``jobs.spool_removed_at`` column; downgrading puts it back.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command

from service.store import JobState, JobStore, run_migrations
from service.store.migrate import alembic_config

REMOVED_AT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
CREATED_AT = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def _as_stored(engine: sa.Engine, value: datetime) -> datetime:
    return value.replace(tzinfo=None) if engine.dialect.name == "sqlite" else value


def _fill_at_0001(url: str) -> None:
    """Two studies at revision 0001: one whose files went (flag in ``outputs``), one kept."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    meta = sa.MetaData()
    series = sa.Table("series", meta, autoload_with=engine)
    jobs = sa.Table("jobs", meta, autoload_with=engine)
    now = _as_stored(engine, CREATED_AT)
    with engine.begin() as conn:
        for n, outputs in enumerate(
            [
                {"sent": [{"status": 0}], "spool_removed_at": REMOVED_AT.isoformat()},
                {"sent": [{"status": 0}]},
            ],
            start=1,
        ):
            conn.execute(
                series.insert().values(
                    id=n,
                    study_instance_uid=f"1.{n}",
                    series_instance_uid=f"1.{n}.1",
                    version=1,
                    calling_ae="STORESCU",
                    first_received_at=now,
                    last_received_at=now,
                    instance_count=3,
                )
            )
            conn.execute(
                jobs.insert().values(
                    id=n,
                    series_id=n,
                    version=1,
                    state="DONE",
                    attempts=1,
                    max_attempts=3,
                    timings={"infer": 1.5},
                    outputs=outputs,
                    created_at=now,
                    updated_at=now,
                )
            )
    engine.dispose()


def test_0002_moves_the_retention_flag_into_a_column_and_back(db_url: str) -> None:
    run_migrations(db_url, "0001")
    _fill_at_0001(db_url)

    run_migrations(db_url)
    store = JobStore(db_url)
    try:
        removed, kept = store.get_job(1), store.get_job(2)
        assert removed is not None and kept is not None
        assert removed.spool_removed_at == REMOVED_AT
        assert dict(removed.outputs) == {"sent": [{"status": 0}]}
        assert kept.spool_removed_at is None and dict(kept.outputs) == {"sent": [{"status": 0}]}
        assert removed.state is JobState.DONE and removed.timings == {"infer": 1.5}
        by_study = {s.study_instance_uid: s.spool_removed for s in store.studies_for_retention()}
        assert by_study == {"1.1": True, "1.2": False}
    finally:
        store.close()

    command.downgrade(alembic_config(db_url), "0001")
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        assert "spool_removed_at" not in {
            c["name"] for c in sa.inspect(engine).get_columns("jobs")
        }
        jobs = sa.Table("jobs", sa.MetaData(), autoload_with=engine)
        with engine.connect() as conn:
            outputs = dict(conn.execute(sa.select(jobs.c.id, jobs.c.outputs)).all())
    finally:
        engine.dispose()
    assert outputs[2] == {"sent": [{"status": 0}]}
    assert outputs[1]["sent"] == [{"status": 0}]
    assert datetime.fromisoformat(outputs[1]["spool_removed_at"]) == REMOVED_AT


@pytest.mark.parametrize("revision", ["0001", "head"])
def test_migrations_run_on_an_empty_database(db_url: str, revision: str) -> None:
    run_migrations(db_url, revision)
    run_migrations(db_url, revision)  # again: a no-op
