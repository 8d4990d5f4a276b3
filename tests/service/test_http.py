"""service.http (Starlette app) and service.node (everything wired, end to end)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.routing import Route

from service.config import Destination, Settings, StorageSettings
from service.http import Check, create_app
from service.metrics import TIMED_STAGES
from service.node import Node
from service.queue import QueueStatus
from service.readiness import WorkerStatus
from service.sender import SendResult
from service.store import JobState, JobStore
from service.worker import ClaimedJob, ProcessOutcome
from tests.conftest import (
    CTSeries,
    FakeClock,
    collect_garbage,
    free_port,
    ignores_pynetdicom_socket_leak,
    wait_until,
)
from tests.service.store.test_repository import queued_job
from tests.service.test_receiver import STORESCU, scu_store
from tests.service.test_worker import FakeProcessor
from tests.tcp_proxy import TcpProxy

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


def test_worker_readiness_names_database_engine_queue_and_spool_space(
    sqlite_store: JobStore, tmp_path: Path
) -> None:
    # What `unict-node worker` serves, before its procrastinate worker runs (the whole
    # process is tested against PostgreSQL in test_worker_http.py).
    queue = QueueStatus("unict")

    def engine() -> tuple[bool, str]:
        raise RuntimeError("boom")

    storage = StorageSettings(spool_dir=tmp_path, results_dir=tmp_path, min_free_mb=1)
    client = Client(create_app(WorkerStatus(sqlite_store, engine, queue.status, storage)))
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == {"ok": True, "detail": "reachable"}
    assert checks["engine"] == {"ok": False, "detail": "engine status failed: boom"}
    assert checks["queue"] == {
        "ok": False,
        "detail": "procrastinate worker not running (queue unict)",
    }
    assert checks["spool_space"]["ok"] is True
    assert list(checks) == ["database", "engine", "queue", "spool_space"]


def test_jobs_list_detail_and_retry(stub: StubNode) -> None:
    store = stub.store
    job_id = queued_job(store)
    client = Client(create_app(stub))
    (listed,) = client.get("/jobs").json()["jobs"]
    assert listed["id"] == job_id and listed["state"] == "QUEUED"
    assert client.get("/jobs", params={"state": "done"}).json() == {
        "jobs": [],
        "total": 0,
        "limit": 100,
        "offset": 0,
        "next_offset": None,
    }
    assert client.get("/jobs", params={"state": "nope"}).status_code == 400
    detail = client.get(f"/jobs/{job_id}").json()
    assert detail["series_instance_uid"] == listed["series_instance_uid"]
    assert client.get("/jobs/999999").status_code == 404
    assert client.get(f"/jobs/{2**70}").status_code == 404  # beyond the database's integers
    assert client.post(f"/jobs/{job_id}/retry").status_code == 409  # QUEUED: nothing to retry
    store.claim_next_job("w", 30)
    store.fail(job_id, "w", stage="infer", reason="x", retryable=False)
    retried = client.post(f"/jobs/{job_id}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "QUEUED"
    assert client.post("/jobs/999999/retry").status_code == 404
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'unict_jobs{state="QUEUED"} 1.0' in metrics.text


def test_jobs_filters_and_paging(stub: StubNode, clock: FakeClock) -> None:
    store = stub.store
    first = queued_job(store, 1)
    clock.advance(86400)
    second, third = queued_job(store, 1), queued_job(store, 1)
    client = Client(create_app(stub))

    def ids(**params: object) -> list[int]:
        response = client.get("/jobs", params=params)
        assert response.status_code == 200, response.text
        return [j["id"] for j in response.json()["jobs"]]

    assert ids(since="2025-01-02") == [third, second]  # a date alone: its midnight, UTC
    assert ids(until="2025-01-01T13:00:00+00:00") == [first]
    assert ids(since="2025-01-01T13:00:00+01:00", until="2025-01-02T12:00Z") == [first]
    assert ids(state="queued", since="2025-01-02T12:00:00") == [third, second]
    job = store.get_job(first)
    assert job is not None
    assert ids(study_uid=job.study_instance_uid) == [third, second, first]  # one study
    assert ids(study_uid="1.9.9") == []
    page = client.get("/jobs", params={"limit": 2}).json()
    assert ([j["id"] for j in page["jobs"]], page["total"], page["next_offset"]) == (
        [third, second],
        3,
        2,
    )
    page = client.get("/jobs", params={"limit": 2, "offset": page["next_offset"]}).json()
    assert ([j["id"] for j in page["jobs"]], page["next_offset"]) == ([first], None)
    for bad in (
        {"since": "yesterday"},
        {"until": "2025-13-01"},
        {"study_uid": "1.2.x"},
        {"limit": "1001"},
        {"limit": "-1"},
        {"offset": "x"},
        {"offset": str(2**40)},
    ):
        response = client.get("/jobs", params=bad)
        assert response.status_code == 400 and response.json()["error"], bad


def test_job_detail_shows_stages_error_and_destinations(stub: StubNode) -> None:
    store = stub.store
    job_id = queued_job(store)
    store.claim_next_job("w", 30)
    store.mark_sending(job_id, "w", {"load": 0.5, "preprocess": 1.0, "infer": 2.0})
    sent = [
        SendResult("pacs", "1.2.3.1", "1.2.840.10008.5.1.4.1.1.66.4", True, 0, "stored", 1),
        SendResult("pacs", "1.2.3.2", "1.2.840.10008.5.1.4.1.1.88.34", False, None, "refused", 3),
    ]
    store.fail(
        job_id,
        "w",
        stage="send",
        reason="association refused by PACS",
        retryable=False,
        timings={"send": 0.25},
        sent=[r.to_json() for r in sent],
    )
    pacs = Destination(name="pacs", ae_title="PACS", host="10.0.0.5", port=104)
    client = Client(create_app(stub, destinations=[pacs]))
    detail = client.get(f"/jobs/{job_id}").json()
    assert detail["state"] == "FAILED"
    assert detail["error"] == {"stage": "send", "reason": "association refused by PACS"}
    assert [(s["stage"], s["status"], s["seconds"]) for s in detail["stages"]] == [
        ("load", "done", 0.5),
        ("preprocess", "done", 1.0),
        ("infer", "done", 2.0),
        ("postprocess", "not run", None),
        ("encode", "not run", None),
        ("send", "failed", 0.25),
    ]
    (destination,) = detail["destinations"]
    assert destination["name"] == "pacs" and destination["address"] == "PACS@10.0.0.5:104"
    assert (destination["stored"], destination["failed"]) == (1, 1)
    assert [i["sop_instance_uid"] for i in destination["instances"]] == ["1.2.3.1", "1.2.3.2"]


def test_openapi_describes_every_route(stub: StubNode) -> None:
    app = create_app(stub)
    client = Client(app)
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    described = {(path, method.upper()) for path, ops in schema["paths"].items() for method in ops}
    served = {
        (route.path.replace(":int", ""), method)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"
    }
    assert described == served


def test_token_guards_jobs_not_health(stub: StubNode) -> None:
    client = Client(create_app(stub, token=TOKEN))
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    denied = client.get("/jobs")
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert client.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/jobs/1/retry").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/openapi.json").status_code == 401
    ok = client.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


# --------------------------------------------------------------------------- the node


def start_pacs(port: int) -> tuple[ThreadedAssociationServer, list[str]]:
    """A PACS stand-in on `port` that accepts any storage SOP class; returns the server
    and the SOP classes it stored."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    ae = AE(ae_title="PACS")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(
            str(context.abstract_syntax), [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    return server, received


@pytest.fixture
def destination_scp() -> Iterator[tuple[int, list[str]]]:
    """A PACS stand-in that accepts any storage SOP class."""
    port = free_port()
    server, received = start_pacs(port)
    yield port, received
    server.shutdown()


def node_settings(
    tmp_path: Path,
    pacs_port: int,
    *,
    database_url: str | None = None,
    max_attempts: int = 3,
    **http: object,
) -> Settings:
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
            "database": {"url": database_url or f"sqlite:///{tmp_path / 'var' / 'unict.db'}"},
            "http": {"host": "127.0.0.1", "port": 0, **http},
            "workers": {
                "count": 1,
                "poll_interval_s": 0.05,
                "lease_s": 30,
                "max_attempts": max_attempts,
            },
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


# --------------------------------------------------------------------------- over real HTTP

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"


class StagedProcessor:
    """Test double for the pipeline that reports a time for each of its five stages."""

    def __init__(self) -> None:
        self.jobs: list[ClaimedJob] = []

    def __call__(self, job: ClaimedJob) -> ProcessOutcome:
        self.jobs.append(job)
        output = Dataset()
        output.SOPClassUID = SR_STORAGE
        output.SOPInstanceUID = generate_uid()
        timings = {stage.value: 0.01 * (i + 1) for i, stage in enumerate(TIMED_STAGES[:-1])}
        return ProcessOutcome(outputs=(output,), timings=timings)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str) -> Samples:
    """Every sample of ``/metrics``, parsed by prometheus_client's own parser (which fails
    on anything not in the text format)."""
    response = httpx.get(f"{base}/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def wait_readiness(base: str, ready: bool, timeout: float = 20) -> dict[str, Any]:
    """Poll ``/readyz`` until it answers 200 (`ready`) or 503; return its body."""

    def answer() -> dict[str, Any] | None:
        response = httpx.get(f"{base}/readyz", timeout=10)
        body: dict[str, Any] = response.json()
        return body if response.status_code == (200 if ready else 503) else None

    return cast(dict[str, Any], wait_until(answer, timeout=timeout, what=f"/readyz ready={ready}"))


def send_series(port: int, series: CTSeries) -> None:
    """C-STORE a series to the node: with DCMTK's storescu, as a modality would, if there."""
    if STORESCU.exists():
        sent = subprocess.run(
            [str(STORESCU), "-aec", "UNICT", "127.0.0.1", str(port), *map(str, series.paths)],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
    else:
        assert scu_store(port, series.datasets) == [0] * len(series.datasets)


def job_in(base: str, job_id: int, state: str, timeout: float = 20) -> dict[str, Any]:
    """Poll ``/jobs/{id}`` until the job is in `state`; return its detail."""

    def detail() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(f"{base}/jobs/{job_id}", headers=AUTH).json()
        return body if body["state"] == state else None

    return cast(dict[str, Any], wait_until(detail, timeout=timeout, what=f"job {state}"))


def only_job(base: str) -> dict[str, Any]:
    """The one job of the node, once it left RECEIVING."""

    def listed() -> dict[str, Any] | None:
        jobs = httpx.get(f"{base}/jobs", headers=AUTH).json()["jobs"]
        return jobs[0] if len(jobs) == 1 and jobs[0]["state"] != "RECEIVING" else None

    return cast(dict[str, Any], wait_until(listed, timeout=20, what="a job"))


def refused_association(port: int) -> bool:
    """Try to associate with a calling AE title the node does not know."""
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="UNICT")
    if assoc.is_established:
        assoc.release()
    return bool(assoc.is_rejected)


@pytest.mark.network
def test_every_endpoint_but_health_refuses_a_request_without_the_token(tmp_path: Path) -> None:
    node = Node(
        node_settings(tmp_path, free_port(), token=TOKEN),
        StagedProcessor(),
        engine_status=lambda: (True, "test double"),
    )
    with node:
        base = f"http://127.0.0.1:{node.http_port}"
        wait_readiness(base, ready=True)
        assert httpx.get(f"{base}/healthz").status_code == 200
        guarded = [
            ("GET", "/metrics"),
            ("GET", "/jobs"),
            ("GET", "/jobs/1"),
            ("POST", "/jobs/1/retry"),
            ("GET", "/openapi.json"),
        ]
        for method, path in guarded:
            for headers in (
                {},
                {"Authorization": "Bearer not-the-token"},
                {"Authorization": TOKEN},
            ):
                response = httpx.request(method, f"{base}{path}", headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
            allowed = httpx.request(method, f"{base}{path}", headers=AUTH)
            assert allowed.status_code in (200, 404), (method, path)


@pytest.mark.network
def test_readiness_follows_the_spool_floor(tmp_path: Path) -> None:
    node = Node(
        node_settings(tmp_path, free_port()), StagedProcessor(), lambda: (True, "test double")
    )
    with node:
        base = f"http://127.0.0.1:{node.http_port}"
        wait_readiness(base, ready=True)
        free_mb = shutil.disk_usage(node.settings.storage.spool_dir).free // 2**20
        original = node.settings
        # The floor is read at each check: raise it above what the disk has, as if the
        # spool had filled up, then put it back.
        above = original.storage.model_copy(update={"min_free_mb": free_mb + 10**6})
        node.settings = original.model_copy(update={"storage": above})
        body = wait_readiness(base, ready=False)
        assert body["checks"]["spool_space"]["ok"] is False
        assert f"floor {free_mb + 10**6} MB" in body["checks"]["spool_space"]["detail"]
        assert all(c["ok"] for name, c in body["checks"].items() if name != "spool_space")
        node.settings = original
        body = wait_readiness(base, ready=True)
        assert body["checks"]["spool_space"]["ok"] is True


@pytest.mark.network
@pytest.mark.postgres
def test_readiness_follows_the_database(tmp_path: Path, postgres_url: str) -> None:
    """The node reaches PostgreSQL through a proxy; cutting it makes the database
    unreachable (connections dropped, new ones refused) until it is restored."""
    url = make_url(postgres_url)
    with TcpProxy((url.host or "127.0.0.1", url.port or 5432)) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        node = Node(
            node_settings(tmp_path, free_port(), database_url=proxied, token=TOKEN),
            StagedProcessor(),
            lambda: (True, "test double"),
        )
        with node:
            base = f"http://127.0.0.1:{node.http_port}"
            wait_readiness(base, ready=True)
            assert scrape(base)[("unict_job_store_up", ())] == 1
            proxy.cut()
            body = wait_readiness(base, ready=False)
            assert body["checks"]["database"]["ok"] is False
            assert body["checks"]["database"]["detail"].startswith("unreachable")
            assert body["checks"]["dicom_listener"]["ok"] is True
            down = httpx.get(f"{base}/jobs", headers=AUTH)
            assert down.status_code == 503 and "unreachable" in down.json()["error"]
            assert scrape(base)[("unict_job_store_up", ())] == 0  # /metrics still answers
            proxy.restore()
            body = wait_readiness(base, ready=True)
            assert body["checks"]["database"] == {"ok": True, "detail": "reachable"}
            assert httpx.get(f"{base}/jobs", headers=AUTH).status_code == 200


@pytest.mark.network
def test_metrics_move_with_an_end_to_end_run(
    tmp_path: Path,
    destination_scp: tuple[int, list[str]],
    ct_series: Callable[..., CTSeries],
) -> None:
    pacs_port, received = destination_scp
    node = Node(
        node_settings(tmp_path, pacs_port, token=TOKEN),
        StagedProcessor(),
        lambda: (True, "test double"),
    )
    with node:
        base = f"http://127.0.0.1:{node.http_port}"
        wait_readiness(base, ready=True)
        before = scrape(base)
        assert before[("unict_instances_received_total", ())] == 0
        assert before[("unict_jobs", (("state", "DONE"),))] == 0

        assert refused_association(node.dicom_port)
        series = ct_series(6, images_in_acquisition=6)
        send_series(node.dicom_port, series)
        job = only_job(base)
        job = job_in(base, job["id"], "DONE")
        after = scrape(base)

        spooled = sum(i.size for i in node.store.job_instances(job["id"]))
        assert after[("unict_instances_received_total", ())] == 6
        assert after[("unict_received_bytes_total", ())] == spooled > 0
        assert after[("unict_associations_refused_total", (("reason", "calling_ae"),))] == 1
        for stage in TIMED_STAGES:
            labels = (("stage", stage.value),)
            assert before[("unict_stage_seconds_count", labels)] == 0
            assert after[("unict_stage_seconds_count", labels)] == 1, stage
            assert after[("unict_stage_seconds_sum", labels)] > 0
            assert after[("unict_stage_seconds_bucket", (("le", "+Inf"), *labels))] == 1
        assert after[("unict_jobs", (("state", "DONE"),))] == 1
        assert after[("unict_queue_depth", ())] == 0
        assert not any(name == "unict_send_failures_total" for name, _ in after)
        assert received == [SR_STORAGE]


@pytest.mark.network
@ignores_pynetdicom_socket_leak
def test_retry_reruns_a_failed_job_to_done_once_the_pacs_is_back(
    tmp_path: Path, ct_series: Callable[..., CTSeries]
) -> None:
    pacs_port = free_port()  # nothing listens there yet: the PACS is down
    node = Node(
        node_settings(tmp_path, pacs_port, max_attempts=1, token=TOKEN),
        StagedProcessor(),
        lambda: (True, "test double"),
    )
    with node:
        base = f"http://127.0.0.1:{node.http_port}"
        wait_readiness(base, ready=True)
        send_series(node.dicom_port, ct_series(6, images_in_acquisition=6))
        job_id = only_job(base)["id"]
        failed = job_in(base, job_id, "FAILED")
        collect_garbage()
        assert failed["error"]["stage"] == "send" and failed["error_stage"] == "send"
        (pacs,) = failed["destinations"]
        assert (pacs["name"], pacs["address"]) == ("pacs", f"PACS@127.0.0.1:{pacs_port}")
        assert (pacs["stored"], pacs["failed"]) == (0, 1)
        assert scrape(base)[("unict_send_failures_total", (("destination", "pacs"),))] == 1

        server, received = start_pacs(pacs_port)
        try:
            retried = httpx.post(f"{base}/jobs/{job_id}/retry", headers=AUTH)
            assert retried.status_code == 200 and retried.json()["state"] == "QUEUED"
            done = job_in(base, job_id, "DONE")
        finally:
            server.shutdown()
        assert done["error"] is None and received == [SR_STORAGE]
        assert done["destinations"][0]["stored"] == 1
        assert [s["status"] for s in done["stages"]] == ["done"] * 6
        again = httpx.post(f"{base}/jobs/{job_id}/retry")
        assert again.status_code == 401  # the token guards the retry too
        metrics = scrape(base)
        assert metrics[("unict_jobs", (("state", "DONE"),))] == 1
        assert metrics[("unict_stage_seconds_count", (("stage", "send"),))] == 2


@pytest.mark.network
@ignores_pynetdicom_socket_leak
def test_logs_of_an_end_to_end_run_hold_no_patient_identifiers(
    tmp_path: Path, ct_series: Callable[..., CTSeries]
) -> None:
    """The node's own logging, at DEBUG (the most it ever says), through a run that
    receives, refuses an association, fails to send, is retried and succeeds."""
    from service.config import LoggingSettings
    from service.logs import setup_logging

    root, pynetdicom_logger = logging.getLogger(), logging.getLogger("pynetdicom")
    saved = (root.level, pynetdicom_logger.level)
    stream = io.StringIO()
    handler = setup_logging(
        LoggingSettings.model_validate({"level": "DEBUG", "json": True}), stream
    )
    pacs_port = free_port()
    try:
        node = Node(
            node_settings(tmp_path, pacs_port, max_attempts=1, token=TOKEN),
            StagedProcessor(),
            lambda: (True, "test double"),
        )
        series = ct_series(6, images_in_acquisition=6)
        with node:
            base = f"http://127.0.0.1:{node.http_port}"
            wait_readiness(base, ready=True)
            assert refused_association(node.dicom_port)
            send_series(node.dicom_port, series)
            job_id = only_job(base)["id"]
            job_in(base, job_id, "FAILED")
            collect_garbage()
            server, _ = start_pacs(pacs_port)
            try:
                assert httpx.post(f"{base}/jobs/{job_id}/retry", headers=AUTH).status_code == 200
                job_in(base, job_id, "DONE")
            finally:
                server.shutdown()
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        pynetdicom_logger.setLevel(saved[1])
    log = stream.getvalue()
    records = [json.loads(line) for line in log.splitlines()]
    # The scan is not vacuous: the run is in the log, with its context fields.
    assert len(records) > 20
    assert any(r.get("job_id") == job_id and r.get("stage") == "send" for r in records)
    assert series.series_uid in log and "DONE" in log
    patient = series.datasets[0]
    birth = str(patient.PatientBirthDate)
    identifiers = {
        str(patient.PatientName),  # Phantom^Test
        str(patient.PatientName).replace("^", " "),
        str(patient.PatientName).split("^")[0],
        str(patient.PatientID),
        birth,
        f"{birth[:4]}-{birth[4:6]}-{birth[6:]}",
    }
    for identifier in identifiers:
        assert identifier.lower() not in log.lower(), identifier


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


def test_setup_logging_after_the_cli_basic_config_prints_each_line_once() -> None:
    """`unict-node serve|worker` call basicConfig early, then setup_logging: one line an event."""
    import io
    import logging

    from service.config import LoggingSettings
    from service.logs import setup_logging

    root = logging.getLogger()
    early = io.StringIO()
    # What basicConfig installs in a fresh process (here pytest's handlers make it a no-op).
    basic = logging.StreamHandler(early)
    root.addHandler(basic)
    added = [basic]
    out = io.StringIO()
    handler = setup_logging(LoggingSettings(level="INFO"), stream=out)
    try:
        logging.getLogger("service.test").info("job %d: done", 7)
        assert out.getvalue().count("job 7: done") == 1
        assert early.getvalue() == ""
        assert not any(h in root.handlers for h in added)
    finally:
        root.removeHandler(handler)
