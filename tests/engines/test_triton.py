"""Triton backend: model repository entries, the client contract, and inference over HTTP.

No Triton server runs here. What is tested instead:

- the repository entry ``build-engine --triton-repo`` writes (layout, and ``config.pbtxt``
  parsed by protobuf into Triton's own ``ModelConfig`` message, shipped in tritonclient);
- the requests the engine builds (tritonclient's ``InferInput`` objects and the HTTP body
  they make) and the availability reasons;
- :class:`engines.triton.TritonEngine` end to end against a stand-in that speaks Triton's
  HTTP protocol (KServe v2 with the binary tensor extension) on loopback and runs the
  generated repository entry's ONNX graph in ONNX Runtime: the engine's results must
  equal the ONNX Runtime engine's bit for bit;
- against a real Triton server only when ``UNICT_TEST_TRITON_URL`` names one that serves
  the repository entry (skipped otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import engines.triton as triton_module
from engines.base import EngineOptions, InferenceResult
from engines.build import add_build_engine_arguments, run_build_engine
from engines.export import INPUT_NAME, OUTPUT_NAMES, ExportedModel, checkpoint_sha256
from engines.onnxruntime import OnnxRuntimeEngine
from engines.registry import BACKENDS, create_engine
from engines.tensorrt import PlanKey, PlanMetadata
from engines.triton import (
    CHECKED_PARAMETERS,
    ServerAddress,
    TritonEngine,
    TritonModelMismatchError,
    check_served_model,
    triton_availability,
)
from engines.triton_repository import (
    CONFIG_FILE,
    PLATFORM_ONNX,
    PLATFORM_TENSORRT,
    RepositoryEntry,
    default_model_name,
    write_onnx_entry,
    write_plan_entry,
)
from model.bundle import ModelBundle
from tests.conftest import free_port

HAS_TRITONCLIENT = importlib.util.find_spec("tritonclient") is not None
needs_tritonclient = pytest.mark.skipif(
    not HAS_TRITONCLIENT, reason="tritonclient is not installed (pip install '.[triton]')"
)
REAL_SERVER_ENV = "UNICT_TEST_TRITON_URL"
THREADS = 2


def triton_model_config_pb2() -> ModuleType:
    """Triton's ``model_config_pb2`` as shipped in tritonclient, without importing grpc.

    ``tritonclient.grpc``'s package needs grpcio, which the HTTP client does not; the
    generated protobuf module itself only needs protobuf, so it is loaded by path.
    """
    if not HAS_TRITONCLIENT:
        pytest.skip("tritonclient is not installed: Triton's ModelConfig schema ships in it")
    spec = importlib.util.find_spec("tritonclient")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_config(path: Path) -> Any:
    """``config.pbtxt`` parsed into Triton's ``ModelConfig`` (fails on any unknown field)."""
    from google.protobuf import text_format

    pb2 = triton_model_config_pb2()
    return text_format.Parse(path.read_text(encoding="utf-8"), pb2.ModelConfig())


def config_as_json(path: Path) -> dict[str, Any]:
    """The model configuration as Triton's HTTP API returns it (protobuf JSON)."""
    from google.protobuf import json_format

    return dict(json_format.MessageToDict(parse_config(path), preserving_proto_field_name=True))


# --------------------------------------------------------------------------- repository


@pytest.fixture(scope="module")
def onnx_entry(
    bundle: ModelBundle, exported: ExportedModel, tmp_path_factory: pytest.TempPathFactory
) -> RepositoryEntry:
    """The ONNX repository entry of the session's export."""
    return write_onnx_entry(tmp_path_factory.mktemp("repo"), bundle, exported, max_batch_size=2)


def test_onnx_entry_has_triton_layout(onnx_entry: RepositoryEntry, exported: ExportedModel) -> None:
    repo = onnx_entry.directory.parent
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    name = onnx_entry.config.name
    assert files == [f"{name}/1/model.onnx", f"{name}/{CONFIG_FILE}"]
    assert onnx_entry.model_path.read_bytes() == exported.path.read_bytes()
    assert not onnx_entry.model_path.is_symlink()  # mounted into a container: a copy


