"""Triton Inference Server model repository entries for UniCT's visual path.

Triton serves models from a *model repository*: one folder per model, holding a
``config.pbtxt`` (a ``ModelConfig`` protobuf in text format) and one numbered folder per
version with the model file::

    <repository>/<model name>/config.pbtxt
    <repository>/<model name>/1/model.plan      (platform "tensorrt_plan")
    <repository>/<model name>/1/model.onnx      (platform "onnxruntime_onnx")

:func:`write_plan_entry` writes the entry of a TensorRT plan built by ``unict-node
build-engine`` (:mod:`engines.build`), :func:`write_onnx_entry` the entry of the ONNX
export (:mod:`engines.export`), which Triton runs in ONNX Runtime (or converts itself).
``unict-node build-engine --triton-repo DIR`` calls them.

The configuration is written in full rather than left to Triton's auto-completion, so
that what the server runs is reviewable in the file:

- the tensor names and shapes are the graph interface of :mod:`engines.export`; Triton's
  ``dims`` leave out the batch axis (``max_batch_size`` > 0) and write symbolic axes
  (slices, memory tokens) as ``-1``;
- ``max_batch_size`` is the plan's optimisation profile maximum (a plan cannot take more),
  with ``dynamic_batching`` when it is above 1, so that requests of several workers are
  batched on the server;
- ``instance_group`` is ``KIND_GPU``;
- ``parameters`` record what the model was built from (model name and version, checkpoint
  SHA-256, and for a plan its TensorRT version, GPU and precision).
  :class:`engines.triton.TritonEngine` reads them back and refuses a model built from
  other weights, as :mod:`engines.tensorrt` refuses a plan.

A TensorRT plan only runs on the TensorRT version and GPU model it was built with: build
it with the TensorRT of the Triton release that serves it, on the same GPU model.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engines.export import INPUT_NAME, OUTPUT_NAMES, ExportedModel, checkpoint_sha256, io_shapes
from engines.tensorrt import PlanMetadata
from model.bundle import ModelBundle

PLATFORM_TENSORRT = "tensorrt_plan"
PLATFORM_ONNX = "onnxruntime_onnx"
#: File name Triton looks for in a version folder, by platform.
MODEL_FILES = {PLATFORM_TENSORRT: "model.plan", PLATFORM_ONNX: "model.onnx"}
CONFIG_FILE = "config.pbtxt"
#: Prefix of the ``parameters`` keys this node writes and checks.
PARAMETER_PREFIX = "unict_"
#: Triton's data type of every tensor of the graph (the ONNX I/O is float32, also in FP16
#: plans: reduced precision is inside the plan).
DATA_TYPE = "TYPE_FP32"
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def default_model_name(bundle: ModelBundle) -> str:
    """The repository name of ``bundle``'s visual path: the card's name, lower case.

    ``UniCT-small`` gives ``unict-small``.
    """
    return re.sub(r"[^a-z0-9_.-]+", "-", bundle.card.name.lower()).strip("-") or "unict"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a Triton model.

    Attributes
    ----------
    name
        The tensor's name in the graph.
    dims
        Its shape without the batch axis; ``-1`` for a variable axis.
    data_type
        Triton's ``DataType`` name, e.g. ``TYPE_FP32``.
    """

    name: str
    dims: tuple[int, ...]
    data_type: str = DATA_TYPE


