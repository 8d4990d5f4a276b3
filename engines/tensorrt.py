"""TensorRT backend: a serialized plan of the visual path, run on PyTorch's CUDA tensors.

Plans are built offline by ``unict-node build-engine`` (:mod:`engines.build`) and kept in
the configured plan folder (``model.plan_dir``, out of git). A plan only runs on the
TensorRT version and GPU model it was built with, and is only right for the weights it
was built from, so each plan carries that identity twice:

- in its file name, ``unict-<model>-<version>-<sha12>-<precision>-trt<version>-<gpu>-sm<cc>.plan``,
  so a folder of plans for several machines reads at a glance;
- in a JSON sidecar next to it (same stem, ``.json``): :class:`PlanMetadata`, with the
  plan's own SHA-256.

:meth:`TensorRTEngine.load` computes the :class:`PlanKey` it needs (model card, checkpoint
hash, installed TensorRT, this GPU, precision) and refuses any plan whose sidecar says
otherwise, with the reason (:class:`PlanMismatchError`). The checks are plain Python on
the sidecar (:func:`plan_mismatches`, :func:`find_plan`) and are tested without TensorRT.

At run time the input, the outputs and TensorRT's own activations live on the GPU:
PyTorch allocates the tensors, their ``data_ptr()`` are bound with
``IExecutionContext.set_tensor_address``, ``execute_async_v3`` runs on a CUDA stream of
the calling worker thread, and the report is decoded in PyTorch on the same device and
stream from the ``memory`` output. Results come back to the host once, at the end.

Nothing here imports ``tensorrt`` at module import: :meth:`TensorRTEngine.is_available`
only locates the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engines.base import Availability, Engine, EngineOptions, InferenceResult
from engines.export import INPUT_NAME, OUTPUT_NAMES, check_volume, checkpoint_sha256
from engines.pytorch import ReportGenerator
from model.bundle import ModelBundle

logger = logging.getLogger(__name__)

#: Precisions a plan can be built in.
PRECISIONS = ("fp32", "fp16", "int8")
#: Version of the sidecar's layout.
METADATA_FORMAT = 1
PLAN_SUFFIX = ".plan"
SIDECAR_SUFFIX = ".json"
INSTALL_HINT = "pip install 'unict-node[gpu]'"


class PlanError(RuntimeError):
    """A TensorRT plan cannot be used."""


class PlanMismatchError(PlanError):
    """A plan exists but was built for another model, TensorRT version, GPU or precision."""


class PlanNotFoundError(PlanError, FileNotFoundError):
    """No plan for this model in the plan folder."""


def _find_spec(name: str) -> Any:
    """``importlib.util.find_spec`` (a seam for tests): locates a module without importing it."""
    return importlib.util.find_spec(name)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


@dataclass(frozen=True)
class PlanKey:
    """What a plan must have been built for to be usable here.

    Attributes
    ----------
    model_name, model_version
        From the model card.
    checkpoint_sha256
        The weights (see :func:`engines.export.checkpoint_sha256`).
    tensorrt_version
        ``tensorrt.__version__`` of the builder.
    gpu_name
        ``torch.cuda.get_device_name`` of the builder's GPU.
    compute_capability
        ``"major.minor"`` of that GPU.
    precision
        ``"fp32"``, ``"fp16"`` or ``"int8"``.
    """

    model_name: str
    model_version: str
    checkpoint_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")

    @property
    def platform_stem(self) -> str:
        """``trt<version>-<gpu>-sm<cc>``: the part of the name that ties a plan to a machine."""
        cc = self.compute_capability.replace(".", "")
        return f"trt{_slug(self.tensorrt_version)}-{_slug(self.gpu_name)}-sm{cc}"

    @property
    def stem(self) -> str:
        """File name of the plan without suffix; every identity field is in it."""
        model = _slug(self.model_name).removeprefix("unict-")
        return (
            f"unict-{model}-{_slug(self.model_version)}-{self.checkpoint_sha256[:12]}-"
            f"{self.precision}-{self.platform_stem}"
        )

    def plan_path(self, plan_dir: Path) -> Path:
        """Where the plan for this key lives in ``plan_dir``."""
        return Path(plan_dir) / f"{self.stem}{PLAN_SUFFIX}"


@dataclass(frozen=True)
class PlanMetadata:
    """The JSON sidecar of a plan: its :class:`PlanKey` and how it was built.

    Attributes
    ----------
    key
        What the plan was built for.
    plan_sha256
        SHA-256 of the plan file (catches a plan replaced without its sidecar).
    opset
        Opset of the ONNX graph it was parsed from.
    profile
        The optimisation profile of the ``volume`` input: ``{"min"|"opt"|"max": shape}``.
    build_seconds
        Wall time of the build.
    built_at
        ISO 8601 UTC time of the build.
    format
        :data:`METADATA_FORMAT`.
    """

    key: PlanKey
    plan_sha256: str
    opset: int
    profile: dict[str, list[int]]
    build_seconds: float
    built_at: str
    format: int = METADATA_FORMAT

    def to_json(self) -> str:
        """Indented JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PlanMetadata:
        """Inverse of :meth:`to_json`.

        Raises
        ------
        ValueError
            If the text is not a sidecar of this format.
        """
        try:
            data = json.loads(text)
            key = PlanKey(**data.pop("key"))
            return cls(key=key, **data)
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a UniCT plan sidecar: {exc}") from exc

    def save(self, plan_path: Path) -> Path:
        """Write the sidecar next to ``plan_path``; returns its path."""
        path = sidecar_path(plan_path)
        path.write_text(self.to_json(), encoding="utf-8")
        return path


