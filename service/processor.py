"""The product processor: a claimed job through UniCT (the real network) to SEG + SR.

:class:`UniCTProcessor` is what :class:`service.node.Node` runs for every job: it loads
the checkpoint bundle named in config (the bundled ``small`` model by default), picks the
first available engine from ``model.engines`` (see :mod:`engines.registry`), and calls
:func:`service.pipeline.analyse_series`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from engines.base import Engine, EngineOptions
from engines.registry import select_engine
from model.bundle import ModelBundle, load_bundle
from service.config import Settings
from service.pipeline import OutputOptions, OutputUIDs, analyse_series
from service.preview import write_preview
from service.summary import summarize
from service.warmup import warm_up
from service.worker import ClaimedJob, ProcessOutcome

logger = logging.getLogger(__name__)


def output_options(settings: Settings) -> OutputOptions:
    """SEG/SR/SC options: the ``outputs`` section, with the node's AE title as device serial."""
    return OutputOptions(settings=settings.outputs, device_serial=settings.dicom.ae_title)


class UniCTProcessor:
    """Loads the model once and analyses claimed jobs.

    Parameters
    ----------
    settings
        The node's settings (``model`` and ``outputs`` sections are used).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.options = output_options(settings)
        self._bundle: ModelBundle | None = None
        self._engine: Engine | None = None
        self._error = "not loaded yet"
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the bundle and the first available engine; remembers why when it fails."""
        with self._lock:
            if self._engine is not None:
                return
            try:
                model = self.settings.model
                bundle = load_bundle(model.checkpoint_path)
                options = EngineOptions(plan_dir=Path(model.plan_dir), threads=model.threads or 0)
                engine = select_engine(model.engines, bundle, options)
            except Exception as exc:  # recorded for /readyz; the node stays up and unready
                self._error = f"{type(exc).__name__}: {exc}"
                logger.error("model not loaded: %s", self._error)
                raise
            try:
                warm_up(engine, bundle.card, self.options)
            except Exception as exc:  # a cold first job is slower, not wrong: stay up
                logger.warning("warm-up failed: %s: %s", type(exc).__name__, exc)
            self._bundle, self._engine = bundle, engine
            logger.info(
                "model %s %s loaded on engine %s",
                bundle.card.name,
                bundle.card.version,
                engine.name,
            )

    def status(self) -> tuple[bool, str]:
        """Readiness of the engine: (loaded, which engine or why not)."""
        if self._engine is None or self._bundle is None:
            return False, self._error
        return True, f"{self._bundle.card.name} {self._bundle.card.version} on {self._engine.name}"

    def __call__(self, job: ClaimedJob) -> ProcessOutcome:
        self.load()
        assert self._engine is not None and self._bundle is not None
        card = self._bundle.card
        # The same UIDs on every run of this job: a re-run after a crash or a failed send
        # cannot leave a second SEG/SR in the PACS.
        uids = OutputUIDs.for_result(
            job.study_instance_uid, job.series_instance_uid, job.version, card
        )
        result = analyse_series(
            job.instance_paths,
            self._engine,
            card,
            self.options,
            uids=uids,
            memory_limit_mb=self.settings.workers.memory_limit_mb,
        )
        outputs = tuple(ds for ds in (result.seg, result.sr, *result.sc) if ds is not None)
        timings = {stage.value: seconds for stage, seconds in result.timings.items()}
        preview = None
        try:
            path = Path(self.settings.storage.results_dir) / f"job-{job.job_id}-v{job.version}.png"
            preview = str(write_preview(result.volume, result.analysis, path))
        except OSError as exc:  # a preview is a convenience: never fail a job for it
            logger.warning("job %d: preview not written: %s", job.job_id, exc)
        logger.info(
            "job %d: %d output(s) for series %s", job.job_id, len(outputs), job.series_instance_uid
        )
        return ProcessOutcome(outputs=outputs, timings=timings, summary=summarize(result, preview))