def test_onnx_entry_config_is_a_valid_triton_model_config(
    onnx_entry: RepositoryEntry, bundle: ModelBundle
) -> None:
    config = parse_config(onnx_entry.config_path)
    pb2 = triton_model_config_pb2()
    _, h, w = bundle.card.config.preprocess.size
    labels, d_model = bundle.card.config.num_labels, bundle.card.config.d_model
    assert config.name == default_model_name(bundle) == "unict-small"
    assert config.platform == PLATFORM_ONNX
    assert config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 2
    assert config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.input] == [(INPUT_NAME, [-1, h, w])]
    assert {t.name: list(t.dims) for t in config.output} == {
        "cls_probs": [labels],
        "seg_probs": [labels, -1, h, w],
        "fusion_attention": [3, 3],
        "memory": [-1, d_model],
    }
    assert {t.data_type for t in (*config.input, *config.output)} == {pb2.TYPE_FP32}
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (pb2.ModelInstanceGroup.KIND_GPU, 1)
    ]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["unict_checkpoint_sha256"] == checkpoint_sha256(bundle)
    assert params["unict_model_version"] == bundle.card.version


def test_plan_entry_takes_batch_size_and_identity_from_the_sidecar(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    d, h, w = bundle.card.config.preprocess.size
    plan = tmp_path / "unict-small.plan"
    plan.write_bytes(b"not really a plan")
    key = PlanKey(
        model_name=bundle.card.name,
        model_version=bundle.card.version,
        checkpoint_sha256=checkpoint_sha256(bundle),
        tensorrt_version="10.9.0",
        gpu_name="NVIDIA H200",
        compute_capability="9.0",
        precision="fp16",
    )
    profile = {"min": [1, d, h, w], "opt": [2, d, h, w], "max": [4, d, h, w]}
    metadata = PlanMetadata(key, "0" * 64, 18, profile, 60.0, "2026-01-01T00:00:00+00:00")
    entry = write_plan_entry(
        tmp_path / "repo", bundle, plan, metadata, name="unict-full", version=3
    )
    assert entry.model_path == tmp_path / "repo" / "unict-full" / "3" / "model.plan"
    config = parse_config(entry.config_path)
    assert (config.name, config.platform, config.max_batch_size) == (
        "unict-full",
        PLATFORM_TENSORRT,
        4,
    )
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["unict_tensorrt_version"] == "10.9.0"
    assert params["unict_precision"] == "fp16"
    assert params["unict_gpu"] == "NVIDIA H200 (sm 9.0)"

    other = dataclasses.replace(metadata, key=dataclasses.replace(key, checkpoint_sha256="f" * 64))
    with pytest.raises(ValueError, match="built from checkpoint ffffffffffff"):
        write_plan_entry(tmp_path / "repo", bundle, plan, other)


def test_a_single_volume_model_has_no_dynamic_batching(
    bundle: ModelBundle, exported: ExportedModel, tmp_path: Path
) -> None:
    entry = write_onnx_entry(tmp_path, bundle, exported, instance_kind="KIND_CPU", instance_count=2)
    text = entry.config_path.read_text(encoding="utf-8")
    assert "dynamic_batching" not in text
    assert "kind: KIND_CPU" in text and "count: 2" in text
    with pytest.raises(ValueError, match="model name"):
        write_onnx_entry(tmp_path, bundle, exported, name="../escape")


def test_build_engine_export_only_writes_the_triton_entry(
    bundle: ModelBundle, onnx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_build_engine_arguments(parser)
    args = parser.parse_args(
        [
            "--checkpoint",
            str(bundle.directory),
            "--onnx-dir",
            str(onnx_dir),
            "--export-only",
            "--triton-repo",
            str(tmp_path / "repo"),
            "--triton-model",
            "unict-cpu",
        ]
    )
    assert run_build_engine(args) == 0
    assert f"Triton model: {tmp_path / 'repo' / 'unict-cpu'} (onnxruntime_onnx)" in (
        capsys.readouterr().out
    )
    assert (tmp_path / "repo" / "unict-cpu" / "1" / "model.onnx").is_file()
    assert parse_config(tmp_path / "repo" / "unict-cpu" / CONFIG_FILE).name == "unict-cpu"


# --------------------------------------------------------------------------- client contract


def test_server_address_forms() -> None:
    assert ServerAddress.parse("triton:8000") == ServerAddress("triton:8000")
    assert ServerAddress.parse("http://triton:8000/") == ServerAddress("triton:8000")
    assert ServerAddress.parse("https://triton:8443") == ServerAddress("triton:8443", ssl=True)
    assert str(ServerAddress("triton:8000")) == "http://triton:8000"
    with pytest.raises(ValueError, match="grpc://"):
        ServerAddress.parse("grpc://triton:8001")


def test_unavailable_without_the_client_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_module, "_find_spec", lambda name: None)
    available = triton_availability({"UNICT_TRITON_URL": "triton:8000"})
    assert not available
    assert "tritonclient" in available.reason and "unict-node[triton]" in available.reason


@needs_tritonclient
def test_unavailable_without_a_url_or_a_server() -> None:
    assert "UNICT_TRITON_URL is not set" in triton_availability({}).reason
    assert "grpc://" in triton_availability({"UNICT_TRITON_URL": "grpc://x:1"}).reason
    nobody = f"127.0.0.1:{free_port()}"
    available = triton_availability({"UNICT_TRITON_URL": nobody})
    assert not available
    assert f"Triton server at http://{nobody} is unreachable" in available.reason


def test_registry_knows_triton(bundle: ModelBundle, tmp_path: Path) -> None:
    assert BACKENDS["triton"] is TritonEngine
    engine = create_engine("triton", bundle, EngineOptions(plan_dir=tmp_path, device="cpu"))
    assert isinstance(engine, TritonEngine)
    assert engine.model_name == "unict-small" and str(engine.device) == "cpu"


@needs_tritonclient
def test_request_names_shapes_and_datatypes(volume: npt.NDArray[np.float32]) -> None:
    import tritonclient.http as httpclient

    inputs, outputs = triton_module.build_request(volume)
    assert [(i.name(), i.shape(), i.datatype()) for i in inputs] == [
        (INPUT_NAME, [1, *volume.shape], "FP32")
    ]
    assert [o.name() for o in outputs] == list(OUTPUT_NAMES)
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs
    )
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert header["inputs"] == [
        {
            "name": INPUT_NAME,
            "shape": [1, *volume.shape],
            "datatype": "FP32",
            "parameters": {"binary_data_size": volume.nbytes},
        }
    ]
    assert [(o["name"], o["parameters"]) for o in header["outputs"]] == [
        (name, {"binary_data": True}) for name in OUTPUT_NAMES
    ]
    sent = np.frombuffer(body[header_length:], dtype=np.float32).reshape(volume.shape)
    np.testing.assert_array_equal(sent, volume)


