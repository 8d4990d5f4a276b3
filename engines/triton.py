"""Triton backend: the visual path on an NVIDIA Triton Inference Server, the report here.

Many workers share a few GPU servers: each worker sends the preprocessed volume to Triton
over HTTP (KServe v2 protocol, binary tensor data, through ``tritonclient``) and receives
the graph's four outputs (names and shapes of :mod:`engines.export`). The report is
decoded locally in PyTorch from the ``memory`` output, by the same
:class:`engines.pytorch.ReportGenerator` every backend uses, on the worker's GPU when it
has one, else on its CPU (greedy decoding of the small decoder is cheap: see
:mod:`engines`).

The server's model comes from ``unict-node build-engine --triton-repo DIR``
(:mod:`engines.triton_repository`); its ``config.pbtxt`` records the checkpoint it was
built from, and :meth:`TritonEngine.load` refuses a served model built from other
weights, as the TensorRT backend refuses a plan.

Where the server is
    ``UNICT_TRITON_URL`` (``host:port`` of Triton's HTTP endpoint, port 8000 by default;
    ``http://`` or ``https://`` accepted), ``UNICT_TRITON_MODEL`` (default: the card's
    name, e.g. ``unict-small``). These are read from the environment until the node's
    configuration has a ``triton`` setting; they are not ``UNICT_<SECTION>__<KEY>``
    overrides (no double underscore), so the settings loader ignores them.

Nothing here imports ``tritonclient`` at module import.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engines.base import Availability, Engine, EngineOptions, InferenceResult
from engines.export import INPUT_NAME, OUTPUT_NAMES, check_volume
from engines.pytorch import ReportGenerator, resolve_device
from engines.triton_repository import (
    DATA_TYPE,
    PARAMETER_PREFIX,
    default_model_name,
    identity_parameters,
    parameter_mismatches,
)
from model.bundle import ModelBundle

logger = logging.getLogger(__name__)

URL_ENV = "UNICT_TRITON_URL"
MODEL_ENV = "UNICT_TRITON_MODEL"
INSTALL_HINT = "pip install 'unict-node[triton]'"
#: Triton's wire name of float32 (``TYPE_FP32`` in ``config.pbtxt``).
WIRE_DATATYPE = DATA_TYPE.removeprefix("TYPE_")
#: Seconds to wait for the server when only checking that it is there.
PROBE_TIMEOUT_S = 3.0
#: Identity parameters that must match (a plan's TensorRT version and GPU are the server's
#: business: it refuses to load a plan built for something else).
CHECKED_PARAMETERS = tuple(
    f"{PARAMETER_PREFIX}{key}" for key in ("model_name", "model_version", "checkpoint_sha256")
)


class TritonError(RuntimeError):
    """The Triton server cannot serve this node's model."""


class TritonModelMismatchError(TritonError):
    """The served model was built from another checkpoint, or has another interface."""


def _find_spec(name: str) -> Any:
    """``importlib.util.find_spec`` (a seam for tests): locates a module without importing it."""
    return importlib.util.find_spec(name)


