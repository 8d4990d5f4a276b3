"""ONNX export of UniCT's visual path, cached by the checkpoint's SHA-256.

The exported graph is everything up to the report decoder: encoder, task adapters,
multi-task fusion, FiLM modulation, classification and segmentation heads, and the
decoder's memory. See :mod:`engines` for the decisions (opset, sigmoid inside the graph,
dynamic axes, decoding outside the graph).

Graph interface
---------------
input ``volume``
    ``(batch, slices, H, W)`` float32 preprocessed volume; ``slices`` must be a multiple
    of 3 (slice triplets); ``H, W`` are fixed by the model card.
output ``cls_probs``
    ``(batch, L)`` sigmoid probabilities.
output ``seg_probs``
    ``(batch, L, slices, H, W)`` sigmoid probabilities.
output ``fusion_attention``
    ``(batch, 3, 3)`` task-by-task attention.
output ``memory``
    ``(batch, 3 + slices / 3, d)`` what the report decoder attends to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy.typing as npt
import torch
from torch import Tensor, nn

from model.bundle import ModelBundle, sha256_of
from model.network import UniCT

logger = logging.getLogger(__name__)

#: ONNX (ai.onnx) opset of the export: ONNX Runtime >= 1.14 and every TensorRT 10 parser
#: implement it, and it has LayerNormalization as one node (TensorRT fuses it).
OPSET = 18
#: Bump when the graph's interface or the export procedure changes: it is part of the
#: cache key, so old exports are not reused.
EXPORT_FORMAT = 1

INPUT_NAME = "volume"
OUTPUT_NAMES = ("cls_probs", "seg_probs", "fusion_attention", "memory")
DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "volume": {0: "batch", 1: "slices"},
    "cls_probs": {0: "batch"},
    "seg_probs": {0: "batch", 2: "slices"},
    "fusion_attention": {0: "batch"},
    "memory": {0: "batch", 1: "memory_tokens"},
}
ONNX_FILE = "unict_visual.onnx"
EXPORT_INFO_FILE = "export.json"
#: Slices in the example volume the graph is traced with: shapes are symbolic, so a
#: shorter volume than the card's (240 slices at full size) only makes tracing cheaper.
TRACE_SLICES = 48


class VisualPath(nn.Module):
    """UniCT without the report decoder, returning probabilities instead of logits.

    The sigmoid is part of the graph: the node consumes probabilities, the engines then
    fuse it into the last kernel, and no extra pass over the ``(L, D, H, W)`` map runs
    outside the graph.
    """

    def __init__(self, model: UniCT) -> None:
        super().__init__()
        self.model = model

    def forward(self, volume: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = self.model(volume)
        return (
            torch.sigmoid(out.cls_logits),
            torch.sigmoid(out.seg_logits),
            out.fusion_attention,
            out.memory,
        )


@dataclass(frozen=True)
class ExportInfo:
    """What an exported model is; stored next to it as ``export.json``.

    Attributes
    ----------
    model_name, model_version
        From the model card.
    checkpoint_sha256
        The weights the graph was exported from (the cache key).
    opset
        ai.onnx opset of the graph.
    export_format
        :data:`EXPORT_FORMAT` at export time.
    torch_version
        PyTorch that traced the graph.
    input_shape
        ``[H, W]`` of the fixed in-plane size.
    seconds
        How long the export took.
    """

    model_name: str
    model_version: str
    checkpoint_sha256: str
    opset: int
    export_format: int
    torch_version: str
    input_shape: tuple[int, int]
    seconds: float

    def to_json(self) -> str:
        """Indented JSON."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ExportInfo:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["input_shape"] = tuple(data["input_shape"])
        return cls(**data)


@dataclass(frozen=True)
class ExportedModel:
    """An ONNX file of the visual path and its :class:`ExportInfo`."""

    path: Path
    info: ExportInfo


def checkpoint_sha256(bundle: ModelBundle) -> str:
    """SHA-256 identifying ``bundle``'s weights.

    The card's value when it has one, else the hash of the weights file, else (a bundle
    built in memory) a hash of the tensors themselves.
    """
    if bundle.card.checkpoint_sha256:
        return bundle.card.checkpoint_sha256
    weights = bundle.directory / bundle.card.checkpoint_file
    if weights.is_file():
        return sha256_of(weights)
    digest = hashlib.sha256()
    for key in sorted(bundle.state_dict):
        tensor = bundle.state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_dir(onnx_dir: Path, bundle: ModelBundle) -> Path:
    """Where the export of ``bundle`` is cached: ``onnx_dir/<sha256>/``."""
    return Path(onnx_dir) / checkpoint_sha256(bundle)


