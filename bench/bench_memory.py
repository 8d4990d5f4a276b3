"""Peak memory (RSS) of the node receiving and analysing a 300- and a 600-slice study.

Usage: python -m bench.bench_memory [--slices 300 600] [--timeout 900]

For each size, a fresh node runs as its own process, as in production
(``python -m service.cli serve --config ...``, i.e. ``unict-node serve``): SQLite, the
bundled model with the default engine order, one worker, its SEG and SR sent to DCMTK
``/usr/bin/storescp`` on 127.0.0.1. The study is the realistic 512x512 phantom with that
many slices, sent by DCMTK ``/usr/bin/storescu`` (TCP_NODELAY=1). Memory is read from
``/proc/<pid>/status`` of the node's process (no extra package needed):

- **ready**: VmRSS once ``/readyz`` answers (model loaded, listener bound), and VmHWM, the
  peak of the start-up (an engine export, if any, happens here);
- **receive peak**: the peak while the study arrives: the peak counter is reset (writing
  ``5`` to ``/proc/<pid>/clear_refs``, Linux 4.0 or later) before the send and read when
  storescu exits;
- **analysis peak**: reset again, then read when the job is DONE: load, preprocess, infer,
  postprocess, encode and send of the study.

MB are 2^20 bytes. Generating the study and sending it happen in other processes and are
not counted. The model plans folder is shared between the sizes, so a one-time export
shows in the first size's start-up peak only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import free_port

STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
ECHOSCU = Path("/usr/bin/echoscu")
REPO = Path(__file__).resolve().parents[1]


def proc_status(pid: int) -> dict[str, int]:
    """The ``kB`` fields of ``/proc/<pid>/status`` (VmRSS, VmHWM, ...), in kB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0])
    return fields


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS; ``False`` where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def mb(kb: int) -> float:
    """kB to MB (2^20 bytes)."""
    return kb / 1024


@dataclass
class Row:
    """One study size."""

    slices: int
    ready_rss_kb: int = 0
    startup_peak_kb: int = 0
    receive_peak_kb: int | None = None
    analysis_peak_kb: int | None = None
    end_rss_kb: int = 0
    job_state: str = ""
    seconds: float = 0.0
    engine: str = ""
    notes: list[str] = field(default_factory=list)


