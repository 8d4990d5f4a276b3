"""The shared real series (``../shared/realct``) through whole nodes (issue 14).

- LIDC-IDRI-0001 through a real Orthanc and the node with its bundled model: at most 20 SR
  measurement groups, no segment with more than 25 % of its voxels outside the lungs (5 mm
  tolerance), the nodule Present with a segment of Dice >= 0.6 against the readers' mask,
  and a report that agrees with the SEG on side and lobe. (The turnaround is measured in
  ``bench/bench_realct.py``, not asserted here.)
- The Siemens JPEG 2000 series: with the decoders installed it is received and rejected by
  its selection rule, the rule named; without them (a node process that cannot import
  them) its syntax is refused at association. Nothing is lost, nothing crashes.

Every test skips, with the reason, when the real data is not there; it is read where it
lies, never copied into the project.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import CTImageStorage, JPEG2000Lossless
from pynetdicom import AE

from bench.realct import (
    SIEMENS_J2K,
    figures,
    node_with_orthanc,
    readers_mask,
    realct_missing_reason,
    round_trip,
    unpack_lidc,
)
from service.config import SelectionSettings
from service.store import JobState, JobStore
from tests.conftest import free_port, wait_until
from tests.orthanc import skip_without_orthanc
from tests.service.node_harness import (
    CALLING_AE,
    NODE_AE,
    node_settings,
    running_node,
    send,
    settled,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

STORESCU = Path("/usr/bin/storescu")
ECHOSCU = Path("/usr/bin/echoscu")


def _require_realct() -> None:
    reason = realct_missing_reason()
    if reason:
        pytest.skip(reason)


def _require_siemens() -> list[Path]:
    files = sorted(SIEMENS_J2K.glob("*")) if SIEMENS_J2K.is_dir() else []
    if not files:
        pytest.skip(f"the shared Siemens JPEG 2000 series is not at {SIEMENS_J2K}")
    return files


@skip_without_orthanc
@pytest.mark.orthanc
def test_the_real_chest_ct_reads_as_a_radiologist_expects(tmp_path: Path) -> None:
    _require_realct()
    series = unpack_lidc(tmp_path / "lidc")
    with node_with_orthanc(tmp_path / "node") as (node, orthanc):
        rt = round_trip(node, orthanc, series)
    result = figures(rt, series, readers_mask())
    print(f"turnaround {rt.turnaround_s:.2f} s, stages {rt.stages}; {result}")
    assert result.groups <= 20
    assert result.outside_lungs, "no segment"
    for label, fraction in result.outside_lungs.items():
        assert fraction <= 0.25, (label, fraction)
    assert "Pulmonary nodule / mass" in result.present
    assert result.nodule_dice is not None and result.nodule_dice >= 0.6
    agreeing, sentences = result.agreement
    assert sentences >= 1 and agreeing == sentences, result.text
    assert result.laa950 is not None and 0.0 <= result.laa950 < 100.0


def test_a_jpeg2000_series_from_another_vendor_is_received_and_rejected_by_its_rule(
    tmp_path: Path,
) -> None:
    """Decoders installed: the 20 slices are stored and recorded, and the series is turned
    away by the product's selection rules (too few slices for a chest CT), rule named."""
    files = _require_siemens()
    settings = node_settings(tmp_path, None, selection=SelectionSettings())
    with running_node(settings) as (node, processor):
        statuses = send(node.dicom_port, files, syntaxes=(JPEG2000Lossless,))
        assert statuses == [0] * len(files)
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        (job,) = settled(node, study_uid)
    assert job.state == JobState.REJECTED
    assert job.rejected_rule is not None and "min_slices" in job.rejected_rule
    assert job.instance_count == len(files)
    assert processor.jobs == []  # never analysed
    spooled = list((tmp_path / "spool").rglob("*.dcm"))
    assert len(spooled) == len(files)


@pytest.fixture
def node_without_decoders(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """``unict-node serve`` in a process that cannot import the decoders extra."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "from importlib.abc import MetaPathFinder\n"
        "HIDDEN = {'pylibjpeg', 'openjpeg', 'libjpeg', 'rle', 'jpeg_ls', 'gdcm'}\n"
        "class Hide(MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HIDDEN:\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    dicom_port, http_port = free_port(), free_port()
    config = {
        "dicom": {
            "ae_title": NODE_AE,
            "port": dicom_port,
            "bind_address": "127.0.0.1",
            "allowed_callers": [CALLING_AE],
        },
        "destinations": [],
        "storage": {"spool_dir": "spool", "min_free_mb": 0, "results_dir": "results"},
        "database": {"url": "sqlite:///db/unict.db"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "model": {"engines": ["pytorch"], "threads": 1, "plan_dir": "plans"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "node.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(hide)}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--config", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
    )
    try:
        echo = [str(ECHOSCU), "-aet", CALLING_AE, "-aec", NODE_AE, "127.0.0.1", str(dicom_port)]
        wait_until(
            lambda: (
                process.poll() is None
                and subprocess.run(echo, capture_output=True, timeout=30).returncode == 0
            ),
            timeout=180,
            what="the node's DICOM listener",
        )
        yield dicom_port, tmp_path
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


@pytest.mark.skipif(not STORESCU.exists(), reason="DCMTK (storescu) is not installed")
def test_without_decoders_a_jpeg2000_series_is_refused_at_association(
    node_without_decoders: tuple[int, Path],
) -> None:
    files = _require_siemens()
    port, workdir = node_without_decoders
    # The presentation context of CT Image Storage in JPEG 2000 Lossless is rejected.
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(CTImageStorage, [JPEG2000Lossless])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    try:
        assert not assoc.accepted_contexts
        assert [c.abstract_syntax for c in assoc.rejected_contexts] == [CTImageStorage]
    finally:
        if assoc.is_established:
            assoc.release()
    # A real sender offering JPEG 2000 and the uncompressed syntaxes gets only the latter,
    # and DCMTK cannot transcode JPEG 2000: it reports the failure, the node is untouched.
    env = {**os.environ, "TCP_NODELAY": "1"}
    store = subprocess.run(
        [
            str(STORESCU),
            "-xv",
            "-aet",
            CALLING_AE,
            "-aec",
            NODE_AE,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    output = store.stdout + store.stderr
    assert store.returncode != 0, output
    assert "unable to convert dataset from 'JPEG 2000" in output, output
    # Nothing was stored, nothing recorded, and the node still answers.
    assert not list((workdir / "spool").rglob("*.dcm"))
    store_db = JobStore(f"sqlite:///{workdir / 'db' / 'unict.db'}")
    try:
        assert store_db.list_jobs() == []
    finally:
        store_db.close()
    echo = subprocess.run(
        [str(ECHOSCU), "-aet", CALLING_AE, "-aec", NODE_AE, "127.0.0.1", str(port)],
        capture_output=True,
        timeout=30,
    )
    assert echo.returncode == 0
