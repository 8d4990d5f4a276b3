"""UniCT configurations: ``small`` (CPU, shipped), ``full`` (the paper's input size, GPU),
and ``tiny`` (smoke runs and CI: the same network at toy sizes, seconds a step on CPU).

Both run the same code path; only sizes differ. The ablation switches of the paper
(fusion, modulation, and each task's supervision) live here too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

ConfigName = Literal["small", "full", "tiny"]


@dataclass(frozen=True)
class PreprocessConfig:
    """CT-Scroll preprocessing: orientation, spacing, HU window, crop/pad.

    ``orientation`` uses nibabel/MONAI axis codes on RAS space: ``"SLP"`` puts axis 0
    inferior->superior, axis 1 right->left, axis 2 anterior->posterior, as CT-Scroll does.
    """

    spacing_mm: tuple[float, float, float]
    size: tuple[int, int, int]
    hu_window: tuple[float, float] = (-1000.0, 200.0)
    offset: float = -0.449
    orientation: str = "SLP"

    @property
    def pad_value(self) -> float:
        """Value of air after scaling; used to pad."""
        return self.offset


@dataclass(frozen=True)
class AblationConfig:
    """The paper's ablations; everything on is the full model."""

    fusion: bool = True
    modulation: bool = True
    classification_supervision: bool = True
    segmentation_supervision: bool = True
    report_supervision: bool = True


@dataclass(frozen=True)
class UniCTConfig:
    """Sizes of one UniCT configuration.

    Parameters
    ----------
    name
        ``"small"`` or ``"full"``.
    preprocess
        Input geometry; ``size[0]`` must be a multiple of 3 (slice triplets).
    resnet_widths
        Channels of the four ResNet-18 stages (64..512 in the paper).
    d_model
        Width of slice tokens, task tokens and the report decoder.
    heads
        Attention heads in the scrolling block, the fusion and the decoder.
    scroll_window
        Banded attention reach in triplets (15 in CT-Scroll at 80 triplets).
    fusion_layers
        Transformer layers of the multi-task fusion module.
    decoder_layers
        Layers of the report decoder.
    max_report_tokens
        Longest report the decoder produces, special tokens included.
    num_labels
        Number of abnormalities.
    """

    name: ConfigName
    preprocess: PreprocessConfig
    resnet_widths: tuple[int, int, int, int]
    d_model: int
    heads: int
    scroll_window: int
    fusion_layers: int = 1
    decoder_layers: int = 2
    decoder_width: int = 0
    cls_hidden: int = 128
    max_report_tokens: int = 96
    dropout: float = 0.1
    num_labels: int = 10
    ablation: AblationConfig = field(default_factory=AblationConfig)

    def __post_init__(self) -> None:
        if self.preprocess.size[0] % 3:
            raise ValueError(
                f"preprocess.size[0] must be a multiple of 3, got {self.preprocess.size[0]}"
            )
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")
        if any(s % 32 for s in self.preprocess.size[1:]):
            raise ValueError(f"in-plane size {self.preprocess.size[1:]} must be a multiple of 32")

    @property
    def triplets(self) -> int:
        """Number of slice triplets (tokens) along axis 0."""
        return self.preprocess.size[0] // 3

    def with_ablation(self, **switches: bool) -> UniCTConfig:
        """A copy with some ablation switches changed."""
        return replace(self, ablation=replace(self.ablation, **switches))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (stored in checkpoints and the model card)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UniCTConfig:
        """Inverse of :meth:`to_dict`."""
        pre = data["preprocess"]
        return cls(
            **{
                **{k: v for k, v in data.items() if k not in ("preprocess", "ablation")},
                "preprocess": PreprocessConfig(
                    spacing_mm=tuple(pre["spacing_mm"]),
                    size=tuple(pre["size"]),
                    hu_window=tuple(pre["hu_window"]),
                    offset=float(pre["offset"]),
                    orientation=str(pre["orientation"]),
                ),
                "resnet_widths": tuple(data["resnet_widths"]),
                "ablation": AblationConfig(**data.get("ablation", {})),
            }
        )


SMALL = UniCTConfig(
    name="small",
    preprocess=PreprocessConfig(spacing_mm=(4.5, 3.0, 3.0), size=(72, 128, 128)),
    resnet_widths=(16, 32, 64, 128),
    d_model=128,
    heads=4,
    scroll_window=5,
    fusion_layers=1,
    decoder_layers=2,
    cls_hidden=64,
)

FULL = UniCTConfig(
    name="full",
    preprocess=PreprocessConfig(spacing_mm=(1.5, 0.75, 0.75), size=(240, 480, 480)),
    resnet_widths=(64, 128, 256, 512),
    d_model=512,
    heads=8,
    scroll_window=15,
    fusion_layers=2,
    decoder_layers=3,
    cls_hidden=128,
)


#: Toy sizes for smoke runs and CI (``train --config tiny``): never a model to ship.
TINY = UniCTConfig(
    name="tiny",
    preprocess=PreprocessConfig(spacing_mm=(12.0, 6.0, 6.0), size=(12, 64, 64)),
    resnet_widths=(8, 16, 32, 64),
    d_model=64,
    heads=4,
    scroll_window=2,
    fusion_layers=1,
    decoder_layers=1,
    cls_hidden=32,
    max_report_tokens=64,
)

#: The configurations by name.
CONFIGS: dict[str, UniCTConfig] = {"small": SMALL, "full": FULL, "tiny": TINY}


def get_config(name: str) -> UniCTConfig:
    """The configuration called ``name`` (``"small"``, ``"full"`` or ``"tiny"``)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown UniCT configuration {name!r}; choose {', '.join(CONFIGS)}"
        ) from None