def table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table (MB = 2^20 bytes)."""

    def cell(kb: int | None) -> str:
        return "n/a" if kb is None else f"{mb(kb):.0f}"

    lines = [
        "| study | job | ready RSS MB | start-up peak MB | receive peak MB "
        "| analysis peak MB | RSS after MB | analysis s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.slices}×512×512 | {r.job_state} | {cell(r.ready_rss_kb)} "
            f"| {cell(r.startup_peak_kb)} | {cell(r.receive_peak_kb)} "
            f"| **{cell(r.analysis_peak_kb)}** | {cell(r.end_rss_kb)} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def _http_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def _dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


@contextlib.contextmanager
def destination(work: Path) -> Iterator[int]:
    """DCMTK storescp on 127.0.0.1, the node's destination; yields its port."""
    port = free_port()
    out = work / "destination"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(STORESCP), "-aet", "DEST", "-od", str(out), str(port)],
        env=_dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while (
            subprocess.run(
                [str(ECHOSCU), "-aec", "DEST", "127.0.0.1", str(port)],
                env=_dcmtk_env(),
                capture_output=True,
                timeout=15,
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("storescp (destination) did not answer C-ECHO")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_config(home: Path, plans: Path, dest_port: int) -> tuple[Path, int, int]:
    """A node configuration in `home`; returns its path, DICOM port and HTTP port."""
    dicom_port, http_port = free_port(), free_port()
    config = {
        "dicom": {
            "ae_title": "UNICT",
            "port": dicom_port,
            "bind_address": "127.0.0.1",
            "allowed_callers": ["STORESCU"],
        },
        "assembly": {"poll_interval_s": 0.1},
        "destinations": [
            {"name": "storescp", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}
        ],
        "storage": {
            "spool_dir": str(home / "spool"),
            "results_dir": str(home / "results"),
            "min_free_mb": 100,
        },
        "retention": {"enabled": False},
        "database": {"url": f"sqlite:///{home / 'unict.db'}"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "model": {"plan_dir": str(plans)},
        "workers": {"count": 1, "poll_interval_s": 0.1},
        "logging": {"level": "WARNING"},
    }
    path = home / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, dicom_port, http_port


def measure(slices: int, work: Path, plans: Path, dest_port: int, timeout: float, seed: int) -> Row:
    """Run a fresh node, send it a study of `slices` slices, read its memory."""
    from bench.bench_model import realistic_volume
    from model.phantom.dicom_series import write_ct_series

    row = Row(slices)
    home = work / f"node-{slices}"
    home.mkdir(parents=True)
    hu, affine = realistic_volume(slices, seed)
    study = home / "study"
    write_ct_series(hu, affine, study, patient_name="Bench^Memory", patient_id=f"MEM{slices}")
    del hu
    config, dicom_port, http_port = write_config(home, plans, dest_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNICT_")}
    log = (home / "node.log").open("wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + timeout
    try:
        while _http_json(f"{base}/readyz")[0] != 200:
            if node.poll() is not None or time.monotonic() > deadline:
                tail = (home / "node.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the node did not become ready:\n{tail}")
            time.sleep(0.2)
        status = proc_status(node.pid)
        row.ready_rss_kb, row.startup_peak_kb = status["VmRSS"], status["VmHWM"]
        resettable = reset_peak(node.pid)
        if not resettable:
            row.notes.append("clear_refs refused: peaks are since start-up")
        subprocess.run(
            [str(STORESCU), "-aec", "UNICT", "+sd", "127.0.0.1", str(dicom_port), str(study)],
            env=_dcmtk_env(),
            check=True,
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        start = time.monotonic()
        row.receive_peak_kb = proc_status(node.pid)["VmHWM"] if resettable else None
        reset_peak(node.pid)
        job: dict[str, Any] | None = None
        while job is None or job["state"] not in ("DONE", "FAILED", "REJECTED"):
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no finished job within {timeout} s (last: {job})")
            time.sleep(0.1)
            code, body = _http_json(f"{base}/jobs?limit=5")
            if code == 200 and body["jobs"]:
                job = body["jobs"][0]
        row.seconds = time.monotonic() - start
        status = proc_status(node.pid)
        row.analysis_peak_kb = status["VmHWM"]
        row.end_rss_kb = status["VmRSS"]
        row.job_state = str(job["state"])
        if job["state"] != "DONE":
            row.notes.append(
                f"{slices}: job {job['state']}: {job.get('error_stage')} "
                f"{job.get('error_reason') or job.get('rejected_rule')}"
            )
        row.engine = str(job.get("outputs", {}).get("result", {}).get("engine", ""))
        children = subprocess.run(
            ["ps", "--ppid", str(node.pid), "-o", "pid="], capture_output=True, text=True
        ).stdout.split()
        if children:
            row.notes.append(
                f"{slices}: the node has {len(children)} child process(es), not counted"
            )
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        log.close()
        shutil.rmtree(study, ignore_errors=True)
        shutil.rmtree(home / "spool", ignore_errors=True)
    return row


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--slices", type=int, nargs="+", default=[300, 600], help="study sizes (300 600)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="limit per study, start-up included (900 s)"
    )
    parser.add_argument("--seed", type=int, default=5150)
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.slices):
        parser.error("--slices must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not tool.exists():
            raise SystemExit(f"{tool} not found (apt-get install dcmtk)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="unict-bench-memory-") as tmp:
        work = Path(tmp)
        with destination(work) as dest_port:
            for i, slices in enumerate(args.slices):
                rows.append(
                    measure(slices, work, work / "plans", dest_port, args.timeout, args.seed + i)
                )
                print(f"{slices} slices: {rows[-1].job_state}", flush=True)
    engines = sorted({r.engine for r in rows if r.engine})
    print(
        f"\nPeak RSS of the node process (`unict-node serve`), engine {', '.join(engines) or '?'}, "
        f"{os.cpu_count()} CPUs\n"
    )
    print(table(rows))
    for note in (n for r in rows for n in r.notes):
        print(f"- {note}")


if __name__ == "__main__":
    main()