@dataclass(frozen=True)
class TritonModelConfig:
    """What ``config.pbtxt`` says: Triton's ``ModelConfig``, the fields this node sets.

    Attributes
    ----------
    name
        The model's name (also its folder in the repository).
    platform
        ``"tensorrt_plan"`` or ``"onnxruntime_onnx"``.
    max_batch_size
        Largest batch the model takes (>= 1: the batch axis is the first of each tensor).
    inputs, outputs
        The tensors.
    instance_kind
        ``"KIND_GPU"`` (default) or ``"KIND_CPU"``.
    instance_count
        Model instances per GPU (or on the CPU).
    parameters
        String parameters recording the model's identity.
    """

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    instance_kind: str = "KIND_GPU"
    instance_count: int = 1
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"Triton model name {self.name!r}: use letters, digits, '_', '-' and '.'"
            )
        if self.platform not in MODEL_FILES:
            raise ValueError(
                f"unknown platform {self.platform!r}; choose one of {list(MODEL_FILES)}"
            )
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {self.max_batch_size}")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(
                f"unknown instance kind {self.instance_kind!r}; choose one of {INSTANCE_KINDS}"
            )
        if self.instance_count < 1:
            raise ValueError(f"instance_count must be >= 1, not {self.instance_count}")

    @property
    def model_file(self) -> str:
        """The file name in the version folder: ``model.plan`` or ``model.onnx``."""
        return MODEL_FILES[self.platform]

    def to_pbtxt(self) -> str:
        """The configuration in protobuf text format, as Triton reads ``config.pbtxt``."""
        lines = [
            f"name: {_quote(self.name)}",
            f"platform: {_quote(self.platform)}",
            f"max_batch_size: {self.max_batch_size}",
            f"default_model_filename: {_quote(self.model_file)}",
        ]
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            lines.append(f"{kind} [")
            body = [
                "  {\n"
                f"    name: {_quote(t.name)}\n"
                f"    data_type: {t.data_type}\n"
                f"    dims: [ {', '.join(str(d) for d in t.dims)} ]\n"
                "  }"
                for t in tensors
            ]
            lines.append(",\n".join(body))
            lines.append("]")
        # Batching across requests is where a shared server pays off: jobs of several
        # workers run as one batch when the plan's profile allows more than one volume.
        if self.max_batch_size > 1:
            lines.append("dynamic_batching { }")
        lines.append("instance_group [")
        lines.append(
            f"  {{\n    count: {self.instance_count}\n    kind: {self.instance_kind}\n  }}"
        )
        lines.append("]")
        for key in sorted(self.parameters):
            lines.append(
                f"parameters {{ key: {_quote(key)} "
                f"value: {{ string_value: {_quote(self.parameters[key])} }} }}"
            )
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tensor_specs(bundle: ModelBundle) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """``(inputs, outputs)`` of the visual path of ``bundle``, in Triton's terms.

    From :func:`engines.export.io_shapes`: the batch axis is dropped and symbolic axes
    become ``-1``.
    """
    shapes = io_shapes(bundle)

    def spec(name: str) -> TensorSpec:
        dims = shapes[name][1:]  # the batch axis is implied by max_batch_size
        return TensorSpec(name, tuple(d if isinstance(d, int) else -1 for d in dims))

    return (spec(INPUT_NAME),), tuple(spec(name) for name in OUTPUT_NAMES)


def identity_parameters(bundle: ModelBundle) -> dict[str, str]:
    """The ``parameters`` naming the weights a model was built from."""
    return {
        f"{PARAMETER_PREFIX}model_name": bundle.card.name,
        f"{PARAMETER_PREFIX}model_version": bundle.card.version,
        f"{PARAMETER_PREFIX}checkpoint_sha256": checkpoint_sha256(bundle),
    }


def model_config(
    bundle: ModelBundle,
    platform: str,
    *,
    name: str | None = None,
    max_batch_size: int = 1,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
    extra_parameters: Mapping[str, str] | None = None,
) -> TritonModelConfig:
    """The :class:`TritonModelConfig` of ``bundle``'s visual path on ``platform``.

    Parameters
    ----------
    bundle
        The checkpoint.
    platform
        ``"tensorrt_plan"`` or ``"onnxruntime_onnx"``.
    name
        Model name in the repository; default :func:`default_model_name`.
    max_batch_size
        Largest batch; for a plan, its profile's maximum.
    instance_kind, instance_count
        The ``instance_group``.
    extra_parameters
        More identity parameters (a plan's TensorRT version, GPU, precision).
    """
    inputs, outputs = tensor_specs(bundle)
    parameters = identity_parameters(bundle)
    parameters.update(extra_parameters or {})
    return TritonModelConfig(
        name=name or default_model_name(bundle),
        platform=platform,
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        instance_kind=instance_kind,
        instance_count=instance_count,
        parameters=parameters,
    )


@dataclass(frozen=True)
class RepositoryEntry:
    """A model written into a Triton model repository."""

    directory: Path
    config_path: Path
    model_path: Path
    config: TritonModelConfig