def sidecar_path(plan_path: Path) -> Path:
    """The JSON sidecar of a plan file."""
    return Path(plan_path).with_suffix(SIDECAR_SUFFIX)


def plan_mismatches(expected: PlanKey, found: PlanKey) -> list[str]:
    """Why a plan built for ``found`` cannot serve ``expected``; empty when it can.

    Parameters
    ----------
    expected
        What this machine and checkpoint need.
    found
        What the plan's sidecar says it was built for.
    """
    reasons = []
    if (found.model_name, found.model_version) != (expected.model_name, expected.model_version):
        reasons.append(
            f"built for model {found.model_name} {found.model_version}, "
            f"this is {expected.model_name} {expected.model_version}"
        )
    if found.checkpoint_sha256 != expected.checkpoint_sha256:
        reasons.append(
            f"built from checkpoint sha256 {found.checkpoint_sha256[:12]}, "
            f"this checkpoint is {expected.checkpoint_sha256[:12]}"
        )
    if found.tensorrt_version != expected.tensorrt_version:
        reasons.append(
            f"built with TensorRT {found.tensorrt_version}, this is TensorRT {expected.tensorrt_version}"
        )
    if (found.gpu_name, found.compute_capability) != (
        expected.gpu_name,
        expected.compute_capability,
    ):
        reasons.append(
            f"built for GPU {found.gpu_name} (compute capability {found.compute_capability}), "
            f"this GPU is {expected.gpu_name} (compute capability {expected.compute_capability})"
        )
    if found.precision != expected.precision:
        reasons.append(f"built in {found.precision}, {expected.precision} was asked for")
    return reasons


def check_plan_metadata(
    expected: PlanKey, metadata: PlanMetadata, plan_path: Path | None = None
) -> None:
    """Raise :class:`PlanMismatchError` unless ``metadata`` describes a plan for ``expected``.

    Parameters
    ----------
    expected
        What this machine and checkpoint need.
    metadata
        The plan's sidecar.
    plan_path
        Named in the message.
    """
    reasons = plan_mismatches(expected, metadata.key)
    if metadata.format != METADATA_FORMAT:
        reasons.append(
            f"sidecar format {metadata.format}, this node reads format {METADATA_FORMAT}"
        )
    if reasons:
        where = f"{plan_path}: " if plan_path is not None else ""
        raise PlanMismatchError(
            f"{where}refusing TensorRT plan: " + "; ".join(reasons) + _rebuild_hint()
        )


def _rebuild_hint() -> str:
    return " (rebuild it here with `unict-node build-engine`)"