def test_served_model_of_other_weights_is_refused(
    onnx_entry: RepositoryEntry, bundle: ModelBundle
) -> None:
    config = config_as_json(onnx_entry.config_path)
    check_served_model(bundle, config)  # the entry itself is accepted
    config["parameters"]["unict_checkpoint_sha256"] = {"string_value": "0" * 64}
    del config["output"][1]
    with pytest.raises(TritonModelMismatchError) as caught:
        check_served_model(bundle, config)
    message = str(caught.value)
    assert "checkpoint_sha256 is '000" in message and "no output(s) ['seg_probs']" in message
    assert "unict_checkpoint_sha256" in CHECKED_PARAMETERS
    with pytest.raises(TritonModelMismatchError, match="no parameter unict_model_name"):
        check_served_model(bundle, {"name": "x", "input": [], "output": []})


# --------------------------------------------------------------------------- over HTTP


class _KServeStandIn(BaseHTTPRequestHandler):
    """Triton's HTTP/REST protocol (KServe v2, binary tensor extension), for one model.

    Serves ``/v2/health/*``, ``/v2/models/<name>/ready|config|infer`` from a repository
    entry, running its ONNX graph in ONNX Runtime. It is not Triton: only the requests
    :class:`TritonEngine` makes are answered.
    """

    entry: RepositoryEntry
    session: Any
    requests: list[dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _model_path(self) -> str | None:
        prefix = f"/v2/models/{self.entry.config.name}"
        return self.path.removeprefix(prefix) if self.path.startswith(prefix) else None

    def do_GET(self) -> None:
        rest = self._model_path()
        if self.path in ("/v2/health/live", "/v2/health/ready") or rest == "/ready":
            self._send(200)
        elif rest == "/config":
            self._send(200, json.dumps(config_as_json(self.entry.config_path)).encode())
        else:
            self._send(404, json.dumps({"error": f"no {self.path}"}).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self._model_path() != "/infer":
            self._send(404, json.dumps({"error": f"no {self.path}"}).encode())
            return
        length = int(self.headers.get("Inference-Header-Content-Length", len(body)))
        request = json.loads(body[:length])
        self.requests.append(request)
        feeds, offset = {}, length
        for tensor in request["inputs"]:
            size = tensor["parameters"]["binary_data_size"]
            data = np.frombuffer(body[offset : offset + size], dtype=np.float32)
            feeds[tensor["name"]] = data.reshape(tensor["shape"])
            offset += size
        names = [o["name"] for o in request["outputs"]]
        results = self.session.run(names, feeds)
        header: dict[str, Any] = {"model_name": self.entry.config.name, "outputs": []}
        blobs = []
        for name, value in zip(names, results, strict=True):
            blob = np.ascontiguousarray(value, dtype=np.float32).tobytes()
            header["outputs"].append(
                {
                    "name": name,
                    "datatype": "FP32",
                    "shape": list(value.shape),
                    "parameters": {"binary_data_size": len(blob)},
                }
            )
            blobs.append(blob)
        head = json.dumps(header).encode()
        self._send(
            200,
            head + b"".join(blobs),
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(head)),
            },
        )