def write_entry(
    repository: Path, config: TritonModelConfig, model_file: Path, *, version: int = 1
) -> RepositoryEntry:
    """Write ``config.pbtxt`` and copy ``model_file`` into ``repository/<name>/<version>/``.

    The model is copied, not linked: the repository is usually mounted into Triton's
    container, where a link to the plan folder would dangle. Both files are written under
    temporary names and renamed into place, so a server polling the repository
    (``--model-control-mode=poll``) never loads a half-written model.

    Raises
    ------
    ValueError
        If ``version`` is below 1.
    FileNotFoundError
        If ``model_file`` does not exist.
    """
    if version < 1:
        raise ValueError(f"Triton model versions start at 1, not {version}")
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"no model file {model_file}")
    directory = Path(repository) / config.name
    version_dir = directory / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    model_path = version_dir / config.model_file
    tmp = version_dir / f".{config.model_file}.{os.getpid()}.tmp"
    shutil.copyfile(model_file, tmp)
    os.replace(tmp, model_path)
    config_path = directory / CONFIG_FILE
    tmp = directory / f".{CONFIG_FILE}.{os.getpid()}.tmp"
    tmp.write_text(config.to_pbtxt(), encoding="utf-8")
    os.replace(tmp, config_path)
    return RepositoryEntry(directory, config_path, model_path, config)


def write_plan_entry(
    repository: Path,
    bundle: ModelBundle,
    plan_path: Path,
    metadata: PlanMetadata,
    *,
    name: str | None = None,
    version: int = 1,
    instance_count: int = 1,
) -> RepositoryEntry:
    """The repository entry of a TensorRT plan (platform ``tensorrt_plan``).

    ``max_batch_size`` is the plan's profile maximum batch, and the plan's identity
    (TensorRT version, GPU, precision) goes into the parameters.

    Raises
    ------
    ValueError
        If the plan's sidecar is for another checkpoint than ``bundle``.
    """
    key = metadata.key
    if key.checkpoint_sha256 != checkpoint_sha256(bundle):
        raise ValueError(
            f"{plan_path} was built from checkpoint {key.checkpoint_sha256[:12]}, "
            f"not from this one ({checkpoint_sha256(bundle)[:12]})"
        )
    config = model_config(
        bundle,
        PLATFORM_TENSORRT,
        name=name,
        max_batch_size=int(metadata.profile["max"][0]),
        instance_count=instance_count,
        extra_parameters={
            f"{PARAMETER_PREFIX}tensorrt_version": key.tensorrt_version,
            f"{PARAMETER_PREFIX}gpu": f"{key.gpu_name} (sm {key.compute_capability})",
            f"{PARAMETER_PREFIX}precision": key.precision,
        },
    )
    return write_entry(repository, config, plan_path, version=version)


def write_onnx_entry(
    repository: Path,
    bundle: ModelBundle,
    exported: ExportedModel,
    *,
    name: str | None = None,
    version: int = 1,
    max_batch_size: int = 1,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
) -> RepositoryEntry:
    """The repository entry of the ONNX export (platform ``onnxruntime_onnx``).

    The graph's batch axis is symbolic, so any ``max_batch_size`` works.

    Raises
    ------
    ValueError
        If the export is of another checkpoint than ``bundle``.
    """
    if exported.info.checkpoint_sha256 != checkpoint_sha256(bundle):
        raise ValueError(f"{exported.path} is the export of another checkpoint")
    config = model_config(
        bundle,
        PLATFORM_ONNX,
        name=name,
        max_batch_size=max_batch_size,
        instance_kind=instance_kind,
        instance_count=instance_count,
        extra_parameters={f"{PARAMETER_PREFIX}opset": str(exported.info.opset)},
    )
    return write_entry(repository, config, exported.path, version=version)


def parameter_mismatches(
    expected: Mapping[str, str], found: Mapping[str, str], keys: Sequence[str] | None = None
) -> list[str]:
    """Why a served model's identity parameters differ from ``expected``; empty if they agree.

    Parameters
    ----------
    expected
        From :func:`identity_parameters` of the local checkpoint.
    found
        The served model's string parameters.
    keys
        Which keys to compare; default all of ``expected``.
    """
    reasons = []
    for key in keys or sorted(expected):
        if key not in found:
            reasons.append(f"the model's config has no parameter {key}")
        elif found[key] != expected[key]:
            short = key.removeprefix(PARAMETER_PREFIX)
            reasons.append(f"{short} is {found[key]!r}, this node has {expected[key]!r}")
    return reasons