@dataclass(frozen=True)
class ServerAddress:
    """Triton's HTTP endpoint as ``tritonclient.http`` takes it (no scheme) and TLS."""

    url: str
    ssl: bool = False

    @classmethod
    def parse(cls, text: str) -> ServerAddress:
        """``host:port``, ``http://host:port`` or ``https://host:port``.

        Raises
        ------
        ValueError
            On an empty value or another scheme.
        """
        text = text.strip().rstrip("/")
        if not text:
            raise ValueError(f"{URL_ENV} is empty")
        scheme, sep, rest = text.partition("://")
        if not sep:
            return cls(text)
        if scheme not in ("http", "https"):
            raise ValueError(
                f"{URL_ENV}={text!r}: Triton's HTTP endpoint is http:// or https://, not {scheme}://"
            )
        return cls(rest, ssl=scheme == "https")

    def __str__(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{self.url}"


def server_address(env: Mapping[str, str] = os.environ) -> ServerAddress | None:
    """The configured server (``UNICT_TRITON_URL``), or None when unset."""
    value = env.get(URL_ENV, "")
    return ServerAddress.parse(value) if value.strip() else None


def make_client(
    address: ServerAddress, *, connection_timeout: float = 10.0, network_timeout: float = 300.0
) -> Any:
    """A ``tritonclient.http.InferenceServerClient`` for ``address``.

    ``network_timeout`` bounds one inference: a full-size volume on a busy server takes
    seconds, so the default is generous.
    """
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(
        address.url,
        connection_timeout=connection_timeout,
        network_timeout=network_timeout,
        ssl=address.ssl,
    )


def _probe(address: ServerAddress) -> Availability:
    """Whether the server at ``address`` answers live and ready (a seam for tests)."""
    client = make_client(
        address, connection_timeout=PROBE_TIMEOUT_S, network_timeout=PROBE_TIMEOUT_S
    )
    try:
        if not client.is_server_live():
            return Availability(False, f"the Triton server at {address} is not live")
        if not client.is_server_ready():
            return Availability(False, f"the Triton server at {address} is not ready")
    # Refused connection, DNS failure, timeout or an HTTP error: all mean "not usable now",
    # and the reason is reported, not raised.
    except Exception as exc:
        return Availability(
            False, f"the Triton server at {address} is unreachable: {type(exc).__name__}: {exc}"
        )
    finally:
        client.close()
    return Availability(True)


def triton_availability(env: Mapping[str, str] = os.environ) -> Availability:
    """Whether the Triton backend can run: the client package, the URL, the server."""
    missing = [name for name in ("tritonclient", "geventhttpclient") if _find_spec(name) is None]
    if missing:
        return Availability(
            False, f"Python package(s) not installed: {', '.join(missing)} ({INSTALL_HINT})"
        )
    try:
        address = server_address(env)
    except ValueError as exc:
        return Availability(False, str(exc))
    if address is None:
        return Availability(
            False, f"{URL_ENV} is not set (the host:port of the Triton server's HTTP endpoint)"
        )
    return _probe(address)


def build_request(image: npt.NDArray[np.float32]) -> tuple[list[Any], list[Any]]:
    """The ``InferInput`` and ``InferRequestedOutput`` objects of one volume.

    The input is ``volume``, shape ``(1, D, H, W)``, ``FP32``, sent as binary data (the
    JSON form of a 72x128x128 volume would be ten times larger); every output of the
    graph is asked for, as binary data too.
    """
    import tritonclient.http as httpclient

    x = np.ascontiguousarray(image, dtype=np.float32)[None]
    volume = httpclient.InferInput(INPUT_NAME, list(x.shape), WIRE_DATATYPE)
    volume.set_data_from_numpy(x, binary_data=True)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in OUTPUT_NAMES]
    return [volume], outputs


def served_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """The string parameters of a model configuration as Triton's HTTP API returns it."""
    raw = model_config.get("parameters") or {}
    return {
        key: str(value.get("string_value", "")) if isinstance(value, Mapping) else str(value)
        for key, value in raw.items()
    }


def check_served_model(bundle: ModelBundle, model_config: Mapping[str, Any]) -> None:
    """Refuse a served model that is not ``bundle``'s visual path.

    Parameters
    ----------
    bundle
        The local checkpoint (its decoder decodes the server's ``memory``, so both must
        come from the same weights).
    model_config
        ``InferenceServerClient.get_model_config`` of the served model.

    Raises
    ------
    TritonModelMismatchError
        With every reason: other weights, missing identity parameters, missing tensors.
    """
    name = model_config.get("name", "?")
    reasons = parameter_mismatches(
        identity_parameters(bundle), served_parameters(model_config), CHECKED_PARAMETERS
    )
    inputs = {t.get("name") for t in model_config.get("input", [])}
    outputs = {t.get("name") for t in model_config.get("output", [])}
    if INPUT_NAME not in inputs:
        reasons.append(f"no input {INPUT_NAME!r} (has {sorted(n for n in inputs if n)})")
    missing = [n for n in OUTPUT_NAMES if n not in outputs]
    if missing:
        reasons.append(f"no output(s) {missing}")
    if reasons:
        raise TritonModelMismatchError(
            f"refusing Triton model {name!r}: "
            + "; ".join(reasons)
            + " (regenerate it with `unict-node build-engine --triton-repo DIR`)"
        )


