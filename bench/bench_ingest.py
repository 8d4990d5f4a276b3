"""Ingest throughput: DCMTK storescu to the node's listener, to DCMTK storescp and to Orthanc.

Usage: python -m bench.bench_ingest [--slices 300] [--repeats 3] [--concurrency 4]
                                    [--skip-orthanc]

One CT series of ``--slices`` slices of 512x512 (the realistic phantom, Explicit VR Little
Endian, about 0.5 MB per instance) is written once into a temporary folder, plus
``--concurrency - 1`` copies with UIDs of their own. Each copy is sent by DCMTK's
``/usr/bin/storescu`` (by absolute path: pynetdicom installs a ``storescu`` of its own) to

- the node's listener, in this process: :class:`service.node.Node` with a fresh SQLite job
  store and spool per measurement and an analysis that does nothing, so what is timed is
  the receive path (spool file, fsync, job store, assembler) and no model runs;
- DCMTK ``/usr/bin/storescp`` writing into a fresh folder (``--fork`` when several senders
  connect at once; one association at a time otherwise, its default);
- Orthanc 1.10 (``/usr/sbin/Orthanc``, storage emptied over REST after each measurement),

all on 127.0.0.1, in one run, the receivers taking turns within each repeat so that load
from other jobs falls on all of them alike. DCMTK runs in its fast setting
(``TCP_NODELAY=1`` in the environment of storescu, storescp and Orthanc) and in its default
(the variable unset): since DCMTK 3.6.2 Nagle's algorithm stays on unless it is set, and the
receiver's responses then wait on delayed ACKs. The node is Python: the variable changes
only its sender.

First one sender, then ``--concurrency`` senders at once, each with a series of its own.
Seconds run from storescu's start to its exit (to the last one's exit with several
senders): every instance acknowledged, so on disk. MB are 10^6 bytes of DICOM files sent.
The last column is the time relative to DCMTK storescp in its fast setting with as many
senders: a ratio from one run, which is what to compare on a noisy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import yaml

from tests.conftest import free_port

if TYPE_CHECKING:
    from service.worker import ClaimedJob, ProcessOutcome
    from tests.orthanc import OrthancServer

STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
ECHOSCU = Path("/usr/bin/echoscu")
ORTHANC = Path("/usr/sbin/Orthanc")
MODES = ("fast", "default")
"""DCMTK's fast setting (``TCP_NODELAY=1``) and its default (variable unset)."""

SENDER_AET = "STORESCU"


@dataclass(frozen=True)
class SeriesOnDisk:
    """One series written as files in its own folder."""

    folder: Path
    instances: int
    bytes: int


@dataclass
class Measurement:
    """Repeated sends of the same series set to one receiver in one setting."""

    receiver: str
    mode: str
    senders: int
    instances: int
    bytes: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best_s(self) -> float:
        return min(self.seconds)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.median_s

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.median_s


def dcmtk_env(mode: str) -> dict[str, str]:
    """The environment of a DCMTK process in `mode` (``fast`` or ``default``)."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if mode == "fast":
        env["TCP_NODELAY"] = "1"
    elif mode != "default":
        raise ValueError(f"unknown mode {mode!r}")
    return env


def _volume(slices: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The realistic phantom at 512x512; a plain synthetic volume at other sizes (tests)."""
    if size == 512:
        from bench.bench_model import realistic_volume

        return realistic_volume(slices, seed)
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 400, size=(slices, size, size), dtype=np.int16)
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, 1.0]
    affine[:3, 1] = [0.0, 0.7, 0.0]
    affine[:3, 2] = [0.7, 0.0, 0.0]
    return hu, affine


def write_series(
    work: Path, *, slices: int, copies: int, size: int = 512, seed: int = 8800
) -> list[SeriesOnDisk]:
    """Render one volume and write it `copies` times, each with new UIDs and patient ID."""
    from model.phantom.dicom_series import write_ct_series

    hu, affine = _volume(slices, size, seed)
    out = []
    for i in range(copies):
        paths = write_ct_series(
            hu, affine, work / f"series{i}", patient_name="Bench^Ingest", patient_id=f"INGEST{i}"
        )
        out.append(
            SeriesOnDisk(work / f"series{i}", len(paths), sum(p.stat().st_size for p in paths))
        )
    return out


def storescu_command(folder: Path, port: int, aet: str) -> list[str]:
    """DCMTK storescu sending every file of `folder` to `aet` on 127.0.0.1:`port`."""
    return [
        str(STORESCU),
        "-aet",
        SENDER_AET,
        "-aec",
        aet,
        "+sd",
        "127.0.0.1",
        str(port),
        str(folder),
    ]


