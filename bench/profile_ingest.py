"""Where a received instance's time goes on the node's receive path (cProfile per thread).

Usage: python -m bench.profile_ingest [--slices 300] [--top 25]

The node's listener (:class:`service.receiver.Receiver`, fresh SQLite job store and spool)
runs in this process with every association thread and the job-store recorder profiled;
DCMTK ``storescu`` (``TCP_NODELAY=1``) sends one series of ``--slices`` 512x512 instances.
Prints the wall time per instance and, per thread kind, the functions with the most
cumulative time, in milliseconds per instance. cProfile slows Python code about 1.5-2x,
so read the shares, not the absolute figures.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.bench_ingest import SENDER_AET, send, write_series


def _profiled(kind: str, profiles: dict[str, list[cProfile.Profile]], fn: Callable[..., Any]):  # type: ignore[no-untyped-def]
    def run(*args: Any, **kwargs: Any) -> Any:
        profile = cProfile.Profile()
        with threading.Lock():
            profiles.setdefault(kind, []).append(profile)
        profile.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            profile.disable()

    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    from service import ingest_recorder, storage_scp
    from service.config import DicomSettings, StorageSettings
    from service.receiver import Receiver
    from service.store import JobStore, RetryPolicy, run_migrations

    profiles: dict[str, list[cProfile.Profile]] = {}
    storage_scp.StorageSCP._serve = _profiled(  # type: ignore[method-assign]
        "association", profiles, storage_scp.StorageSCP._serve
    )
    ingest_recorder.BatchRecorder._run = _profiled(  # type: ignore[method-assign]
        "recorder", profiles, ingest_recorder.BatchRecorder._run
    )
    with tempfile.TemporaryDirectory(prefix="unict-profile-") as tmp:
        work = Path(tmp)
        (series,) = write_series(work / "series", slices=args.slices, copies=1)
        url = f"sqlite:///{work / 'unict.db'}"
        run_migrations(url)
        store = JobStore(url, retry=RetryPolicy())
        receiver = Receiver(
            DicomSettings(ae_title="UNICT", port=0, allowed_callers=(SENDER_AET,)),
            StorageSettings(spool_dir=work / "spool", min_free_mb=0),
            store,
        )
        receiver.start()
        try:
            seconds = send([series], receiver.port, "UNICT", "fast", timeout=600)
        finally:
            receiver.stop()
            store.close()
    n = series.instances
    print(f"{n} instances in {seconds:.2f} s: {seconds / n * 1e3:.2f} ms per instance (profiled)")
    for kind, found in profiles.items():
        stats = pstats.Stats(found[0])
        for extra in found[1:]:
            stats.add(extra)
        print(f"\n## {kind} threads: cumulative ms per instance")
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)  # type: ignore[attr-defined]
        for (filename, line, name), (_, ncalls, _tt, cumtime, _) in rows[: args.top]:
            where = f"{Path(filename).name}:{line}" if line else filename
            print(f"{cumtime / n * 1e3:8.3f}  {ncalls:7d}  {name}  ({where})")


if __name__ == "__main__":
    main()
