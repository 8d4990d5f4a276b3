"""service.http (Starlette app) and service.node (everything wired, end to end)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from starlette.applications import Starlette

from service.config import Settings
from service.http import Check, create_app
from service.node import Node
from service.store import JobState, JobStore
from tests.conftest import CTSeries, free_port, wait_until
from tests.service.store.test_repository import queued_job
from tests.service.test_receiver import STORESCU, scu_store
from tests.service.test_worker import FakeProcessor

TOKEN = "test-token-9f8e7d6c"


class Client:
    """Calls the ASGI app in process through httpx (Starlette's TestClient wants httpx2)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
                return await client.request(method, url, **kwargs)  # type: ignore[arg-type]

        return anyio.run(go)

    def get(self, url: str, **kwargs: object) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: object) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@dataclass
class StubNode:
    """The API's view of a node, with scripted readiness."""

    store: JobStore
    checks: list[Check] = field(default_factory=list)

    def readiness(self) -> Sequence[Check]:
        return self.checks


@pytest.fixture
def stub(sqlite_store: JobStore) -> StubNode:
    return StubNode(
        sqlite_store, [Check("database", True, "reachable"), Check("engine", True, "pytorch")]
    )


def test_healthz_and_readyz(stub: StubNode) -> None:
    client = Client(create_app(stub))
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "checks": {
            "database": {"ok": True, "detail": "reachable"},
            "engine": {"ok": True, "detail": "pytorch"},
        },
    }
    stub.checks.append(Check("spool_space", False, "12 MB free, floor 1024 MB"))
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["spool_space"]["ok"] is False


