"""STOW-RS over HTTPS with client certificates: a client allow-listed by its certificate's
CN stores without a token; no certificate (or another CN) is refused; certificates come
from a throw-away CA made with the openssl command line."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.config import HttpSettings, TlsSettings
from service.dicomweb.settings import DicomwebClient, DicomwebSettings
from service.node import Node
from tests.service.dicomweb.stow_harness import multipart, part10, running_stow_node
from tests.service.dicomweb.stow_harness import stow_settings as base_settings
from tests.service.node_harness import ct_datasets

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
]

CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary=unict-test-boundary-7f3a'


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem; server.pem/key for 127.0.0.1; client.pem/key (CN STOWCERT), other.pem/key."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, cn, ext in (
        ("server", "127.0.0.1", ["-extfile", "san.ext"]),
        ("client", "STOWCERT", []),
        ("other", "SOMEONE", []),
    ):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)  # fmt: skip
    return d


@pytest.fixture
def https_node(tmp_path: Path, pki: Path) -> Iterator[tuple[Node, str]]:
    settings = base_settings(tmp_path, None, quiet_period_s=600)
    settings = settings.model_copy(
        update={
            "http": HttpSettings(
                host="127.0.0.1",
                port=0,
                tls=TlsSettings(
                    enabled=True,
                    cert_file=pki / "server.pem",
                    key_file=pki / "server.key",
                    ca_file=pki / "ca.pem",
                ),
            ),
            "dicomweb": DicomwebSettings(
                enabled=True, clients=(DicomwebClient(name="CERTCLIENT", cert_cn="STOWCERT"),)
            ),
        }
    )
    with running_stow_node(settings) as (node, url):
        yield node, url.replace("http://", "https://")


def test_client_certificate_cn_is_the_allow_list(https_node: tuple[Node, str], pki: Path) -> None:
    node, url = https_node
    study = generate_uid()
    (ds,) = ct_datasets(1, study)
    body = multipart([part10(ds)])
    ca = str(pki / "ca.pem")

    def post(cert: tuple[str, str] | None) -> httpx.Response:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(*cert)
        with httpx.Client(verify=context, timeout=30) as client:
            return client.post(
                f"{url}/studies", content=body, headers={"Content-Type": CONTENT_TYPE}
            )

    assert post(None).status_code == 401
    assert post((str(pki / "other.pem"), str(pki / "other.key"))).status_code == 401
    assert node.store.list_jobs(study_instance_uid=study) == []
    response = post((str(pki / "client.pem"), str(pki / "client.key")))
    assert response.status_code == 200, response.text
    stored = Dataset.from_json(response.json()).ReferencedSOPSequence
    assert [str(i.ReferencedSOPInstanceUID) for i in stored] == [str(ds.SOPInstanceUID)]
    (job,) = node.store.list_jobs(study_instance_uid=study)
    assert job.to_dict()["calling_ae"] == "CERTCLIENT"