class TritonEngine(Engine):
    """UniCT's visual path on a Triton server, the report in PyTorch here.

    Parameters
    ----------
    bundle
        The loaded checkpoint (identity of the served model, and the decoder's weights).
    address
        The server; None reads ``UNICT_TRITON_URL`` at :meth:`load`.
    model_name
        The served model; None reads ``UNICT_TRITON_MODEL``, else the card's name.
    model_version
        Version to ask for; ``""`` lets the server choose (its latest).
    device
        Where the report is decoded: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``.
    network_timeout
        Seconds one inference may take.

    Notes
    -----
    ``tritonclient.http`` clients run on gevent and are not shared between threads: each
    thread that calls :meth:`infer` gets its own.
    """

    name = "triton"

    @classmethod
    def from_options(cls, bundle: ModelBundle, options: EngineOptions) -> TritonEngine:
        return cls(bundle, device=options.device)

    def __init__(
        self,
        bundle: ModelBundle,
        address: ServerAddress | None = None,
        model_name: str | None = None,
        model_version: str = "",
        device: str = "auto",
        network_timeout: float = 300.0,
    ) -> None:
        self.bundle = bundle
        self.address = address
        self.model_name = model_name or os.environ.get(MODEL_ENV) or default_model_name(bundle)
        self.model_version = model_version
        self.device = resolve_device(device)
        self.network_timeout = network_timeout
        self.model_config: dict[str, Any] = {}
        self._report: ReportGenerator | None = None
        self._local = threading.local()
        self._load_lock = threading.Lock()
        self._loaded = False

    @classmethod
    def is_available(cls) -> Availability:
        return triton_availability()

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            assert self.address is not None
            client = make_client(self.address, network_timeout=self.network_timeout)
            self._local.client = client
        return client

    def load(self) -> None:
        with self._load_lock:
            if self._loaded:
                return
            if self.address is None:
                self.address = server_address()
            if self.address is None:
                raise TritonError(f"{URL_ENV} is not set: no Triton server to send inference to")
            from tritonclient.utils import InferenceServerException

            client = self._client()
            try:
                if not client.is_model_ready(self.model_name, self.model_version):
                    raise TritonError(
                        f"model {self.model_name!r} is not ready on the Triton server at "
                        f"{self.address} (is it in the model repository?)"
                    )
                config = client.get_model_config(self.model_name, self.model_version)
            except InferenceServerException as exc:
                raise TritonError(f"Triton server at {self.address}: {exc}") from exc
            check_served_model(self.bundle, config)
            self.model_config = dict(config)
            self._report = ReportGenerator.from_bundle(self.bundle, self.device)
            logger.info(
                "Triton model %s (%s) at %s; report decoded on %s",
                self.model_name,
                config.get("platform") or config.get("backend", "?"),
                self.address,
                self.device,
            )
            self._loaded = True

    def infer(self, image: npt.NDArray[np.float32]) -> InferenceResult:
        self.load()
        assert self._report is not None
        check_volume(image, self.bundle.card.config.preprocess.size)
        from tritonclient.utils import InferenceServerException

        inputs, outputs = build_request(image)
        try:
            response = self._client().infer(
                self.model_name, inputs, model_version=self.model_version, outputs=outputs
            )
        except InferenceServerException as exc:
            raise TritonError(
                f"Triton inference of {self.model_name!r} at {self.address} failed: {exc}"
            ) from exc
        probs, seg, attention, memory = (response.as_numpy(name) for name in OUTPUT_NAMES)
        if any(o is None for o in (probs, seg, attention, memory)):
            raise TritonModelMismatchError(
                f"the Triton response lacks outputs: {[n for n in OUTPUT_NAMES if response.as_numpy(n) is None]}"
            )
        # A copy: the response's arrays are read-only views of the HTTP body, which
        # torch.from_numpy warns about; the memory is small (a few hundred KB).
        tokens, text = self._report.generate(
            torch.from_numpy(np.array(memory, dtype=np.float32)), np.asarray(probs[0])
        )
        return InferenceResult(
            probabilities=np.asarray(probs[0], dtype=np.float32),
            segmentation=np.asarray(seg[0], dtype=np.float32),
            report_tokens=tokens,
            report_text=text,
            fusion_attention=np.asarray(attention[0], dtype=np.float32),
            engine=self.name,
        )
