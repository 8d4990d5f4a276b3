"""The retention cleaner: received instances leave the spool after their study's jobs ended.

Policy (``retention`` in ``config.yaml``; a file a running job may still read is never
removed):

- a study whose jobs have all ended (``DONE``, ``REJECTED`` or ``FAILED``) loses its files
  ``keep_done_hours`` after the last of them ended, ``keep_failed_hours`` if one FAILED;
- when the spool's free space is under ``emergency_free_mb``, ended studies lose their
  files at once, oldest first, until the space is back above it;
- a file that a job not yet ended refers to is never removed: a study with a job still
  receiving, queued, running or sending is left whole, and the set of files in use is
  read again right before each study is removed (a late instance may have started a new
  series version meanwhile);
- temporary ``.part`` files older than ``partial_max_age_s`` (a crash in the middle of a
  write) are removed.

Jobs keep their records; ``outputs["spool_removed_at"]`` says when their files went. Time
comes from the job store's clock so tests drive it.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from service.config import RetentionSettings
from service.periodic import PeriodicThread
from service.store import JobStore, StudyRetention

__all__ = ["CleanReport", "RetentionCleaner"]

logger = logging.getLogger(__name__)


@dataclass
class CleanReport:
    """What one pass of the cleaner did."""

    studies: list[str] = field(default_factory=list)
    """Study Instance UIDs whose files were removed."""
    files: int = 0
    bytes: int = 0
    partials: int = 0
    emergency: bool = False
    """The pass ran under ``emergency_free_mb``."""
    free_mb: float = 0.0
    """Free spool space after the pass."""


class RetentionCleaner:
    """Removes ended studies' files from the spool by policy.

    Parameters
    ----------
    store
        The job store (and its clock).
    spool_dir
        The spool folder (``storage.spool_dir``).
    settings
        The ``retention`` settings.
    """

    def __init__(self, store: JobStore, spool_dir: Path, settings: RetentionSettings) -> None:
        self.store = store
        self.spool_dir = Path(spool_dir)
        self.settings = settings
        self._thread = PeriodicThread(
            "unict-retention", self.run_once, lambda: self.settings.interval_s
        )

    # ------------------------------------------------------------ one pass

    def free_mb(self) -> float:
        """Free space of the spool's file system, in MiB."""
        return shutil.disk_usage(self.spool_dir).free / 2**20

    def run_once(self) -> CleanReport:
        """One pass: stale partial files, then studies due by age, then by free space."""
        report = CleanReport()
        if not self.spool_dir.is_dir():
            return report
        report.partials = self._remove_partials()
        now = self.store.now()
        studies = [s for s in self.store.studies_for_retention() if s.ended and not s.spool_removed]
        remaining: list[StudyRetention] = []
        for study in studies:
            keep = (
                self.settings.keep_failed_hours if study.failed else self.settings.keep_done_hours
            )
            if study.ended_at + timedelta(hours=keep) <= now:
                self._remove_study(study, report)
            else:
                remaining.append(study)
        report.free_mb = self.free_mb()
        if report.free_mb < self.settings.emergency_free_mb:
            report.emergency = True
            logger.warning(
                "spool has %.0f MB free < emergency_free_mb %d: removing ended studies now",
                report.free_mb,
                self.settings.emergency_free_mb,
            )
            for study in remaining:  # oldest first
                self._remove_study(study, report)
                report.free_mb = self.free_mb()
                if report.free_mb >= self.settings.emergency_free_mb:
                    break
            else:
                if report.free_mb < self.settings.emergency_free_mb:
                    logger.error(
                        "spool still has only %.0f MB free: every remaining file belongs to a "
                        "job that has not ended",
                        report.free_mb,
                    )
        if report.studies or report.partials:
            logger.info(
                "retention: %d studies, %d files, %.1f MB removed; %d partial files",
                len(report.studies),
                report.files,
                report.bytes / 2**20,
                report.partials,
            )
        return report

    def _remove_study(self, study: StudyRetention, report: CleanReport) -> None:
        in_use = self.store.files_in_use()
        folders: set[Path] = set()
        removed = 0
        for path in sorted(self.store.study_files(study.study_instance_uid)):
            if path in in_use:
                # A newer series version (a late instance) still needs it.
                logger.info("retention: %s kept, a job that has not ended uses it", path.name)
                continue
            if not self._inside_spool(path):
                logger.error("retention: %s is outside the spool; not removed", path)
                continue
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.error("retention: cannot remove %s: %s", path, exc)
                continue
            removed += 1
            report.files += 1
            report.bytes += size
            folders.add(path.parent)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            self._remove_empty(folder)
        self.store.mark_spool_removed(study.job_ids)
        report.studies.append(study.study_instance_uid)
        logger.info("retention: study %s: %d file(s) removed", study.study_instance_uid, removed)

    def _inside_spool(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.spool_dir.resolve())
        except ValueError:
            return False
        return True

    def _remove_empty(self, folder: Path) -> None:
        """Remove `folder` and its parents up to the spool root while they are empty."""
        root = self.spool_dir.resolve()
        current = folder.resolve()
        while current != root and root in current.parents:
            try:
                current.rmdir()
            except OSError:
                return  # not empty (or already gone)
            current = current.parent

    def _remove_partials(self) -> int:
        cutoff = time.time() - self.settings.partial_max_age_s
        removed = 0
        for path in self.spool_dir.rglob(".*.part"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.error("retention: cannot remove %s: %s", path, exc)
        return removed

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        """Run :meth:`run_once` every ``interval_s`` in a background thread.

        A failed pass loses nothing (the files stay); the next pass tries again.
        """
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread."""
        self._thread.stop(timeout)

    @property
    def is_alive(self) -> bool:
        """Whether the background thread runs."""
        return self._thread.is_alive
