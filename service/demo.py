"""``unict-node demo``: a synthetic chest CT through a running node, end to end.

It renders a phantom with findings on a realistic grid (512x512, sub-millimetre pixels),
writes it as a CT series, C-STOREs it to the node named in config.yaml (as calling AE
``UNICT_DEMO``), waits for the job, and prints the findings next to the truth, the
report text and the path of the PNG overlay the node wrote.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from service.commands import add_config_argument, settings_from_args

DEMO_AE = "UNICT_DEMO"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``unict-node demo``."""
    add_config_argument(parser)
    parser.add_argument("--seed", type=int, default=20261123, help="phantom seed")
    parser.add_argument("--host", default="127.0.0.1", help="the node's address")
    parser.add_argument(
        "--port", type=int, default=None, help="the node's DICOM port (default: config)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the result"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the series here (default: a temp folder)"
    )


def send_series(
    paths: list[Path], host: str, port: int, called_ae: str, calling_ae: str = DEMO_AE
) -> int:
    """C-STORE files to a node; returns how many were accepted."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"association with {called_ae}@{host}:{port} was not established")
    ok = 0
    try:
        for path in paths:
            status = assoc.send_c_store(dcmread(path))
            if status and status.Status == 0x0000:
                ok += 1
    finally:
        assoc.release()
    return ok


def wait_for_job(
    database_url: str, series_uid: str, timeout: float, *, delivered: bool = False
) -> Any:
    """Poll the job store for the series' job.

    Returns as soon as the job has a result (it reached SENDING) or ended without one
    (REJECTED, FAILED); with ``delivered``, waits for DONE or FAILED instead.
    """
    from service.store import JobStore

    store = JobStore(database_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in store.list_jobs(limit=200):
            if job.series_instance_uid != series_uid:
                continue
            state = job.state.value
            if delivered and state in ("DONE", "FAILED", "REJECTED"):
                return job
            if not delivered and (
                "result" in job.outputs or state in ("DONE", "FAILED", "REJECTED")
            ):
                return job
        time.sleep(0.5)
    raise TimeoutError(f"no result for the demo series after {timeout:.0f} s")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when the job is DONE."""
    from model.phantom import generate
    from model.phantom.dicom_series import write_ct_series

    settings = settings_from_args(args)
    phantom = generate(args.seed, "realistic", p_normal=0.0)
    out = args.out or Path(tempfile.mkdtemp(prefix="unict-demo-"))
    paths = write_ct_series(
        phantom.hu,
        phantom.affine_lps,
        out,
        patient_name="Demo^Phantom",
        patient_id="UNICT-DEMO-1",
        series_description="Synthetic chest CT (UniCT demo)",
        instance_order="shuffled",
        slice_thickness=phantom.grid.slice_thickness,
    )
    from pydicom import dcmread

    series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    port = args.port or settings.dicom.port
    print(f"demo series: {len(paths)} slices {phantom.hu.shape[1]}x{phantom.hu.shape[2]} in {out}")
    started = time.monotonic()
    sent = send_series(paths, args.host, port, settings.dicom.ae_title)
    print(f"sent {sent}/{len(paths)} instances to {settings.dicom.ae_title}@{args.host}:{port}")
    job = wait_for_job(settings.database.url, series_uid, args.timeout)
    print(
        f"job {job.id}: analysed {time.monotonic() - started:.1f} s after sending ({job.state.value})"
    )
    result = job.outputs.get("result")
    if result is None:
        reason = job.error_reason or job.rejected_rule or ""
        print(f"  no result: {job.error_stage or ''} {reason}", file=sys.stderr)
        return 1
    truth = {
        key
        for key, p in zip(
            [f["key"] for f in result.get("findings", [])], phantom.present, strict=False
        )
        if p
    }
    print(f"\n{'finding':<34}{'prob':>6}{'thr':>6}  node     truth")
    for f in result.get("findings", []):
        mark = "PRESENT" if f["present"] else "-"
        print(
            f"{f['name']:<34}{f['probability']:>6.2f}{f['threshold']:>6.2f}  {mark:<8} "
            f"{'present' if f['key'] in truth else '-'}"
        )
        for les in f["lesions"][:3]:
            print(
                f"{'':>4}lesion {les['number']}: {les['volume_ml']:.1f} mL, "
                f"{les['longest_axial_diameter_mm']:.0f} mm, {les['laterality']}"
            )
    print(f"\nreport: {result.get('report_text', '')}")
    print(f"truth:  {phantom.report}")
    print(f"\noverlay PNG: {result.get('preview_png')}")
    try:
        job = wait_for_job(settings.database.url, series_uid, 30.0, delivered=True)
    except TimeoutError:
        print("delivery: still being sent (or retried); see `unict-node jobs show " + f"{job.id}`")
        return 0
    if job.state.value == "DONE":
        for sent_item in job.outputs.get("sent", []):
            print(
                f"delivered: {sent_item.get('sop_class_uid')} to {sent_item.get('destination')} "
                f"(status {sent_item.get('status')})"
            )
    else:
        print(
            f"delivery failed ({job.error_stage}): {job.error_reason}; is the destination PACS up?"
        )
    return 0