def send(series: Sequence[SeriesOnDisk], port: int, aet: str, mode: str, timeout: float) -> float:
    """Send each series by its own storescu, all at once; seconds until the last exits."""
    env = dcmtk_env(mode)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            storescu_command(s.folder, port, aet),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for s in series
    ]
    outputs = []
    deadline = start + timeout
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.perf_counter()))
            outputs.append((proc.returncode, out.decode(errors="replace")))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.perf_counter() - start
    for rc, text in outputs:
        if rc != 0:
            raise RuntimeError(f"storescu to {aet}:{port} exited with {rc}:\n{text[-2000:]}")
    return seconds


@dataclass(frozen=True)
class Target:
    """Where to send for one measurement, and how to count what was stored."""

    aet: str
    port: int
    stored: Callable[[], int]


class Receiver(Protocol):
    """A receiver that can be set up for one measurement."""

    name: str

    def measurement(self, mode: str, senders: int) -> contextlib.AbstractContextManager[Target]:
        """Ready to receive in `mode` on 127.0.0.1."""
        ...


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".part"))


def _wait_echo(port: int, aet: str, env: dict[str, str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rc = subprocess.run(
            [str(ECHOSCU), "-aet", SENDER_AET, "-aec", aet, "127.0.0.1", str(port)],
            env=env,
            capture_output=True,
            timeout=timeout,
        ).returncode
        if rc == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no C-ECHO answer from {aet} on port {port}")
        time.sleep(0.05)


@dataclass
class StoreSCP:
    """DCMTK storescp, started for each measurement in a fresh output folder."""

    work: Path
    name: str = "DCMTK storescp"

    @contextlib.contextmanager
    def measurement(self, mode: str, senders: int) -> Iterator[Target]:
        out = Path(tempfile.mkdtemp(prefix="storescp-", dir=self.work))
        port = free_port()
        env = dcmtk_env(mode)
        fork = ["--fork"] if senders > 1 else []
        proc = subprocess.Popen(
            [str(STORESCP), *fork, "-aet", "STORESCP", "-od", str(out), str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its --fork children share its process group
        )
        try:
            _wait_echo(port, "STORESCP", env)
            yield Target("STORESCP", port, lambda: _files(out))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            shutil.rmtree(out, ignore_errors=True)


def _ingest_only(job: ClaimedJob) -> ProcessOutcome:
    """The analysis of the ingest benchmark: nothing (no model runs while we measure)."""
    from service.worker import ProcessOutcome

    return ProcessOutcome(outputs=())


@dataclass
class NodeListener:
    """The node (job store, listener, assembler, one worker doing nothing), fresh each time."""

    work: Path
    processes: int = 1
    """``dicom.listener_processes``."""

    @property
    def name(self) -> str:
        if self.processes == 1:
            return "UniCT Node"
        return f"UniCT Node, {self.processes} listener processes"

    @contextlib.contextmanager
    def measurement(self, mode: str, senders: int) -> Iterator[Target]:
        from service.config import load_settings
        from service.node import Node

        home = Path(tempfile.mkdtemp(prefix="node-", dir=self.work))
        config = {
            "dicom": {
                "ae_title": "UNICT",
                "port": 0,
                "bind_address": "127.0.0.1",
                "allowed_callers": [SENDER_AET],
                "max_associations": max(10, senders + 1),
                "listener_processes": self.processes,
            },
            "assembly": {"poll_interval_s": 0.1},
            "storage": {
                "spool_dir": str(home / "spool"),
                "results_dir": str(home / "results"),
                "min_free_mb": 100,
            },
            "retention": {"enabled": False},
            "database": {"url": f"sqlite:///{home / 'unict.db'}"},
            "http": {"host": "127.0.0.1", "port": 0},
            "model": {"plan_dir": str(home / "plans")},
            "workers": {"count": 1, "poll_interval_s": 0.2},
        }
        (home / "config.yaml").write_text(yaml.safe_dump(config))
        settings = load_settings(home / "config.yaml")
        node = Node(
            settings,
            _ingest_only,
            lambda: (True, "no engine (ingest benchmark)"),
            send=lambda outputs: [],
        )
        node.start(http=False)
        try:
            yield Target("UNICT", node.dicom_port, lambda: _files(home / "spool"))
        finally:
            node.stop()
            shutil.rmtree(home, ignore_errors=True)


@dataclass
class OrthancPeer:
    """One Orthanc per mode for the whole run, emptied after each measurement."""

    work: Path
    stack: contextlib.ExitStack
    name: str = "Orthanc"
    servers: dict[str, OrthancServer] = field(default_factory=dict)

    def _server(self, mode: str) -> OrthancServer:
        from tests.orthanc import orthanc_server

        if mode not in self.servers:
            self.servers[mode] = self.stack.enter_context(
                orthanc_server(
                    self.work / f"orthanc-{mode}",
                    http_port=free_port(),
                    dicom_port=free_port(),
                    modalities={},
                    tcp_nodelay=mode == "fast",
                )
            )
        return self.servers[mode]

    @contextlib.contextmanager
    def measurement(self, mode: str, senders: int) -> Iterator[Target]:
        server = self._server(mode)
        try:
            yield Target(
                server.aet,
                server.dicom_port,
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
    orthanc: bool = True
    modes: tuple[str, ...] = MODES
    timeout_s: float = 600.0
    seed: int = 8800
    listener_processes: tuple[int, ...] = (1, 4)
    """The node once per value of ``dicom.listener_processes``."""


def run(options: Options, work: Path) -> list[Measurement]:
    """Measure every receiver in every mode, one sender then `concurrency` senders."""
    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not tool.exists():
            raise SystemExit(f"{tool} not found (apt-get install dcmtk)")
    copies = max(1, options.concurrency)
    series = write_series(
        work / "data", slices=options.slices, copies=copies, size=options.size, seed=options.seed
    )
    results: dict[tuple[str, str, int], Measurement] = {}
    with contextlib.ExitStack() as stack:
        receivers: list[Receiver] = [StoreSCP(work), NodeListener(work)]
        receivers += [NodeListener(work, n) for n in options.listener_processes if n != 1]
        if options.orthanc:
            if ORTHANC.exists():
                receivers.append(OrthancPeer(work, stack))
            else:
                print(f"(Orthanc skipped: {ORTHANC} not installed)")
        phases = [1] if options.concurrency <= 1 else [1, options.concurrency]
        for senders in phases:
            batch = series[:senders]
            for _ in range(options.repeats):
                for receiver in receivers:
                    for mode in options.modes:
                        key = (receiver.name, mode, senders)
                        m = results.setdefault(
                            key,
                            Measurement(
                                receiver.name,
                                mode,
                                senders,
                                sum(s.instances for s in batch),
                                sum(s.bytes for s in batch),
                            ),
                        )
                        with receiver.measurement(mode, senders) as target:
                            m.seconds.append(
                                send(batch, target.port, target.aet, mode, options.timeout_s)
                            )
                            # Count what was stored, whatever storescu's exit status said.
                            if (stored := target.stored()) != m.instances:
                                raise RuntimeError(
                                    f"{receiver.name} ({mode}) stored {stored} of "
                                    f"{m.instances} instances"
                                )
    return list(results.values())


def table(results: Sequence[Measurement]) -> str:
    """The results as a markdown table, with each row's time relative to storescp fast."""
    baseline = {
        m.senders: m.median_s
        for m in results
        if m.receiver == "DCMTK storescp" and m.mode == "fast"
    }
    lines = [
        "| receiver | DCMTK setting | senders | instances | MB | median s | best s | MB/s "
        "| instances/s | time ÷ storescp fast |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        setting = "TCP_NODELAY=1" if m.mode == "fast" else "default"
        base = baseline.get(m.senders)
        ratio = f"{m.median_s / base:.2f}" if base else "n/a"
        lines.append(
            f"| {m.receiver} | {setting} | {m.senders} | {m.instances} | {m.bytes / 1e6:.1f} "
            f"| {m.median_s:.2f} | {m.best_s:.2f} | {m.mb_per_s:.0f} | {m.instances_per_s:.0f} "
            f"| {ratio} |"
        )
    return "\n".join(lines)


def _first_line(command: Sequence[str], needle: str) -> str:
    try:
        out = subprocess.run(list(command), capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return f"{needle} ?"
    return next((line.strip() for line in out.splitlines() if needle in line), f"{needle} ?")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300, help="instances per series (300)")
    parser.add_argument("--repeats", type=int, default=3, help="sends per receiver and setting")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="senders at once in the second phase (4)"
    )
    parser.add_argument("--skip-orthanc", action="store_true", help="leave Orthanc out")
    parser.add_argument(
        "--size", type=int, default=512, help="rows and columns (512: realistic phantom)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="limit of one send, seconds (600)"
    )
    parser.add_argument("--seed", type=int, default=8800)
    parser.add_argument(
        "--listener-processes",
        type=int,
        nargs="+",
        default=[1, 4],
        help="measure the node with each of these dicom.listener_processes (1 4)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 16:
        parser.error("--concurrency must be 1..16")
    if args.repeats < 1 or args.slices < 1:
        parser.error("--repeats and --slices must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    options = Options(
        slices=args.slices,
        size=args.size,
        repeats=args.repeats,
        concurrency=args.concurrency,
        orthanc=not args.skip_orthanc,
        timeout_s=args.timeout,
        seed=args.seed,
        listener_processes=tuple(args.listener_processes),
    )
    import pynetdicom

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="unict-bench-ingest-") as tmp:
        results = run(options, Path(tmp))
    print(
        f"\nIngest of {args.slices} CT instances of {args.size}x{args.size} per sender, "
        f"{args.repeats} repeats; {_first_line([str(STORESCU), '--version'], 'dcmtk').strip('$ ')}; "
        f"{_first_line([str(ORTHANC), '--version'], 'Orthanc').rsplit('/', 1)[-1] if options.orthanc else ''}; "
        f"pynetdicom {pynetdicom.__version__}; load average {load:.1f} -> "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