def test_jobs_list_detail_and_retry(stub: StubNode) -> None:
    store = stub.store
    job_id = queued_job(store)
    client = Client(create_app(stub))
    (listed,) = client.get("/jobs").json()["jobs"]
    assert listed["id"] == job_id and listed["state"] == "QUEUED"
    assert client.get("/jobs", params={"state": "done"}).json() == {"jobs": []}
    assert client.get("/jobs", params={"state": "nope"}).status_code == 400
    detail = client.get(f"/jobs/{job_id}").json()
    assert detail["series_instance_uid"] == listed["series_instance_uid"]
    assert client.get("/jobs/999999").status_code == 404
    assert client.post(f"/jobs/{job_id}/retry").status_code == 409  # QUEUED: nothing to retry
    store.claim_next_job("w", 30)
    store.fail(job_id, "w", stage="infer", reason="x", retryable=False)
    retried = client.post(f"/jobs/{job_id}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "QUEUED"
    assert client.post("/jobs/999999/retry").status_code == 404
    metrics = client.get("/metrics").text
    assert 'unict_jobs{state="QUEUED"} 1' in metrics


def test_token_guards_jobs_not_health(stub: StubNode) -> None:
    client = Client(create_app(stub, token=TOKEN))
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    denied = client.get("/jobs")
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert client.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/jobs/1/retry").status_code == 401
    ok = client.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


# --------------------------------------------------------------------------- the node


@pytest.fixture
def destination_scp() -> Iterator[tuple[int, list[str]]]:
    """A PACS stand-in that accepts any storage SOP class."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    ae = AE(ae_title="PACS")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(
            str(context.abstract_syntax), [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    yield port, received
    server.shutdown()


def node_settings(tmp_path: Path, pacs_port: int, **http: object) -> Settings:
    return Settings.model_validate(
        {
            "dicom": {"ae_title": "UNICT", "port": 0, "allowed_callers": ["STORESCU"]},
            "assembly": {"quiet_period_s": 3600, "poll_interval_s": 0.05},
            "selection": {"min_slices": 5},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
            ],
            "sender": {"max_attempts": 1, "timeout_s": 5},
            "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_mb": 0},
            "database": {"url": f"sqlite:///{tmp_path / 'var' / 'unict.db'}"},
            "http": {"host": "127.0.0.1", "port": 0, **http},
            "workers": {"count": 1, "poll_interval_s": 0.05, "lease_s": 30},
        }
    )


def test_node_end_to_end(
    tmp_path: Path,
    destination_scp: tuple[int, list[str]],
    ct_series: Callable[..., CTSeries],
) -> None:
    pacs_port, received = destination_scp
    settings = node_settings(tmp_path, pacs_port, token=TOKEN)
    processor = FakeProcessor()
    node = Node(settings, processor, engine_status=lambda: (True, "test double"))
    with node:
        assert node.listener_bound and node.ready
        base = f"http://127.0.0.1:{node.http_port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["ready"] and set(ready["checks"]) == {
            "database",
            "engine",
            "dicom_listener",
            "spool_space",
            "assembler",
            "workers",
        }
        series = ct_series(6, images_in_acquisition=6)
        if STORESCU.exists():  # DCMTK, as a modality would send
            sent = subprocess.run(
                [
                    str(STORESCU),
                    "-aec",
                    "UNICT",
                    "127.0.0.1",
                    str(node.dicom_port),
                    *map(str, series.paths),
                ],
                env={**os.environ, "TCP_NODELAY": "1"},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert sent.returncode == 0, sent.stderr
        else:
            assert scu_store(node.dicom_port, series.datasets) == [0] * 6

        def done() -> dict[str, object] | None:
            jobs = httpx.get(f"{base}/jobs", headers=auth).json()["jobs"]
            return jobs[0] if jobs and jobs[0]["state"] == "DONE" else None

        job = wait_until(done, timeout=20, what="job DONE")
        assert httpx.get(f"{base}/jobs").status_code == 401
        assert job["instance_count"] == 6
        assert {"infer", "send", "process_total"} <= set(job["timings"])
        assert received == ["1.2.840.10008.5.1.4.1.1.88.34"]
        assert len(processor.jobs[0].instance_paths) == 6
    assert not node.listener_bound


def test_node_not_ready_without_engine(tmp_path: Path) -> None:
    node = Node(
        node_settings(tmp_path, free_port()),
        FakeProcessor(),
        engine_status=lambda: (False, "no engine"),
    )
    with node:
        response = httpx.get(f"http://127.0.0.1:{node.http_port}/readyz")
        assert response.status_code == 503
        assert response.json()["checks"]["engine"] == {"ok": False, "detail": "no engine"}
        assert node.store.list_jobs(state=JobState.QUEUED) == []


def test_node_start_failure_cleans_up(tmp_path: Path) -> None:
    first = Node(node_settings(tmp_path / "a", free_port()), FakeProcessor(), lambda: (True, ""))
    with first:
        clash = node_settings(tmp_path / "b", free_port()).model_copy(
            update={"http": first.settings.http.model_copy(update={"port": first.http_port})}
        )
        second = Node(clash, FakeProcessor(), lambda: (True, ""))
        with pytest.raises(RuntimeError, match="HTTP API could not start"):
            second.start()
        assert not second.listener_bound and not second.assembler.is_alive


# --------------------------------------------------------------------------- logs


def test_json_and_plain_logs_carry_context_fields() -> None:
    import io
    import json
    import logging

    from service.config import LoggingSettings
    from service.logs import setup_logging

    root = logging.getLogger()
    saved_level = root.level
    stream = io.StringIO()
    handler = setup_logging(LoggingSettings.model_validate({"level": "info", "json": True}), stream)
    try:
        logging.getLogger("service.worker").info(
            "job %d DONE", 7, extra={"job_id": 7, "series_uid": "1.2.3", "stage": "send"}
        )
        record = json.loads(stream.getvalue().splitlines()[-1])
        assert record["msg"] == "job 7 DONE" and record["level"] == "INFO"
        assert (record["job_id"], record["series_uid"], record["stage"]) == (7, "1.2.3", "send")
        assert logging.getLogger("pynetdicom").level == logging.WARNING
    finally:
        root.removeHandler(handler)
    stream = io.StringIO()
    handler = setup_logging(LoggingSettings(level="DEBUG"), stream)
    try:
        logging.getLogger("service.assembly").debug("closed", extra={"job_id": 3})
        assert stream.getvalue().rstrip().endswith("service.assembly: closed [job_id=3]")
        # pynetdicom never logs below INFO: at DEBUG it dumps identifiers (patient data).
        assert logging.getLogger("pynetdicom").level == logging.INFO
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        logging.getLogger("pynetdicom").setLevel(logging.NOTSET)
