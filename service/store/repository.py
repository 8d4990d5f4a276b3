"""The job store: every state change of series and jobs, one transaction each.

:class:`JobStore` is the whole store, put together from the parts its callers use, one
module each:

- :class:`~service.store.ingest.IngestStore`: the receiver records instances;
- :class:`~service.store.assembly.AssemblyStore`: the assembler completes series;
- :class:`~service.store.leases.LeaseStore`: workers and queues claim, renew and end jobs;
- :class:`~service.store.spool.SpoolStore`: the retention cleaner finds what may go;
- :class:`~service.store.queries.QueryStore`: the HTTP API, CLI and metrics read jobs.

They share :class:`~service.store.engine.StoreBase` (the engine, transactions and state
transitions). A caller that needs one part may be typed with it.
"""

from __future__ import annotations

from service.store.assembly import AssemblyStore
from service.store.engine import Clock, StoreBase, create_store_engine, utc_now
from service.store.ingest import IngestStore
from service.store.leases import LeaseStore
from service.store.queries import QueryStore
from service.store.spool import SpoolStore

__all__ = ["Clock", "JobStore", "StoreBase", "create_store_engine", "utc_now"]


class JobStore(IngestStore, AssemblyStore, LeaseStore, SpoolStore, QueryStore):
    """Series, instances and jobs in a SQL database.

    Parameters
    ----------
    url
        SQLAlchemy URL: ``sqlite:///path.db`` or ``postgresql+psycopg://user@host/db``.
        The schema must exist (see :func:`service.store.run_migrations`).
    clock
        Source of "now" for every timestamp, lease and retry time.
    retry
        Attempts and backoff of jobs that fail for a retryable reason.
    on_queued
        Called in the same transaction whenever a job becomes ``QUEUED`` (series complete,
        retry, expired lease, admin retry); an exception there rolls the change back.
    """
