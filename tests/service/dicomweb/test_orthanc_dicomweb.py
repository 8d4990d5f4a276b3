"""DICOMweb both ways with a real Orthanc and its DICOMweb plugin, nothing mocked.

- The acceptance path: Orthanc's DICOMweb client STOWs a study to the node
  (``DicomWeb.Servers`` names the node; ``POST /dicom-web/servers/unict/stow``); the node
  analyses it (its real pipeline on the test-double engine) and stores SEG + SR + a key
  image into Orthanc by STOW-RS (a ``type: dicomweb`` destination), read back with QIDO-RS
  and WADO-RS.
- The STOW-RS sender alone: per-instance results, no retry of a refusal (bad password),
  retries while the server is down.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from service.config import HttpSettings, OutputsSettings, ScOutputSettings, SenderSettings
from service.dicomweb.settings import DicomwebDestination
from service.pipeline import OutputOptions
from service.sender import Sender, SendFailure
from service.store import JobState
from tests.conftest import free_port, wait_until
from tests.orthanc import PASSWORD, USER, OrthancServer, orthanc_server
from tests.service.dicomweb.stow_harness import (
    CLIENT,
    TOKEN,
    TOKEN_ENV,
    running_stow_node,
    stow_settings,
)
from tests.service.node_harness import PipelineProcessor, ct_datasets, settled

pytestmark = [pytest.mark.orthanc, pytest.mark.network, pytest.mark.slow]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"
PASSWORD_ENV = "UNICT_TEST_ORTHANC_PASSWORD"
SLICES = 14


def orthanc_destination(server: OrthancServer, **options: object) -> DicomwebDestination:
    return DicomwebDestination.model_validate(
        {
            "type": "dicomweb",
            "name": "orthanc-web",
            "url": f"{server.url}/dicom-web",
            "username": USER,
            "password_env": PASSWORD_ENV,
            **options,
        }
    )


def dicomweb_reader(server: OrthancServer) -> DICOMwebClient:
    session_auth = httpx.BasicAuth(USER, PASSWORD)  # only to build the header below
    request = httpx.Request("GET", server.url)
    header = next(session_auth.auth_flow(request)).headers["Authorization"]
    return DICOMwebClient(f"{server.url}/dicom-web", headers={"Authorization": header})


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


@pytest.fixture
def node_http_port() -> int:
    return free_port()


@pytest.fixture
def orthanc_web(tmp_path: Path, node_http_port: int) -> Iterator[OrthancServer]:
    with orthanc_server(
        tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        modalities={},
        dicomweb_servers={
            "unict": {
                "Url": f"http://127.0.0.1:{node_http_port}/",
                "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
            }
        },
    ) as server:
        yield server


def test_a_study_stowed_by_orthanc_comes_back_as_seg_sr_and_key_image_over_stow(
    tmp_path: Path, env: None, orthanc_web: OrthancServer, node_http_port: int
) -> None:
    server = orthanc_web
    study = generate_uid()
    series = ct_datasets(SLICES, study, images_in_acquisition=SLICES)
    for ds in series:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        server.client.upload(buffer.getvalue())
    (orthanc_study,) = server.client.lookup(study, filter="Study")

    settings = stow_settings(tmp_path / "node", None, quiet_period_s=600)
    settings = settings.model_copy(
        update={
            "http": HttpSettings(host="127.0.0.1", port=node_http_port),
            "destinations": (orthanc_destination(server),),
            "sender": SenderSettings(max_attempts=2, backoff_s=0.1, timeout_s=30),
        }
    )
    processor = PipelineProcessor()
    processor.options = OutputOptions(
        OutputsSettings(sc=ScOutputSettings(enabled=True, max_images=1))
    )
    with running_stow_node(settings, processor) as (node, _):
        response = httpx.post(
            f"{server.url}/dicom-web/servers/unict/stow",
            json={"Resources": [orthanc_study]},
            auth=(USER, PASSWORD),
            timeout=120,
        )
        assert response.status_code == 200, (response.text, server.log_tail())
        # The request carried the whole series (Images in Acquisition): closed at once,
        # not after the 600 s quiet period.
        (job,) = settled(node, study)
    assert job.state is JobState.DONE, (job.error_stage, job.error_reason)
    assert job.instance_count == SLICES
    assert job.to_dict()["calling_ae"] == CLIENT
    sent = job.outputs["sent"]
    assert sorted(s["sop_class_uid"] for s in sent) == sorted([SEG, SR, SC])
    assert all(s["ok"] and s["destination"] == "orthanc-web" for s in sent)

    # Read back over DICOMweb: QIDO-RS finds the SEG and SR series in the CT's study,
    # WADO-RS returns the instances the job says it sent.
    reader = dicomweb_reader(server)
    found = reader.search_for_series(study)
    modalities = sorted(str(s["00080060"]["Value"][0]) for s in found)
    assert modalities == ["CT", "OT", "SEG", "SR"]
    for result in sent:
        instances = reader.search_for_instances(
            study, search_filters={"SOPInstanceUID": result["sop_instance_uid"]}
        )
        (instance,) = instances
        series_uid = str(instance["0020000E"]["Value"][0])
        ds = reader.retrieve_instance(study, series_uid, result["sop_instance_uid"])
        assert str(ds.SOPClassUID) == result["sop_class_uid"]
        assert str(ds.StudyInstanceUID) == study
    seg_uid = next(s["sop_instance_uid"] for s in sent if s["sop_class_uid"] == SEG)
    seg_series = next(
        str(s["0020000E"]["Value"][0]) for s in found if s["00080060"]["Value"][0] == "SEG"
    )
    seg = reader.retrieve_instance(study, seg_series, seg_uid)
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    assert referenced == {str(d.SOPInstanceUID) for d in series}


def test_stow_sender_results_refusals_and_retries(
    tmp_path: Path, env: None, orthanc_web: OrthancServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = orthanc_web
    study = generate_uid()
    outputs = ct_datasets(3, study)
    waits: list[float] = []
    sender = Sender(
        [orthanc_destination(server, max_instances_per_request=2)],
        SenderSettings(max_attempts=3, backoff_s=0.5, timeout_s=30),
        calling_ae="UNICT",
        sleep=waits.append,
    )
    results = sender.send(outputs)
    assert [r.ok for r in results] == [True, True, True]
    assert [r.sop_instance_uid for r in results] == [str(d.SOPInstanceUID) for d in outputs]
    assert all(r.status == 0 and r.attempts == 1 for r in results)
    assert waits == []
    found = dicomweb_reader(server).search_for_instances(study)
    assert len(found) == 3

    # A wrong password is a refusal: 0x0124, not retried.
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with pytest.raises(SendFailure) as info:
        sender.send(ct_datasets(1, study))
    assert not info.value.retryable
    (result,) = info.value.results
    assert result.status == 0x0124 and result.attempts == 1 and "401" in result.detail
    assert waits == []

    # Nobody listening: no status, retried with backoff, then a retryable failure.
    down = Sender(
        [orthanc_destination(server, url=f"http://127.0.0.1:{free_port()}/dicom-web")],
        SenderSettings(max_attempts=3, backoff_s=0.5, timeout_s=5),
        calling_ae="UNICT",
        sleep=waits.append,
    )
    with pytest.raises(SendFailure) as info:
        down.send(ct_datasets(1, study))
    assert info.value.retryable
    (result,) = info.value.results
    assert result.status is None and result.attempts == 3
    assert waits == [0.5, 1.0]
    wait_until(lambda: True)
