"""STOW-RS into a whole node (real HTTP server, receiver, assembler, job store, workers and
C-STORE sender on loopback; the test-double engine): dicomweb-client as the sender, the
standard response in JSON and XML, the series closed by the request, and every kind of bad
request answered with its status, losing nothing already accepted."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from service.node import Node
from service.store import JobState
from tests.conftest import wait_until
from tests.service.dicomweb.stow_harness import (
    BOUNDARY,
    CLIENT,
    TOKEN,
    TOKEN_ENV,
    multipart,
    part10,
    running_stow_node,
    stow_headers,
    stow_settings,
)
from tests.service.node_harness import Destination, ct_datasets, settled

pytestmark = [pytest.mark.network]

SLICES = 12
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


@pytest.fixture
def pacs() -> Iterator[Destination]:
    destination = Destination().start()
    try:
        yield destination
    finally:
        destination.stop()


@pytest.fixture
def stow_node(tmp_path: Path, token_env: None, pacs: Destination) -> Iterator[tuple[Node, str]]:
    # A quiet period far longer than the tests: only the request itself can close a series.
    with running_stow_node(
        stow_settings(tmp_path, pacs, quiet_period_s=600, max_request_mb=1)
    ) as running:
        yield running


def recorded(node: Node, study_uid: str) -> set[str]:
    jobs = node.store.list_jobs(study_instance_uid=study_uid, limit=100)
    return {i.sop_instance_uid for j in jobs for i in node.store.job_instances(j.id)}


def post(url: str, body: bytes, **headers: str) -> httpx.Response:
    base = stow_headers()
    base.update(headers)
    return httpx.post(f"{url}/studies", content=body, headers=base, timeout=60)


def test_dicomweb_client_stores_a_series_that_the_request_completes(
    stow_node: tuple[Node, str], pacs: Destination
) -> None:
    node, url = stow_node
    study = generate_uid()
    series = ct_datasets(SLICES, study, images_in_acquisition=SLICES)
    client = DICOMwebClient(url, headers={"Authorization": f"Bearer {TOKEN}"})
    response = client.store_instances(series)
    stored = {str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence}
    assert stored == {str(d.SOPInstanceUID) for d in series}
    assert "FailedSOPSequence" not in response
    # Closed by the request (Images in Acquisition reached), not by the 600 s quiet period.
    (job,) = settled(node, study)
    assert job.state is JobState.DONE, (job.error_stage, job.error_reason)
    assert job.instance_count == SLICES
    assert job.to_dict()["calling_ae"] == CLIENT
    assert recorded(node, study) == stored
    classes = sorted(s.sop_class_uid for s in pacs.of_study(study))
    assert classes == ["1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"]


def test_a_series_without_its_count_waits_for_the_quiet_period(
    tmp_path: Path, token_env: None, pacs: Destination
) -> None:
    with running_stow_node(stow_settings(tmp_path, pacs, quiet_period_s=1.0)) as (node, url):
        study = generate_uid()
        series = ct_datasets(SLICES, study)  # no Images in Acquisition
        response = post(url, multipart([part10(d) for d in series]))
        assert response.status_code == 200
        (job,) = settled(node, study)
        assert job.state is JobState.DONE
        assert job.instance_count == SLICES


def test_xml_response_when_asked(stow_node: tuple[Node, str]) -> None:
    _, url = stow_node
    (ds,) = ct_datasets(1, generate_uid())
    response = post(url, multipart([part10(ds)]), Accept="application/dicom+xml")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+xml"
    root = ElementTree.fromstring(response.content)
    values = [v.text for v in root.iter() if v.tag.endswith("Value")]
    assert str(ds.SOPInstanceUID) in values and CT in values
    assert post(url, multipart([part10(ds)]), Accept="text/html").status_code == 406


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x"]
)
def test_unknown_clients_are_refused(
    stow_node: tuple[Node, str], authorization: str | None
) -> None:
    node, url = stow_node
    study = generate_uid()
    headers = stow_headers()
    headers.pop("Authorization")
    if authorization is not None:
        headers["Authorization"] = authorization
    body = multipart([part10(d) for d in ct_datasets(2, study)])
    response = httpx.post(f"{url}/studies", content=body, headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert recorded(node, study) == set()


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        f"multipart/form-data; boundary={BOUNDARY}",
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        'multipart/related; type="application/dicom"',
    ],
)
def test_wrong_content_types_get_415(stow_node: tuple[Node, str], content_type: str) -> None:
    node, url = stow_node
    study = generate_uid()
    body = multipart([part10(d) for d in ct_datasets(2, study)])
    response = post(url, body, **{"Content-Type": content_type})
    assert response.status_code == 415, response.text
    assert "error" in response.json()
    assert recorded(node, study) == set()


def test_a_part_that_is_not_dicom_fails_alone(stow_node: tuple[Node, str]) -> None:
    node, url = stow_node
    study = generate_uid()
    good = ct_datasets(3, study)
    parts: list[bytes | tuple[str, bytes]] = [
        part10(good[0]),
        b"this is not a DICOM file",
        part10(good[1]),
        ("image/jpeg", b"\xff\xd8\xff\xe0 not dicom either"),
        part10(good[2]),
    ]
    response = post(url, multipart(parts))
    assert response.status_code == 202
    ds = Dataset.from_json(response.json())
    assert {str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence} == {
        str(d.SOPInstanceUID) for d in good
    }
    assert [int(i.FailureReason) for i in ds.OtherFailuresSequence] == [0xC000, 0xC000]
    assert "part 2" in response.headers["warning"] and "part 4" in response.headers["warning"]
    assert recorded(node, study) == {str(d.SOPInstanceUID) for d in good}


def test_failure_reasons_name_each_refused_instance(stow_node: tuple[Node, str]) -> None:
    node, url = stow_node
    study = generate_uid()
    good, other_study, mismatch, jpeg = ct_datasets(4, study)
    other_study.StudyInstanceUID = generate_uid()
    sr = Dataset()
    sr.file_meta = mismatch.file_meta
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"  # not a class the node analyses
    sr.SOPInstanceUID = generate_uid()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    # Declared JPEG Baseline (lossy, never accepted): 0xC122.
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    jpeg.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    jpeg["PixelData"].VR = "OB"
    jpeg_part = part10(jpeg)
    response = httpx.post(
        f"{url}/studies/{study}",
        content=multipart([part10(good), part10(other_study), part10(sr), bytes(jpeg_part)]),
        headers=stow_headers(),
        timeout=30,
    )
    assert response.status_code == 202
    ds = Dataset.from_json(response.json())
    assert [str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence] == [
        str(good.SOPInstanceUID)
    ]
    reasons = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in ds.FailedSOPSequence}
    assert reasons == {
        str(other_study.SOPInstanceUID): 0xA900,
        str(sr.SOPInstanceUID): 0x0122,
        str(jpeg.SOPInstanceUID): 0xC122,
    }
    assert recorded(node, study) == {str(good.SOPInstanceUID)}
    # None stored: 409.
    response = httpx.post(
        f"{url}/studies/{study}",
        content=multipart([part10(other_study)]),
        headers=stow_headers(),
        timeout=30,
    )
    assert response.status_code == 409
    assert (
        httpx.post(f"{url}/studies/not-a-uid", content=b"", headers=stow_headers()).status_code
        == 400
    )


def test_malformed_bodies_keep_the_complete_parts(stow_node: tuple[Node, str]) -> None:
    node, url = stow_node
    study = generate_uid()
    series = ct_datasets(3, study)
    complete = multipart([part10(d) for d in series], close=False)
    # Cut inside the third part: the first two are complete and stored.
    cut = complete[: -len(part10(series[2])) // 2]
    response = post(url, cut)
    assert response.status_code == 202, response.text
    ds = Dataset.from_json(response.json())
    assert len(ds.ReferencedSOPSequence) == 2
    assert [int(i.FailureReason) for i in ds.OtherFailuresSequence] == [0xC000]
    assert "malformed multipart body" in response.headers["warning"]
    assert recorded(node, study) == {str(d.SOPInstanceUID) for d in series[:2]}
    # Nothing complete: 400, nothing stored.
    study2 = generate_uid()
    for body in (b"not a multipart body", multipart([part10(ct_datasets(1, study2)[0])])[:200]):
        response = post(url, body)
        assert response.status_code == 400, response.text
    assert post(url, f"--{BOUNDARY}--\r\n".encode()).status_code == 400  # no parts
    assert recorded(node, study2) == set()
    # A resend of the whole series after the break: all three, the two already there as
    # duplicates (nothing lost, nothing doubled).
    response = post(url, multipart([part10(d) for d in series]))
    assert response.status_code == 200
    assert recorded(node, study) == {str(d.SOPInstanceUID) for d in series}


def test_bodies_over_the_limit_get_413(stow_node: tuple[Node, str]) -> None:
    node, url = stow_node  # max_request_mb = 1
    study = generate_uid()
    big = ct_datasets(8, study, rows=128, columns=128)  # 32 KiB each
    small = big[:2]
    # Declared too large: refused before reading.
    body = multipart([part10(d) for d in big]) + b"\0" * (1 << 20)
    response = post(url, body)
    assert response.status_code == 413
    assert recorded(node, study) == set()

    # Streamed without a length: stopped at the limit; the parts before it stay stored.
    def chunks() -> Iterator[bytes]:
        yield multipart([part10(d) for d in small], close=False)
        yield b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 65536

    response = httpx.post(f"{url}/studies", content=chunks(), headers=stow_headers(), timeout=30)
    assert response.status_code == 413
    ds = Dataset.from_json(response.json())
    listed = {str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence}
    assert listed == {str(d.SOPInstanceUID) for d in small}
    assert recorded(node, study) == listed
    assert "max_request_mb" in response.headers["warning"]


def test_a_client_that_drops_mid_body_keeps_its_complete_parts(
    stow_node: tuple[Node, str],
) -> None:
    node, url = stow_node
    study = generate_uid()
    series = ct_datasets(3, study)
    body = multipart([part10(d) for d in series])
    cut = body[: len(body) - len(part10(series[2])) // 2]
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /studies HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in stow_headers().items())
        + "\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + cut)
        # Wait until the two complete parts are recorded, then drop the connection.
        wait_until(lambda: len(recorded(node, study)) == 2, timeout=30, what="two parts")
    # The handler sees the disconnect and drops the incomplete third part's file.
    spool = node.settings.storage.spool_dir
    wait_until(lambda: not list(spool.glob(".stow.*.part")), timeout=10, what="no part file")
    assert recorded(node, study) == {str(d.SOPInstanceUID) for d in series[:2]}