@pytest.fixture(scope="module")
def stand_in(onnx_entry: RepositoryEntry) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(host:port, received inference requests)`` of a protocol stand-in on loopback."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = onnxruntime.InferenceSession(
        str(onnx_entry.model_path), options, providers=["CPUExecutionProvider"]
    )
    requests: list[dict[str, Any]] = []
    handler = type(
        "Handler",
        (_KServeStandIn,),
        {"entry": onnx_entry, "session": session, "requests": requests},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@needs_tritonclient
def test_engine_over_http_equals_onnxruntime(
    stand_in: tuple[str, list[dict[str, Any]]],
    bundle: ModelBundle,
    volume: npt.NDArray[np.float32],
    ort_engine: OnnxRuntimeEngine,
) -> None:
    url, requests = stand_in
    assert triton_availability({"UNICT_TRITON_URL": url})
    engine = TritonEngine(bundle, ServerAddress.parse(url), device="cpu")
    result = engine.infer(volume)
    expected = ort_engine.infer(volume)
    assert result.engine == "triton"
    assert requests[-1]["inputs"][0]["shape"] == [1, *volume.shape]
    np.testing.assert_array_equal(result.probabilities, expected.probabilities)
    np.testing.assert_array_equal(result.segmentation, expected.segmentation)
    np.testing.assert_array_equal(result.fusion_attention, expected.fusion_attention)
    assert result.report_tokens == expected.report_tokens
    assert result.report_text == expected.report_text


@needs_tritonclient
def test_engine_refuses_a_model_the_server_does_not_have(
    stand_in: tuple[str, list[dict[str, Any]]], bundle: ModelBundle
) -> None:
    engine = TritonEngine(bundle, ServerAddress.parse(stand_in[0]), model_name="unict-other")
    with pytest.raises(triton_module.TritonError, match="'unict-other'"):
        engine.load()


@needs_tritonclient
def test_engine_on_threads_uses_a_client_each(
    stand_in: tuple[str, list[dict[str, Any]]],
    bundle: ModelBundle,
    volume: npt.NDArray[np.float32],
) -> None:
    engine = TritonEngine(bundle, ServerAddress.parse(stand_in[0]), device="cpu")
    results: list[InferenceResult] = []
    clients: list[Any] = []

    def run() -> None:
        results.append(engine.infer(volume))
        clients.append(engine._client())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and clients[0] is not clients[1]
    np.testing.assert_array_equal(results[0].probabilities, results[1].probabilities)


@needs_tritonclient
@pytest.mark.skipif(
    not os.environ.get(REAL_SERVER_ENV),
    reason=f"no Triton server here; set {REAL_SERVER_ENV}=host:8000 to one serving the "
    "entry of `unict-node build-engine --triton-repo`",
)
def test_against_a_real_triton_server(
    bundle: ModelBundle, volume: npt.NDArray[np.float32], reference: InferenceResult
) -> None:
    engine = TritonEngine(bundle, ServerAddress.parse(os.environ[REAL_SERVER_ENV]))
    result = engine.infer(volume)
    # An FP16 plan on the server: the tolerance of the TensorRT parity tests.
    np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=2e-2)
    assert result.segmentation.shape == reference.segmentation.shape
