"""The node's Prometheus metrics, in a registry of its own.

One :class:`NodeMetrics` per node: the receiver, the workers and the HTTP API get the same
instance, and ``/metrics`` renders its registry. A registry per node (not
``prometheus_client.REGISTRY``) keeps several nodes in one process (tests, the demo) from
clashing on metric names or mixing their counts.

Counters move where things happen (receiver, worker); job counts by state and the queue
depth are read from the job store at scrape time, so they are right even with several
nodes sharing one PostgreSQL database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from service.stages import Stage
from service.store import JobState, JobStore

__all__ = ["CONTENT_TYPE", "TIMED_STAGES", "NodeMetrics"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""``text/plain; version=0.0.4``: the text format every Prometheus version scrapes."""

TIMED_STAGES: tuple[Stage, ...] = (
    Stage.LOAD,
    Stage.PREPROCESS,
    Stage.INFER,
    Stage.POSTPROCESS,
    Stage.ENCODE,
    Stage.SEND,
)
"""Stages with a latency histogram, in pipeline order (a job's ``timings`` keys)."""

# From 10 ms (a send on loopback) to 10 min (inference of a large CT on CPU).
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _StoreCollector(Collector):
    """Jobs by state and queue depth, read from the job store at each scrape."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "unict_job_store_up", "Whether the job store answered this scrape (1) or not (0)."
        )
        try:
            counts = self.store.count_by_state()
        except SQLAlchemyError as exc:
            # /metrics must still answer (it says the store is down); /readyz says why.
            logger.warning("metrics: job store unreachable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("unict_jobs", "Jobs by state.", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state.value], n)
        yield jobs
        yield GaugeMetricFamily(
            "unict_queue_depth",
            "Jobs waiting for a worker (QUEUED, due now or after a retry backoff).",
            value=counts[JobState.QUEUED],
        )


class NodeMetrics:
    """The metrics of one node.

    Parameters
    ----------
    store
        The job store, read at scrape time for jobs by state and queue depth.

    Attributes
    ----------
    registry
        This node's registry (what ``/metrics`` renders).
    """

    def __init__(self, store: JobStore) -> None:
        # No auto_describe: it would query the job store at registration, before the
        # node has run its migrations.
        self.registry = CollectorRegistry(auto_describe=False)
        self.instances_received = Counter(
            "unict_instances_received",
            "Instances stored by the DICOM listener (C-STORE success, duplicates included).",
            registry=self.registry,
        )
        self.bytes_received = Counter(
            "unict_received_bytes",
            "Bytes of the instances stored by the DICOM listener.",
            registry=self.registry,
        )
        self.instances_refused = Counter(
            "unict_instances_refused",
            "C-STOREs answered with a failure status, by status (e.g. 0xA700 out of resources).",
            labelnames=["status"],
            registry=self.registry,
        )
        self.associations_refused = Counter(
            "unict_associations_refused",
            "Associations rejected by the DICOM listener, by reason "
            "(host, calling_ae, called_ae, busy, other).",
            labelnames=["reason"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "unict_stage_seconds",
            "Seconds a job spent in each stage (load, preprocess, infer, postprocess, "
            "encode, send).",
            labelnames=["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.send_failures = Counter(
            "unict_send_failures",
            "Instances not stored at a destination after every retry of the sender.",
            labelnames=["destination"],
            registry=self.registry,
        )
        # Every series exists from the start (zero), so a dashboard's rate() has data at once.
        for stage in TIMED_STAGES:
            self.stage_seconds.labels(stage=stage.value)
        self.registry.register(_StoreCollector(store))

    def observe_stages(self, timings: Mapping[str, float]) -> None:
        """Record stage latencies; keys that are not :data:`TIMED_STAGES` values are skipped.

        Parameters
        ----------
        timings
            Seconds per stage, keyed by :class:`~service.errors.Stage` value.
        """
        names = {s.value for s in TIMED_STAGES}
        for name, seconds in timings.items():
            if name in names:
                self.stage_seconds.labels(stage=name).observe(seconds)

    def count_send_failures(self, destinations: Sequence[str]) -> None:
        """Count one unsent instance per entry of `destinations` (destination names)."""
        for destination in destinations:
            self.send_failures.labels(destination=destination).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