def export_visual_path(bundle: ModelBundle, path: Path, *, opset: int = OPSET) -> ExportInfo:
    """Export the visual path of ``bundle`` to ``path`` and check it with ``onnx.checker``.

    Parameters
    ----------
    bundle
        The checkpoint to export.
    path
        The ``.onnx`` file to write (its folder must exist).
    opset
        ai.onnx opset (default :data:`OPSET`).

    Returns
    -------
    ExportInfo
        What was exported (not written anywhere by this function).

    Notes
    -----
    This uses PyTorch's TorchScript-based exporter (``dynamo=False``): it needs nothing
    beyond ``onnx``, traces this network in seconds, and keeps the batch and slice axes
    symbolic through the computed positions and attention masks (checked by the tests at
    two slice counts). PyTorch marks it deprecated; the ``torch.export`` path needs the
    ``onnxscript`` package, which the project does not depend on.
    """
    import onnx

    cfg = bundle.card.config
    started = time.perf_counter()
    model = VisualPath(bundle.build("cpu")).eval()
    h, w = cfg.preprocess.size[1:]
    example = torch.zeros(1, min(TRACE_SLICES, cfg.preprocess.size[0]), h, w)
    with warnings.catch_warnings():
        # The legacy exporter's DeprecationWarning and the tracer's notes on tuple
        # unpacking of tensors (harmless here: the number of heads is static).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        with torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=DYNAMIC_AXES,
                do_constant_folding=True,
            )
    sha = checkpoint_sha256(bundle)
    proto = onnx.load(str(path))
    _declare_io_shapes(proto, bundle)
    proto.doc_string = f"UniCT visual path: {bundle.card.name} {bundle.card.version}"
    for key, value in (
        ("model_name", bundle.card.name),
        ("model_version", bundle.card.version),
        ("checkpoint_sha256", sha),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return ExportInfo(
        model_name=bundle.card.name,
        model_version=bundle.card.version,
        checkpoint_sha256=sha,
        opset=opset,
        export_format=EXPORT_FORMAT,
        torch_version=torch.__version__,
        input_shape=(h, w),
        seconds=round(time.perf_counter() - started, 3),
    )


def io_shapes(bundle: ModelBundle) -> dict[str, list[int | str]]:
    """Declared shapes of the graph's inputs and outputs; strings are symbolic axes."""
    cfg = bundle.card.config
    _, h, w = cfg.preprocess.size
    return {
        INPUT_NAME: ["batch", "slices", h, w],
        "cls_probs": ["batch", cfg.num_labels],
        "seg_probs": ["batch", cfg.num_labels, "slices", h, w],
        "fusion_attention": ["batch", 3, 3],
        "memory": ["batch", "memory_tokens", cfg.d_model],
    }


def _declare_io_shapes(proto: Any, bundle: ModelBundle) -> None:
    """Write the full I/O shapes into the graph.

    The tracer leaves some static output dimensions symbolic (``seg_probs`` comes out of
    reshapes of the slice axis); declaring them lets ONNX Runtime and TensorRT allocate
    outputs from the signature, and ``onnx.checker``'s shape inference verifies them.
    """
    shapes = io_shapes(bundle)
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, shapes[value.name], strict=True):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def cached_export(onnx_dir: Path, bundle: ModelBundle) -> ExportedModel | None:
    """The cached export of ``bundle`` under ``onnx_dir``, or None if absent or stale."""
    folder = export_dir(onnx_dir, bundle)
    path, info_path = folder / ONNX_FILE, folder / EXPORT_INFO_FILE
    if not (path.is_file() and info_path.is_file()):
        return None
    try:
        info = ExportInfo.from_json(info_path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("ignoring unreadable %s: %s", info_path, exc)
        return None
    if (info.opset, info.export_format, info.checkpoint_sha256) != (
        OPSET,
        EXPORT_FORMAT,
        checkpoint_sha256(bundle),
    ):
        return None
    return ExportedModel(path, info)


def ensure_onnx(bundle: ModelBundle, onnx_dir: Path) -> ExportedModel:
    """The ONNX export of ``bundle``, exporting once into ``onnx_dir/<sha256>/``.

    The file is written under a temporary name and renamed into place, so a reader (or
    a second worker exporting at the same time) never sees a half-written model.
    """
    found = cached_export(onnx_dir, bundle)
    if found is not None:
        return found
    folder = export_dir(onnx_dir, bundle)
    folder.mkdir(parents=True, exist_ok=True)
    logger.info(
        "exporting %s %s to ONNX (opset %d) in %s",
        bundle.card.name,
        bundle.card.version,
        OPSET,
        folder,
    )
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx.tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        info = export_visual_path(bundle, tmp)
        os.replace(tmp, folder / ONNX_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    info_tmp = folder / f"{EXPORT_INFO_FILE}.{os.getpid()}.tmp"
    info_tmp.write_text(info.to_json(), encoding="utf-8")
    os.replace(info_tmp, folder / EXPORT_INFO_FILE)
    logger.info("exported %s in %.1f s", folder / ONNX_FILE, info.seconds)
    return ExportedModel(folder / ONNX_FILE, info)


def check_volume(image: npt.NDArray[Any], size: tuple[int, int, int]) -> None:
    """Refuse a volume the exported graph cannot take, with the reason.

    Parameters
    ----------
    image
        The ``(D, H, W)`` preprocessed volume.
    size
        The model card's ``(D, H, W)``: ``H, W`` are fixed, ``D`` may vary in multiples of 3.

    Raises
    ------
    ValueError
        On a wrong rank, in-plane size, or a slice count that is not a positive multiple of 3.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {image.shape}")
    d, h, w = image.shape
    if (h, w) != tuple(size[1:]):
        raise ValueError(
            f"volume in-plane size {(h, w)} differs from the model's {tuple(size[1:])}"
        )
    if d < 3 or d % 3:
        raise ValueError(
            f"volume has {d} slices; the model takes a positive multiple of 3 (slice triplets)"
        )


def graph_summary(path: Path) -> dict[str, Any]:
    """Opset, and the names and (symbolic) shapes of the inputs and outputs of an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def shape(value: Any) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": {v.name: shape(v) for v in proto.graph.input},
        "outputs": {v.name: shape(v) for v in proto.graph.output},
        "metadata": {p.key: p.value for p in proto.metadata_props},
    }
