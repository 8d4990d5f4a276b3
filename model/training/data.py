"""Training cases on the model grid, generated from phantoms and cached on disk.

A case is rendered by the phantom generator (:mod:`model.phantom`), brought onto the model
grid by the same :func:`model.transforms.preprocess` the node uses at inference, and stored
as one ``.npz``: image (float16), masks (bit-packed, thresholded at 0.5), presence and the
report text. Generation runs in worker processes; a cache directory is reused across runs
(and ``train --resume``) as long as the configuration matches.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from model.config import PreprocessConfig
from model.tokenizer import Tokenizer
from model.transforms import preprocess

GridKind = Literal["training", "realistic"]
#: ``--generator`` values: the original phantoms, generator 2 (:mod:`model.phantom.realism`),
#: or both (even seeds generator 2, odd seeds generator 1).
GENERATOR_CHOICES = ("1", "2", "mix")


def generator_of(seed: int, generator: str | int = 1) -> int:
    """The phantom generator that renders ``seed`` under a ``--generator`` choice."""
    choice = str(generator)
    if choice == "mix":
        return 2 if seed % 2 == 0 else 1
    if choice not in ("1", "2"):
        raise ValueError(f"generator must be one of {', '.join(GENERATOR_CHOICES)}, got {choice!r}")
    return int(choice)


@dataclass(frozen=True)
class Case:
    """One case on the model grid."""

    seed: int
    image: npt.NDArray[np.float32]  # (D, H, W)
    masks: npt.NDArray[np.bool_]  # (L, D, H, W)
    present: npt.NDArray[np.bool_]  # (L,)
    report: str
    known: npt.NDArray[np.bool_] | None = None  # (L,) labels the source asserts; None: all
    has_masks: bool = True
    name: str = ""


def make_case(
    seed: int, cfg: PreprocessConfig, kind: GridKind = "training", generator: int = 1
) -> Case:
    """Render the phantom of ``seed`` (with ``generator``) and bring it onto the model grid."""
    from model.phantom import generate

    phantom = generate(seed, kind, generator=generator)
    model_input = preprocess(phantom.hu, phantom.affine_lps, cfg, masks=phantom.masks)
    assert model_input.masks is not None
    return Case(
        seed=seed,
        image=model_input.image,
        masks=model_input.masks >= 0.5,
        present=np.asarray(phantom.present, dtype=bool),
        report=phantom.report,
    )


def _cache_path(directory: Path, seed: int, kind: GridKind, generator: int = 1) -> Path:
    prefix = kind if generator == 1 else f"{kind}-g{generator}"
    return directory / f"{prefix}-{seed:07d}.npz"


def save_case(case: Case, path: Path) -> None:
    """Write a case atomically."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        image=case.image.astype(np.float16),
        masks=np.packbits(case.masks, axis=None),
        mask_shape=np.array(case.masks.shape),
        present=case.present,
        report=np.array(case.report),
        seed=np.array(case.seed),
    )
    tmp.replace(path)


def load_case(path: Path) -> Case:
    """Read a case written by :func:`save_case` (or a real one of
    :func:`model.training.real_data.save_sample_case`)."""
    with np.load(path) as z:
        shape = tuple(int(s) for s in z["mask_shape"])
        masks = np.unpackbits(z["masks"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        return Case(
            seed=int(z["seed"]),
            image=z["image"].astype(np.float32),
            masks=masks,
            present=z["present"].astype(bool),
            report=str(z["report"]),
            known=z["known"].astype(bool) if "known" in z.files else None,
            has_masks=bool(z["has_masks"]) if "has_masks" in z.files else True,
            name=str(z["name"]) if "name" in z.files else f"seed {int(z['seed'])}",
        )


def _build_one(args: tuple[int, PreprocessConfig, GridKind, Path, int]) -> Path:
    seed, cfg, kind, directory, generator = args
    torch.set_num_threads(1)
    path = _cache_path(directory, seed, kind, generator)
    if not path.exists():
        save_case(make_case(seed, cfg, kind, generator), path)
    return path


def build_cache(
    seeds: Sequence[int],
    cfg: PreprocessConfig,
    directory: Path,
    kind: GridKind = "training",
    workers: int = 2,
    generator: str | int = 1,
) -> Iterator[Path]:
    """Generate (or reuse) the cached cases of ``seeds``; yields paths as they are ready.

    ``generator`` is a ``--generator`` choice (:func:`generator_of`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    jobs = [(s, cfg, kind, directory, generator_of(s, generator)) for s in seeds]
    if workers <= 1:
        for job in jobs:
            yield _build_one(job)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_build_one, jobs, chunksize=4)


class CaseDataset(Dataset[dict[str, torch.Tensor]]):
    """Cached cases as tensors, with report token ids padded to ``max_tokens``.

    Cases stay in memory as stored (float16 image, bit-packed masks: ~4 MB a ``small``
    case) and are unpacked per item.
    """

    def __init__(
        self, paths: Sequence[Path], tokenizer: Tokenizer, max_tokens: int, augment: bool = False
    ) -> None:
        self.items: list[dict[str, npt.NDArray[np.generic]]] = []
        self.reports: list[str] = []
        for p in paths:
            with np.load(p) as z:
                item = {k: z[k] for k in ("image", "masks", "mask_shape", "present")}
                # Real cases (model.training.real_data) say which labels their source
                # asserts and whether they have masks; phantoms know everything.
                item["known"] = (
                    z["known"] if "known" in z.files else np.ones_like(z["present"], dtype=bool)
                )
                item["has_masks"] = z["has_masks"] if "has_masks" in z.files else np.array(True)
                self.items.append(item)
                self.reports.append(str(z["report"]))
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.augment = augment
        self._rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        shape = tuple(int(s) for s in item["mask_shape"])
        masks = np.unpackbits(item["masks"].astype(np.uint8), count=int(np.prod(shape))).reshape(
            shape
        )
        image = item["image"].astype(np.float32)
        if self.augment:
            # Intensity jitter only: flips would contradict the laterality in the reports.
            image = image * np.float32(self._rng.uniform(0.95, 1.05)) + np.float32(
                self._rng.normal(0, 0.01)
            )
        tokens = np.full(self.max_tokens, self.tokenizer.pad_id, dtype=np.int64)
        if self.reports[index].strip():  # no report (RAD-ChestCT): no report target
            ids = self.tokenizer.encode(self.reports[index], max_len=self.max_tokens)
            tokens[: len(ids)] = ids
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "masks": torch.from_numpy(masks.astype(np.float32)),
            "present": torch.from_numpy(item["present"].astype(np.float32)),
            "known": torch.from_numpy(item["known"].astype(np.float32)),
            "has_masks": torch.tensor(float(item["has_masks"])),
            "tokens": torch.from_numpy(tokens),
        }
