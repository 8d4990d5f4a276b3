"""Series assembly: decide when a received series is complete, then select it or not.

A series version is complete

- after ``assembly.quiet_period_s`` without a new instance (mercure's
  ``series_complete_trigger``), or
- at once when it is *provably* complete: every association that delivered it has been
  released (not aborted) and the expected instance count is known and reached. The count
  comes from ``ImagesInAcquisition`` in the data, or from a C-FIND of the sending PACS
  (``NumberOfSeriesRelatedInstances``) when ``assembly.query_sender_for_count`` is on.

A gap-free stack of slice positions proves nothing (a router may still be sending the next
acquisition), so it is never used. When a series is complete the selection rules run on its
stored headers and the job goes to ``QUEUED`` or ``REJECTED`` in the same transaction.

Time comes from the job store's clock, so tests drive quiet periods with a fake clock and
:meth:`Assembler.run_once`.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from service import pynetdicom_race
from service.config import AssemblySettings, QueryPeer, SelectionSettings
from service.instance_handler import SeriesRef
from service.periodic import PeriodicThread
from service.selection import InstanceHeader, evaluate
from service.store import JobRecord, JobStore, PendingSeries

__all__ = ["Assembler", "CFindCounter", "SeriesCounter"]


pynetdicom_race.install()
logger = logging.getLogger(__name__)

SeriesCounter = Callable[[PendingSeries], int | None]
"""Asks someone how many instances a series has; ``None`` when it cannot tell."""


class CFindCounter:
    """Ask the sending PACS for a series' ``NumberOfSeriesRelatedInstances`` (C-FIND).

    Parameters
    ----------
    local_ae
        Our AE title (the calling AE of the query).
    peers
        Calling AE title of a series -> where to send the query.
    timeout_s
        Association, DIMSE and network timeout.
    """

    def __init__(self, local_ae: str, peers: Mapping[str, QueryPeer], timeout_s: float) -> None:
        self.local_ae = local_ae
        self.peers = dict(peers)
        self.timeout_s = timeout_s

    def __call__(self, series: PendingSeries) -> int | None:
        peer = self.peers.get(series.calling_ae)
        if peer is None:
            return None
        ae = AE(ae_title=self.local_ae)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title or series.calling_ae)
        if not assoc.is_established:
            logger.warning(
                "series %s: C-FIND association to %s:%d failed",
                series.series_instance_uid,
                peer.host,
                peer.port,
            )
            return None
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = series.study_instance_uid
        query.SeriesInstanceUID = series.series_instance_uid
        query.NumberOfSeriesRelatedInstances = ""
        count: int | None = None
        try:
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                if (
                    status
                    and status.Status in (0xFF00, 0xFF01)
                    and identifier is not None
                    and identifier.get("NumberOfSeriesRelatedInstances") not in (None, "")
                ):
                    count = int(identifier.NumberOfSeriesRelatedInstances)
        finally:
            assoc.release()
        logger.info(
            "series %s: sender reports %s instances",
            series.series_instance_uid,
            count,
            extra={"series_uid": series.series_instance_uid},
        )
        return count


class Assembler:
    """Closes complete series and runs selection on them.

    It is the receiver's :class:`~service.receiver.AssociationListener`; a background
    thread (:meth:`start`) calls :meth:`run_once` every ``poll_interval_s`` and whenever an
    association is released.

    Parameters
    ----------
    store
        The job store (its clock is the assembler's clock).
    assembly, selection
        The ``assembly`` and ``selection`` settings.
    counter
        Optional source of expected instance counts (e.g. :class:`CFindCounter`).
    """

    def __init__(
        self,
        store: JobStore,
        assembly: AssemblySettings,
        selection: SelectionSettings,
        *,
        counter: SeriesCounter | None = None,
    ) -> None:
        self.store = store
        self.assembly = assembly
        self.selection = selection
        self.counter = counter
        self._lock = threading.Lock()
        self._open: dict[int, set[int]] = defaultdict(set)  # association -> series versions
        self._released: set[int] = set()  # series versions whose association was released
        self._thread = PeriodicThread(
            "unict-assembler", self.run_once, lambda: self.assembly.poll_interval_s
        )

    # ------------------------------------------------------------ listener

    def instance_received(self, association_id: int, series: SeriesRef) -> None:
        """Remember that `association_id` is delivering `series`."""
        with self._lock:
            self._open[association_id].add(series.series_id)

    def association_ended(self, association_id: int, *, released: bool) -> None:
        """An association ended; if released, its series may now be provably complete."""
        with self._lock:
            series_ids = self._open.pop(association_id, set())
            if released:
                self._released |= series_ids
        if released and series_ids:
            self._thread.wake()

    def _still_open(self, series_id: int) -> bool:
        return any(series_id in ids for ids in self._open.values())

    # ------------------------------------------------------------ checks

    def run_once(self) -> list[JobRecord]:
        """One pass: close provably complete series, then those past their quiet period.

        Returns
        -------
        list of JobRecord
            The jobs queued or rejected in this pass.
        """
        closed: list[JobRecord] = []
        with self._lock:
            candidates = {sid for sid in self._released if not self._still_open(sid)}
            self._released -= candidates
        if candidates:
            pending = {p.series_id: p for p in self.store.pending_series()}
            for series_id in sorted(candidates):
                series = pending.get(series_id)
                if series is None:
                    continue
                expected = series.expected_count
                if expected is None and self.counter is not None:
                    expected = self.counter(series)
                    if expected is not None:
                        self.store.set_expected_count(series_id, expected, "C-FIND")
                if expected is not None and series.instance_count >= expected:
                    job = self._close(
                        series,
                        f"{series.instance_count} of {expected} expected instances, "
                        "association released",
                    )
                    if job is not None:
                        closed.append(job)
        for series in self.store.series_ready(self.assembly.quiet_period_s):
            job = self._close(series, f"quiet for {self.assembly.quiet_period_s:g} s")
            if job is not None:
                closed.append(job)
        return closed

    def _close(self, series: PendingSeries, why: str) -> JobRecord | None:
        instances = self.store.series_instances(series.series_id)
        decision = evaluate([InstanceHeader.from_json(i.header) for i in instances], self.selection)
        job = self.store.complete_series(
            series.series_id, instance_count=len(instances), rejected_rule=decision.reason
        )
        extra = {"job_id": series.job_id, "series_uid": series.series_instance_uid}
        if job is None:
            logger.debug("series %s changed while closing; later", series.series_instance_uid)
            return None
        if decision.accepted:
            logger.info(
                "series %s v%d complete (%s): job %d QUEUED",
                series.series_instance_uid,
                series.version,
                why,
                job.id,
                extra=extra,
            )
        else:
            logger.info(
                "series %s v%d complete (%s): job %d REJECTED: %s",
                series.series_instance_uid,
                series.version,
                why,
                job.id,
                decision.reason,
                extra=extra,
            )
        return job

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        """Run :meth:`run_once` in a background thread every ``poll_interval_s``, and when
        an association delivering a series is released, until :meth:`stop`.

        A failed pass loses nothing: the series are still ``RECEIVING`` in the store and
        the next pass tries again.
        """
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread."""
        self._thread.stop(timeout)

    @property
    def is_alive(self) -> bool:
        """Whether the background thread runs."""
        return self._thread.is_alive
