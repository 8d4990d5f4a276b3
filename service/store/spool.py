"""What the retention cleaner asks the job store: studies, their files, the files in use."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update

from service.store.engine import StoreBase
from service.store.models import Instance, Job, Series
from service.store.records import StudyRetention
from service.store.states import ENDED_STATES, JobState

__all__ = ["SpoolStore"]


class SpoolStore(StoreBase):
    """What the retention cleaner calls: which studies ended, and which files they hold."""

    def studies_for_retention(self) -> list[StudyRetention]:
        """Every study with its jobs' state, oldest-ended first."""
        stmt = select(
            Series.study_instance_uid, Job.id, Job.state, Job.updated_at, Job.spool_removed_at
        )
        stmt = stmt.join(Series, Job.series_id == Series.id)
        studies: dict[str, list[tuple[int, JobState, datetime, datetime | None]]] = {}
        with self._tx() as session:
            for study, job_id, state, updated, removed in session.execute(stmt):
                studies.setdefault(study, []).append((job_id, state, updated, removed))
        out = [
            StudyRetention(
                study_instance_uid=study,
                ended=all(state in ENDED_STATES for _, state, _, _ in jobs),
                ended_at=max(updated for _, _, updated, _ in jobs),
                failed=any(state is JobState.FAILED for _, state, _, _ in jobs),
                job_ids=tuple(sorted(job_id for job_id, _, _, _ in jobs)),
                spool_removed=all(removed is not None for _, _, _, removed in jobs),
            )
            for study, jobs in studies.items()
        ]
        return sorted(out, key=lambda s: s.ended_at)

    def study_files(self, study_instance_uid: str) -> set[Path]:
        """The spool files of every instance of every version of a study's series."""
        stmt = (
            select(Instance.path)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_instance_uid == study_instance_uid)
            .distinct()
        )
        with self._tx() as session:
            return {Path(p) for p in session.scalars(stmt)}

    def recorded_paths(self, paths: Sequence[Path]) -> set[Path]:
        """Which of `paths` some instance row refers to (spool recovery at start)."""
        found: set[Path] = set()
        names = [str(p) for p in paths]
        with self._tx() as session:
            for i in range(0, len(names), 500):
                stmt = select(Instance.path).where(Instance.path.in_(names[i : i + 500]))
                found.update(Path(p) for p in session.scalars(stmt))
        return found

    def files_in_use(self) -> set[Path]:
        """Spool files that a job not yet ended refers to: never to be removed.

        Read in the same transaction as nothing else, so the cleaner checks it again right
        before deleting (a late instance may have started a new version meanwhile).
        """
        stmt = (
            select(Instance.path)
            .join(Series, Instance.series_id == Series.id)
            .join(Job, Job.series_id == Series.id)
            .where(Job.state.not_in(ENDED_STATES))
            .distinct()
        )
        with self._tx() as session:
            return {Path(p) for p in session.scalars(stmt)}

    def mark_spool_removed(self, job_ids: Sequence[int]) -> None:
        """Note on each job (``spool_removed_at``) that its files left the spool."""
        if not job_ids:
            return
        now = self._clock()
        with self._tx() as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(job_ids))
                .values(spool_removed_at=now)
                .execution_options(synchronize_session=False)
            )