def find_plan(plan_dir: Path, expected: PlanKey) -> tuple[Path, PlanMetadata]:
    """The plan in ``plan_dir`` built for ``expected``, with its sidecar.

    Raises
    ------
    PlanMismatchError
        If the expected plan's sidecar disagrees with its name, or if the folder only
        holds plans of this model built for something else (the message lists why).
    PlanNotFoundError
        If there is no plan of this model at all.
    """
    plan_dir = Path(plan_dir)
    path = expected.plan_path(plan_dir)
    if path.is_file():
        side = sidecar_path(path)
        if not side.is_file():
            raise PlanMismatchError(
                f"{path}: no sidecar {side.name}; cannot tell what the plan was built for"
                + _rebuild_hint()
            )
        try:
            metadata = PlanMetadata.from_json(side.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise PlanMismatchError(f"{side}: {exc}" + _rebuild_hint()) from exc
        check_plan_metadata(expected, metadata, path)
        return path, metadata
    others: list[tuple[Path, list[str]]] = []
    for side in sorted(plan_dir.glob(f"unict-*{SIDECAR_SUFFIX}")) if plan_dir.is_dir() else []:
        try:
            metadata = PlanMetadata.from_json(side.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if (
            metadata.key.model_name == expected.model_name
            and side.with_suffix(PLAN_SUFFIX).is_file()
        ):
            others.append((side.with_suffix(PLAN_SUFFIX), plan_mismatches(expected, metadata.key)))
    if others:
        others.sort(key=lambda item: len(item[1]))  # the nearest miss first
        listing = "; ".join(f"{p.name}: " + ", ".join(r) for p, r in others)
        raise PlanMismatchError(
            f"no usable TensorRT plan in {plan_dir}: {listing}" + _rebuild_hint()
        )
    raise PlanNotFoundError(
        f"no TensorRT plan for {expected.model_name} {expected.model_version} in {plan_dir}; "
        "build one with `unict-node build-engine`"
    )


def gpu_identity(device: torch.device | str | int = 0) -> tuple[str, str]:
    """``(name, "major.minor")`` of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def expected_plan_key(
    bundle: ModelBundle,
    precision: str,
    *,
    tensorrt_version: str,
    gpu: tuple[str, str],
) -> PlanKey:
    """The :class:`PlanKey` a plan for ``bundle`` must have on this TensorRT and GPU."""
    return PlanKey(
        model_name=bundle.card.name,
        model_version=bundle.card.version,
        checkpoint_sha256=checkpoint_sha256(bundle),
        tensorrt_version=tensorrt_version,
        gpu_name=gpu[0],
        compute_capability=gpu[1],
        precision=precision,
    )


def tensorrt_availability() -> Availability:
    """Whether TensorRT can run here: the Python package, then a CUDA device."""
    if _find_spec("tensorrt") is None:
        return Availability(
            False, f"the Python package 'tensorrt' is not installed ({INSTALL_HINT})"
        )
    if torch.version.cuda is None:
        return Availability(
            False, f"PyTorch {torch.__version__} is a CPU-only build: no CUDA device can be used"
        )
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA device is visible (torch.cuda.is_available() is False)")
    return Availability(True)


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, with an actionable error when it is missing."""
    try:
        import tensorrt
    except ImportError as exc:
        raise PlanError(f"cannot import tensorrt: {exc} ({INSTALL_HINT})") from exc
    return tensorrt


def make_trt_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards TensorRT's messages to :mod:`logging`."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }
    trt_log = logging.getLogger("engines.tensorrt.trt")

    class _Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            trt_log.log(levels.get(severity, logging.INFO), "%s", msg)

    return _Logger()


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """The PyTorch dtype of a TensorRT tensor dtype."""
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.int8: torch.int8,
        trt.bool: torch.bool,
    }
    if dtype not in table:
        raise PlanError(f"unsupported TensorRT dtype {dtype}")
    return table[dtype]


@dataclass
class _Worker:
    """One worker thread's execution context and CUDA stream."""

    context: Any
    stream: torch.cuda.Stream


class TensorRTEngine(Engine):
    """UniCT's visual path from a TensorRT plan, the report in PyTorch on the same GPU.

    Parameters
    ----------
    bundle
        The loaded checkpoint (identity of the plan, and the decoder's weights).
    plan_dir
        Folder of plans built by ``unict-node build-engine``.
    device
        ``"cuda"`` or ``"cuda:N"``.
    precision
        Which plan to load: ``"fp16"`` (default), ``"fp32"`` or ``"int8"``.

    Notes
    -----
    One deserialised engine is shared; each thread that calls :meth:`infer` gets its own
    execution context and CUDA stream, so several workers can run at once.
    """

    name = "tensorrt"

    @classmethod
    def from_options(cls, bundle: ModelBundle, options: EngineOptions) -> TensorRTEngine:
        if options.device == "cpu":
            raise ValueError("TensorRT needs a CUDA device, and device is 'cpu'")
        device = "cuda" if options.device == "auto" else options.device
        return cls(bundle, options.plan_dir, device=device, precision=options.precision)

    def __init__(
        self, bundle: ModelBundle, plan_dir: Path, device: str = "cuda", precision: str = "fp16"
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        self.bundle = bundle
        self.plan_dir = Path(plan_dir)
        self.device = torch.device(device)
        self.precision = precision
        self.plan_path: Path | None = None
        self.metadata: PlanMetadata | None = None
        self._trt_logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._dtypes: dict[str, torch.dtype] = {}
        self._profile: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._local = threading.local()
        self._report: ReportGenerator | None = None
        self._load_lock = threading.Lock()
        self._loaded = False

    @classmethod
    def is_available(cls) -> Availability:
        return tensorrt_availability()

    def expected_key(self) -> PlanKey:
        """The plan identity this engine needs here (imports tensorrt, queries the GPU)."""
        trt = import_tensorrt()
        return expected_plan_key(
            self.bundle,
            self.precision,
            tensorrt_version=trt.__version__,
            gpu=gpu_identity(self.device),
        )

    def load(self) -> None:
        with self._load_lock:
            if self._loaded:
                return
            if self.device.type != "cuda":
                raise PlanError(f"TensorRT runs on CUDA devices, not {self.device}")
            available = self.is_available()
            if not available:
                raise PlanError(available.reason)
            trt = import_tensorrt()
            expected = self.expected_key()
            path, metadata = find_plan(self.plan_dir, expected)
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != metadata.plan_sha256:
                raise PlanMismatchError(
                    f"{path}: the file does not match the SHA-256 in its sidecar (replaced or corrupted)"
                    + _rebuild_hint()
                )
            trt_logger = make_trt_logger(trt)  # must outlive the runtime and engine: kept below
            runtime = trt.Runtime(trt_logger)
            with torch.cuda.device(self.device):
                engine = runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise PlanMismatchError(
                    f"{path}: TensorRT {trt.__version__} could not deserialise the plan"
                    + _rebuild_hint()
                )
            names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
            missing = {INPUT_NAME, *OUTPUT_NAMES} - names
            if missing:
                raise PlanMismatchError(
                    f"{path}: plan lacks tensors {sorted(missing)}" + _rebuild_hint()
                )
            self._dtypes = {
                n: torch_dtype(trt, engine.get_tensor_dtype(n)) for n in (INPUT_NAME, *OUTPUT_NAMES)
            }
            lo, _opt, hi = engine.get_tensor_profile_shape(INPUT_NAME, 0)
            self._profile = (tuple(lo), tuple(hi))
            self._report = ReportGenerator.from_bundle(self.bundle, self.device)
            self._trt_logger, self._runtime, self._engine = trt_logger, runtime, engine
            self.plan_path, self.metadata = path, metadata
            logger.info(
                "loaded TensorRT plan %s (%s, built in %.0f s)",
                path.name,
                metadata.key.precision,
                metadata.build_seconds,
            )
            self._loaded = True

    def _worker(self) -> _Worker:
        worker: _Worker | None = getattr(self._local, "worker", None)
        if worker is None:
            context = self._engine.create_execution_context()
            if context is None:
                raise PlanError(
                    "TensorRT could not create an execution context (out of GPU memory?)"
                )
            worker = _Worker(context, torch.cuda.Stream(self.device))  # type: ignore[no-untyped-call]
            self._local.worker = worker
        return worker

    def _check_profile(self, shape: tuple[int, ...]) -> None:
        assert self._profile is not None
        lo, hi = self._profile
        if any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=True)):
            raise ValueError(
                f"input shape {shape} is outside the plan's optimisation profile {lo}..{hi}; "
                "rebuild with `unict-node build-engine --min-slices/--max-slices/--max-batch`"
            )

    def infer(self, image: npt.NDArray[np.float32]) -> InferenceResult:
        self.load()
        assert self._report is not None
        check_volume(image, self.bundle.card.config.preprocess.size)
        shape = (1, *image.shape)
        self._check_profile(shape)
        worker = self._worker()
        context = worker.context
        with torch.cuda.device(self.device), torch.cuda.stream(worker.stream):
            host = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
            volume = host.to(self.device, dtype=self._dtypes[INPUT_NAME], non_blocking=False)
            if not context.set_input_shape(INPUT_NAME, shape):
                raise ValueError(f"TensorRT refused input shape {shape}")
            context.set_tensor_address(INPUT_NAME, volume.data_ptr())
            outputs: dict[str, torch.Tensor] = {}
            for name in OUTPUT_NAMES:
                out = torch.empty(
                    tuple(context.get_tensor_shape(name)),
                    dtype=self._dtypes[name],
                    device=self.device,
                )
                context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            if not context.execute_async_v3(worker.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            # Same stream: decoding starts when the visual path has finished, on the GPU.
            probs = outputs["cls_probs"][0].float().cpu().numpy()
            tokens, text = self._report.generate(outputs["memory"].float(), probs)
            seg = outputs["seg_probs"][0].float().cpu().numpy()
            attention = outputs["fusion_attention"][0].float().cpu().numpy()
        return InferenceResult(
            probabilities=probs,
            segmentation=seg,
            report_tokens=tokens,
            report_text=text,
            fusion_attention=attention,
            engine=self.name,
        )
