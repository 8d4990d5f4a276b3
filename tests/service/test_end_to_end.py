"""The product end to end: Orthanc C-STOREs a CT series to the node, UniCT runs, SEG + SR
come back into Orthanc's study; both are checked for content, validity (dciodvfy) and
readability by independent readers (dcmqi).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml

from model.phantom import generate
from model.phantom.dicom_series import write_ct_series
from model.training.metrics import dice
from service.config import load_settings
from service.node import Node
from service.processor import UniCTProcessor
from tests.conftest import OrthancFixture, free_port, wait_until

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PATIENT_NAME = "Phantom^Endtoend"
PATIENT_ID = "E2E-4711"
SEED = 424242


def node_config(tmp_path: Path, orthanc: OrthancFixture) -> Path:
    config = {
        "dicom": {
            "ae_title": orthanc.node_aet,
            "port": orthanc.node_port,
            "bind_address": "127.0.0.1",
            "allowed_callers": [orthanc.server.aet],
        },
        "assembly": {"quiet_period_s": 5, "poll_interval_s": 0.2},
        "destinations": [
            {
                "name": "orthanc",
                "ae_title": orthanc.server.aet,
                "host": "127.0.0.1",
                "port": orthanc.server.dicom_port,
            }
        ],
        "storage": {
            "spool_dir": str(tmp_path / "spool"),
            "min_free_mb": 50,
            "results_dir": str(tmp_path / "results"),
        },
        "database": {"url": f"sqlite:///{tmp_path / 'unict.db'}"},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "model": {"plan_dir": str(tmp_path / "plans"), "threads": 2},
        "workers": {"count": 1, "poll_interval_s": 0.2},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sr_strings(dataset: pydicom.Dataset) -> list[str]:
    """Every code meaning, tracking identifier and text value in an SR content tree."""
    out: list[str] = []
    for item in dataset.get("ContentSequence", []):
        for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            out += [str(code.CodeMeaning) for code in item.get(seq, [])]
        if "TextValue" in item:
            out.append(str(item.TextValue))
        for mv in item.get("MeasuredValueSequence", []):
            out.append(str(mv.NumericValue))
        out += sr_strings(item)
    return out


def dciodvfy_errors(path: Path) -> tuple[list[str], list[str]]:
    out = subprocess.run(
        ["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True, timeout=120
    )
    lines = (out.stdout + out.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [
        ln for ln in lines if ln.startswith("Warning")
    ]


@pytest.mark.orthanc
@pytest.mark.slow
def test_orthanc_to_node_to_orthanc(tmp_path: Path, orthanc: OrthancFixture) -> None:
    phantom = generate(SEED, "training", p_normal=0.0)
    assert phantom.present.any()
    paths = write_ct_series(
        phantom.hu,
        phantom.affine_lps,
        tmp_path / "ct",
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        slice_thickness=phantom.grid.slice_thickness,
    )
    ct = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    # Slice i of the phantom is the instance whose position is i steps along the slice axis.
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in ct])
    source_uids = [str(ct[i].SOPInstanceUID) for i in np.argsort(z)]
    study_uid = str(ct[0].StudyInstanceUID)

    settings = load_settings(node_config(tmp_path, orthanc))
    processor = UniCTProcessor(settings)
    node = Node(settings, processor, processor.status)
    client = orthanc.server.client
    with node:
        processor.load()
        for p in paths:
            client.upload_file(p)
        (series_id,) = client.lookup(str(ct[0].SeriesInstanceUID), filter="Series")
        client.modalities.send(orthanc.modality, series_id, timeout=120)
        job = wait_until(
            lambda: next(
                (
                    j
                    for j in node.store.list_jobs()
                    if j.state.value in ("DONE", "FAILED", "REJECTED")
                ),
                None,
            ),
            timeout=300,
            what="the job to end",
        )
    assert job.state.value == "DONE", (job.error_stage, job.error_reason, job.rejected_rule)
    for stage in ("load", "preprocess", "infer", "postprocess", "encode", "send"):
        assert stage in job.timings
    result = job.outputs["result"]
    assert Path(result["preview_png"]).is_file()
    assert all(s["ok"] for s in job.outputs["sent"])

    # Everything is in the CT's study in Orthanc.
    (study_id,) = client.lookup(study_uid, filter="Study")
    instances: dict[str, Any] = {}
    for sid in client.studies.get_series_ids(study_id):
        for iid in client.series.get_instances_ids(sid):
            ds = pydicom.dcmread(io.BytesIO(client.instances.get_file(iid)))
            instances.setdefault(str(ds.SOPClassUID), []).append(ds)
    assert len(instances["1.2.840.10008.5.1.4.1.1.2"]) == len(paths)
    (seg_ds,) = instances[SEG_STORAGE]
    (sr_ds,) = instances[COMPREHENSIVE_3D_SR]
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg_ds.save_as(seg_path)
    sr_ds.save_as(sr_path)

    # SEG: same study, same frame of reference, references the source, masks overlap the truth.
    seg = hd.seg.segread(seg_path)
    assert seg.StudyInstanceUID == study_uid
    assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    assert seg.SeriesNumber == settings.outputs.seg.series_number
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(source_uids)
    names = {f["name"]: i for i, f in enumerate(result["findings"])}
    dices = {}
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).SegmentLabel
        index = names[label]
        pixels = seg.get_pixels_by_source_instance(
            source_uids, segment_numbers=[number], ignore_spatial_locations=True
        )[..., 0]
        dices[label] = dice(pixels > 0, phantom.masks[index] > 0) if phantom.present[index] else 0.0
    print("SEG Dice per segment vs inserted lesions:", json.dumps(dices))
    assert dices and max(dices.values()) >= 0.3, dices

    # SR: TID 1500 with all 10 abnormalities, probabilities and the report text.
    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    strings = sr_strings(sr_ds)
    for finding in result["findings"]:
        assert finding["name"] in strings, finding["name"]
    assert {"Present", "Absent"} & set(strings)
    assert result["report_text"] and result["report_text"] in strings

    # Independent validators.
    for path in (seg_path, sr_path):
        errors, warnings = dciodvfy_errors(path)
        assert not errors, errors
        print(f"dciodvfy {path.name}: {len(warnings)} warning(s)", *warnings, sep="\n  ")
    # dcmqi's console scripts live next to this interpreter (the venv), maybe not on PATH.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    seg_reader = shutil.which("segimage2itkimage", path=search)
    sr_reader = shutil.which("tid1500reader", path=search)
    assert seg_reader and sr_reader, "dcmqi is a test dependency (pip install dcmqi)"
    out = tmp_path / "dcmqi"
    out.mkdir()
    seg_cmd = [seg_reader, "--inputDICOM", str(seg_path), "--outputDirectory", str(out)]
    subprocess.run(
        [*seg_cmd, "-t", "nifti", "-p", "seg"], check=True, capture_output=True, timeout=300
    )
    assert list(out.glob("seg*.nii*")), "dcmqi wrote no segment image"
    sr_json = tmp_path / "sr.json"
    subprocess.run(
        [sr_reader, "--inputDICOM", str(sr_path), "--outputMetadata", str(sr_json)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert json.loads(sr_json.read_text())["Measurements"]

    # No patient identifiers in what the node recorded.
    record = json.dumps(job.to_dict(), default=str)
    assert PATIENT_ID not in record and "Endtoend" not in record
