"""Load: several senders at once (DCMTK storescu processes and pynetdicom clients) send
studies to one node while its workers run the jobs; nothing may be lost.

Usage: python -m bench.bench_load [--studies 20] [--slices 40] [--size 128] [--workers 2]
                                  [--model fake|real] [--stow]

The node runs in this process on loopback (SQLite, spool in a temporary folder) with its
real listener, assembler, job store, pipeline and C-STORE sender; the PACS is a pynetdicom
Storage SCP. ``--model real`` runs the bundled UniCT checkpoint (engines in the default
order); ``--model fake`` replaces only its forward pass by the test double, to measure the
node rather than the model. Every study is one CT series with Images in Acquisition (so it
is complete when its association is released) sent on an association of its own, half by
``/usr/bin/storescu`` (TCP_NODELAY=1), half by pynetdicom, all at once. With ``--stow``
a third of them go by STOW-RS instead (dicomweb-client, one request a study, to the node's
``POST /studies``): DCMTK, pynetdicom and STOW-RS in turn.

Prints one table:

    | studies | instances | senders (DCMTK + pynetdicom + STOW-RS) | refused | lost | receive s |
    | instances/s | jobs DONE | jobs/min | last instance -> last job DONE s |

and exits 1 if an instance was refused or lost, or a job did not end DONE.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import generate_uid

from service.config import HttpSettings, WorkersSettings
from service.dicomweb.settings import DicomwebClient, DicomwebSettings
from service.store import JobState
from tests.service.node_harness import (
    FINAL_STATES,
    Destination,
    PipelineProcessor,
    ct_datasets,
    node_settings,
    running_node,
    send,
)

STORESCU = Path("/usr/bin/storescu")


@dataclass(frozen=True)
class Study:
    """A study written to disk: one CT series."""

    study_uid: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class Sent:
    """What one sender did."""

    study_uid: str
    sender: str
    instances: int
    ok: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class LoadResult:
    """The figures of one load run."""

    studies: int
    instances: int
    dcmtk_senders: int
    pynetdicom_senders: int
    stow_senders: int
    refused: int
    lost: int
    receive_s: float
    jobs_done: int
    jobs_total: int
    drain_s: float

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.receive_s if self.receive_s else 0.0

    @property
    def jobs_per_min(self) -> float:
        total = self.receive_s + self.drain_s
        return 60.0 * self.jobs_done / total if total else 0.0

    def table(self) -> str:
        header = (
            "| studies | instances | senders (DCMTK + pynetdicom + STOW-RS) | refused | lost | "
            "receive s | instances/s | jobs DONE | jobs/min | last instance -> last job DONE s |"
        )
        rule = "|" + "---|" * 10
        row = (
            f"| {self.studies} | {self.instances} | {self.dcmtk_senders} + "
            f"{self.pynetdicom_senders} + {self.stow_senders} | {self.refused} | {self.lost} | "
            f"{self.receive_s:.1f} | "
            f"{self.instances_per_s:.1f} | {self.jobs_done}/{self.jobs_total} | "
            f"{self.jobs_per_min:.1f} | {self.drain_s:.1f} |"
        )
        return "\n".join((header, rule, row))


def write_studies(root: Path, count: int, slices: int, size: int) -> list[Study]:
    """`count` studies of one series of `slices` slices of `size` x `size`."""
    studies = []
    for _ in range(count):
        study_uid = generate_uid()
        folder = root / study_uid
        folder.mkdir(parents=True)
        paths = []
        for ds in ct_datasets(
            slices, study_uid, rows=size, columns=size, images_in_acquisition=slices
        ):
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        studies.append(Study(study_uid, tuple(paths)))
    return studies


def send_with_dcmtk(port: int, study: Study) -> Sent:
    """One study by DCMTK storescu (by absolute path: pynetdicom installs its own)."""
    started = time.monotonic()
    proc = subprocess.run(
        [str(STORESCU), "-aet", "STORESCU", "-aec", "UNICT", "127.0.0.1", str(port)]
        + [str(p) for p in study.paths],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return Sent(
        study.study_uid,
        "dcmtk",
        len(study.paths),
        proc.returncode == 0,
        proc.stderr.strip()[-300:],
        time.monotonic() - started,
    )


def send_with_pynetdicom(port: int, study: Study) -> Sent:
    """One study by a pynetdicom client."""
    started = time.monotonic()
    try:
        statuses = send(port, list(study.paths))
        ok, detail = all(s == 0 for s in statuses), f"statuses {sorted(set(statuses))}"
    except AssertionError as exc:  # association refused
        ok, detail = False, str(exc)
    return Sent(
        study.study_uid, "pynetdicom", len(study.paths), ok, detail, time.monotonic() - started
    )


STOW_TOKEN_ENV = "UNICT_LOAD_STOW_TOKEN"


def send_with_stow(url: str, token: str, study: Study) -> Sent:
    """One study by STOW-RS (dicomweb-client, one request)."""
    from dicomweb_client.api import DICOMwebClient
    from pydicom import dcmread

    started = time.monotonic()
    client = DICOMwebClient(url, headers={"Authorization": f"Bearer {token}"})
    try:
        response = client.store_instances([dcmread(p) for p in study.paths])
        stored = len(response.get("ReferencedSOPSequence", []))
        failed = len(response.get("FailedSOPSequence", []))
        ok, detail = stored == len(study.paths) and not failed, f"{stored} stored, {failed} failed"
    except Exception as exc:  # HTTP error or connection refused: reported, counted refused
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return Sent(study.study_uid, "stow", len(study.paths), ok, detail, time.monotonic() - started)


def run_load(
    node_port: int,
    studies: Sequence[Study],
    *,
    count_jobs: Callable[[], tuple[int, int, int]],
    timeout_s: float = 900.0,
    stow: tuple[str, str] | None = None,
) -> tuple[list[Sent], float, float]:
    """Send every study at once (even ones by DCMTK when installed, odd ones by pynetdicom;
    with `stow`, ``(url, token)`` of the node's DICOMweb root, every third by STOW-RS).

    `count_jobs` is called with no argument and returns ``(final, total, done)`` job
    counts; the run waits until every study has a final job. Returns what each sender did,
    the seconds until the last sender finished and the seconds from then until the last
    job ended.
    """
    senders: list[Callable[[Study], Sent]] = []
    if STORESCU.exists():
        senders.append(lambda study: send_with_dcmtk(node_port, study))
    senders.append(lambda study: send_with_pynetdicom(node_port, study))
    if stow is not None:
        url, token = stow
        senders.append(lambda study: send_with_stow(url, token, study))
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(studies)) as pool:
        futures = [pool.submit(senders[i % len(senders)], study) for i, study in enumerate(studies)]
        sent = [f.result() for f in futures]
    received = time.monotonic()
    deadline = received + timeout_s
    while True:
        final, total, _ = count_jobs()
        if total >= len(studies) and final == total:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return sent, received - started, time.monotonic() - received


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--studies", type=int, default=20, help="studies sent at once")
    parser.add_argument("--slices", type=int, default=40, help="slices per study")
    parser.add_argument("--size", type=int, default=128, help="rows and columns of a slice")
    parser.add_argument("--workers", type=int, default=2, help="the node's worker threads")
    parser.add_argument(
        "--model", choices=["fake", "real"], default="fake", help="forward pass (see above)"
    )
    parser.add_argument("--stow", action="store_true", help="a third of the studies by STOW-RS")
    args = parser.parse_args(argv)
    if args.studies > 64:
        parser.error("--studies is bounded to 64 (one association each, on loopback)")

    work = Path(tempfile.mkdtemp(prefix="unict-load-"))
    studies = write_studies(work / "studies", args.studies, args.slices, args.size)
    pacs = Destination().start()
    settings = node_settings(
        work / "node",
        pacs,
        quiet_period_s=30,
        workers=WorkersSettings(count=args.workers, poll_interval_s=0.1),
        max_associations=max(10, args.studies + 2),
    )
    token = os.environ.setdefault(STOW_TOKEN_ENV, generate_uid())  # any non-placeholder
    if args.stow:
        settings = settings.model_copy(
            update={
                "http": HttpSettings(host="127.0.0.1", port=0),
                "dicomweb": DicomwebSettings(
                    enabled=True,
                    clients=(DicomwebClient(name="LOADSTOW", token_env=STOW_TOKEN_ENV),),
                ),
            }
        )
    processor: object = PipelineProcessor()
    if args.model == "real":
        from service.processor import UniCTProcessor

        real = UniCTProcessor(settings)
        real.load()
        processor = real
    try:
        with running_node(settings, processor, http=args.stow) as (node, _):  # type: ignore[arg-type]

            def count_jobs() -> tuple[int, int, int]:
                jobs = node.store.list_jobs(limit=10_000)
                final = sum(j.state in FINAL_STATES for j in jobs)
                done = sum(j.state is JobState.DONE for j in jobs)
                return final, len(jobs), done

            stow = (f"http://127.0.0.1:{node.http_port}", token) if args.stow else None
            sent, receive_s, drain_s = run_load(
                node.dicom_port, studies, count_jobs=count_jobs, stow=stow
            )
            jobs = node.store.list_jobs(limit=10_000)
            recorded = {i.sop_instance_uid for j in jobs for i in node.store.job_instances(j.id)}
    finally:
        pacs.stop()
    expected = {p.name.removesuffix(".dcm") for s in studies for p in s.paths}
    result = LoadResult(
        studies=len(studies),
        instances=len(expected),
        dcmtk_senders=sum(s.sender == "dcmtk" for s in sent),
        pynetdicom_senders=sum(s.sender == "pynetdicom" for s in sent),
        stow_senders=sum(s.sender == "stow" for s in sent),
        refused=sum(not s.ok for s in sent),
        lost=len(expected - recorded),
        receive_s=receive_s,
        jobs_done=sum(j.state is JobState.DONE for j in jobs),
        jobs_total=len(jobs),
        drain_s=drain_s,
    )
    print(result.table())
    for s in sent:
        if not s.ok:
            print(f"sender {s.sender} of study {s.study_uid} failed: {s.detail}", file=sys.stderr)
    ok = result.refused == 0 and result.lost == 0 and result.jobs_done == len(studies)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
