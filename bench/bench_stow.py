"""STOW-RS ingest: the node's ``POST /studies`` against Orthanc's DICOMweb plugin, one run.

Usage: python -m bench.bench_stow [--slices 300] [--size 512] [--repeats 3] [--concurrency 4]

One CT series of ``--slices`` slices (the realistic 512x512 phantom, Explicit VR Little
Endian, about 0.5 MB an instance), plus ``--concurrency - 1`` copies with UIDs of their
own, is written once; each copy becomes one ``multipart/related; type="application/dicom"``
body on disk. ``curl`` POSTs each body (one request a series, HTTP/1.1, a process of its
own: the client is not the process being measured) to

- the node, in this process: :class:`service.node.Node` with STOW-RS on, a fresh SQLite
  job store and spool per measurement and an analysis that does nothing, so what is timed
  is the STOW-RS receive path (body streamed into part files, each part spooled with
  fsync, recorded in the job store, the assembler told);
- Orthanc 1.10 with its DICOMweb plugin (``/dicom-web/studies``, storage emptied over REST
  after each measurement; Orthanc fsyncs its storage too),

on 127.0.0.1, the two taking turns within each repeat. First one request, then
``--concurrency`` requests at once. Seconds run from the first curl's start to the last
one's exit (every response 200: every instance stored). The last column is the node's time
divided by Orthanc's with as many requests: a ratio from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.bench_ingest import _first_line, write_series
from tests.conftest import free_port

CURL = Path("/usr/bin/curl")
ORTHANC = Path("/usr/sbin/Orthanc")
BOUNDARY = "unict-bench-stow-boundary"
TOKEN_ENV = "UNICT_BENCH_STOW_TOKEN"


@dataclass(frozen=True)
class Body:
    """One series as a multipart body on disk."""

    path: Path
    instances: int
    bytes: int


@dataclass(frozen=True)
class Target:
    """Where to POST, with what credentials, and how to count what it stored."""

    url: str
    curl_auth: tuple[str, ...]
    stored: Callable[[], int]


@dataclass
class Measurement:
    """Repeated POSTs of the same bodies to one receiver."""

    receiver: str
    requests: int
    instances: int
    bytes: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best_s(self) -> float:
        return min(self.seconds)


def write_bodies(work: Path, *, slices: int, copies: int, size: int) -> list[Body]:
    """`copies` series written as files, each packed into one multipart body."""
    bodies = []
    for i, series in enumerate(write_series(work, slices=slices, copies=copies, size=size)):
        path = work / f"body{i}.multipart"
        with path.open("wb") as out:
            for file in sorted(series.folder.glob("*.dcm")):
                out.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                out.write(file.read_bytes())
                out.write(b"\r\n")
            out.write(f"--{BOUNDARY}--\r\n".encode())
        shutil.rmtree(series.folder)
        bodies.append(Body(path, series.instances, series.bytes))
    return bodies


def post_all(bodies: Sequence[Body], target: Target, timeout: float) -> float:
    """POST every body at once with curl; the seconds until the last one answered 200."""
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                str(CURL),
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                str(int(timeout)),
                "-X",
                "POST",
                "--data-binary",
                f"@{body.path}",
                "-H",
                f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                "-H",
                "Accept: application/dicom+json",
                "-H",
                "Expect:",
                *target.curl_auth,
                target.url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for body in bodies
    ]
    codes = [p.communicate(timeout=timeout)[0].strip() for p in procs]
    seconds = time.monotonic() - started
    if any(code != "200" for code in codes):
        raise RuntimeError(f"{target.url}: HTTP statuses {codes}")
    return seconds


def _ingest_only(job: object) -> object:
    from service.worker import ProcessOutcome

    return ProcessOutcome(outputs=())


@contextlib.contextmanager
def node_target(work: Path) -> Iterator[Target]:
    """A fresh node with STOW-RS on (spool, SQLite in a new folder)."""
    from service.config import (
        AssemblySettings,
        DatabaseSettings,
        DicomSettings,
        HttpSettings,
        RetentionSettings,
        Settings,
        StorageSettings,
        WorkersSettings,
    )
    from service.dicomweb.settings import DicomwebClient, DicomwebSettings
    from service.node import Node

    home = Path(tempfile.mkdtemp(prefix="node-", dir=work))
    token = os.environ[TOKEN_ENV]
    settings = Settings(
        dicom=DicomSettings(port=0, allowed_callers=("STORESCU",)),
        assembly=AssemblySettings(quiet_period_s=600, poll_interval_s=0.1),
        storage=StorageSettings(
            spool_dir=home / "spool", results_dir=home / "results", min_free_mb=100
        ),
        retention=RetentionSettings(enabled=False),
        database=DatabaseSettings(url=f"sqlite:///{home / 'unict.db'}"),
        http=HttpSettings(host="127.0.0.1", port=0),
        dicomweb=DicomwebSettings(
            enabled=True,
            clients=(DicomwebClient(name="BENCH", token_env=TOKEN_ENV),),
            max_request_mb=100_000,
        ),
        workers=WorkersSettings(count=1, poll_interval_s=0.2),
    )
    node = Node(
        settings,
        _ingest_only,  # type: ignore[arg-type]
        lambda: (True, "no engine (STOW-RS benchmark)"),
        send=lambda outputs: [],
    )
    node.start(http=True)
    try:
        yield Target(
            f"http://127.0.0.1:{node.http_port}/studies",
            ("-H", f"Authorization: Bearer {token}"),
            lambda: len(list((home / "spool").rglob("*.dcm"))),
        )
    finally:
        node.stop()
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class OrthancTarget:
    """One Orthanc with the DICOMweb plugin for the run, emptied after each measurement."""

    work: Path
    stack: contextlib.ExitStack
    server: object = None

    @contextlib.contextmanager
    def measurement(self) -> Iterator[Target]:
        from tests.orthanc import PASSWORD, USER, OrthancServer, orthanc_server

        if self.server is None:
            self.server = self.stack.enter_context(
                orthanc_server(
                    self.work / "orthanc",
                    http_port=free_port(),
                    dicom_port=free_port(),
                    modalities={},
                    tcp_nodelay=False,
                )
            )
        server = self.server
        assert isinstance(server, OrthancServer)
        try:
            yield Target(
                f"{server.url}/dicom-web/studies",
                ("-u", f"{USER}:{PASSWORD}"),
                lambda: int(server.client.get_statistics().instances_count),
            )
        finally:
            server.client.delete_all_content()


@dataclass(frozen=True)
class Options:
    """What to measure."""

    slices: int = 300
    size: int = 512
    repeats: int = 3
    concurrency: int = 4
    timeout_s: float = 600.0


def run(options: Options, work: Path) -> list[Measurement]:
    """Measure the node and Orthanc, one request then `concurrency` at once."""
    if not CURL.exists():
        raise SystemExit(f"{CURL} not found (apt-get install curl)")
    if not ORTHANC.exists():
        raise SystemExit(f"{ORTHANC} not found (apt-get install orthanc orthanc-dicomweb)")
    os.environ.setdefault(TOKEN_ENV, "bench-" + os.urandom(8).hex())
    bodies = write_bodies(
        work / "data", slices=options.slices, copies=max(1, options.concurrency), size=options.size
    )
    results: dict[tuple[str, int], Measurement] = {}
    with contextlib.ExitStack() as stack:
        orthanc = OrthancTarget(work, stack)
        receivers: list[tuple[str, Callable[[], contextlib.AbstractContextManager[Target]]]] = [
            ("UniCT Node", lambda: node_target(work)),
            ("Orthanc + DICOMweb", orthanc.measurement),
        ]
        phases = [1] if options.concurrency <= 1 else [1, options.concurrency]
        for requests in phases:
            batch = bodies[:requests]
            for _ in range(options.repeats):
                for name, measurement in receivers:
                    m = results.setdefault(
                        (name, requests),
                        Measurement(
                            name,
                            requests,
                            sum(b.instances for b in batch),
                            sum(b.bytes for b in batch),
                        ),
                    )
                    with measurement() as target:
                        m.seconds.append(post_all(batch, target, options.timeout_s))
                        if (stored := target.stored()) != m.instances:
                            raise RuntimeError(f"{name} stored {stored} of {m.instances}")
    return list(results.values())


def table(results: Sequence[Measurement]) -> str:
    """The results as a markdown table, the node's time relative to Orthanc's."""
    orthanc = {m.requests: m.median_s for m in results if m.receiver != "UniCT Node"}
    lines = [
        "| receiver | requests at once | instances | MB | median s | best s | MB/s "
        "| instances/s | node ÷ Orthanc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        base = orthanc.get(m.requests)
        ratio = f"{m.median_s / base:.2f}" if base and m.receiver == "UniCT Node" else ""
        lines.append(
            f"| {m.receiver} | {m.requests} | {m.instances} | {m.bytes / 1e6:.1f} "
            f"| {m.median_s:.2f} | {m.best_s:.2f} | {m.bytes / 1e6 / m.median_s:.0f} "
            f"| {m.instances / m.median_s:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_stow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--slices", type=int, default=300, help="instances per series (300)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (512)")
    parser.add_argument("--repeats", type=int, default=3, help="POSTs per receiver (3)")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests at once in the second phase (4)"
    )
    args = parser.parse_args(argv)
    options = Options(
        slices=args.slices, size=args.size, repeats=args.repeats, concurrency=args.concurrency
    )
    work = Path(tempfile.mkdtemp(prefix="unict-stow-bench-"))
    try:
        results = run(options, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(_first_line(["/usr/sbin/Orthanc", "--version"], "Orthanc"))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
