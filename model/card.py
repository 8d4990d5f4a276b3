"""The model card: identity, intended use, input geometry, labels and thresholds.

It is a JSON file next to the checkpoint (``model_card.json``). The node reads the label
set, codes, colours and per-class thresholds from it, and writes its name and version
into the SEG's algorithm identification and the SR's contributing equipment.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.config import UniCTConfig
from model.labels import DEFAULT_LABELS, Abnormality, CodedConcept, default_abnormality

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE. Research and engineering demonstration only."


@dataclass(frozen=True)
class LabelCard:
    """One abnormality as the card carries it, with its decision and mask thresholds."""

    abnormality: Abnormality
    threshold: float
    """Probability at or above which the finding is reported present."""
    mask_threshold: float = 0.5
    """Voxel probability above which a voxel is in the finding's mask (tuned on validation
    for the best Dice, like ``threshold`` for the best F1)."""


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint is, what it was trained on, and how to use its outputs."""

    name: str
    version: str
    config: UniCTConfig
    labels: tuple[LabelCard, ...]
    training_data: str
    intended_use: str
    clinical_use: str = NOT_FOR_CLINICAL_USE
    manufacturer: str = "UniCT Node project"
    training_command: str = ""
    checkpoint_file: str = "unict.pt"
    checkpoint_sha256: str = ""
    tokenizer_file: str = "tokenizer.json"
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """Per-class thresholds, in label order."""
        return tuple(lc.threshold for lc in self.labels)

    @property
    def mask_thresholds(self) -> tuple[float, ...]:
        """Per-class voxel thresholds of the masks, in label order."""
        return tuple(lc.mask_threshold for lc in self.labels)

    @property
    def abnormalities(self) -> tuple[Abnormality, ...]:
        """The label set, in output order."""
        return tuple(lc.abnormality for lc in self.labels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["input"] = {
            "orientation": self.config.preprocess.orientation,
            "spacing_mm": list(self.config.preprocess.spacing_mm),
            "size": list(self.config.preprocess.size),
            "hu_window": list(self.config.preprocess.hu_window),
            "scaling": f"(clip(hu, {self.config.preprocess.hu_window[0]:g}, {self.config.preprocess.hu_window[1]:g}) + 1000) / 1200 + ({self.config.preprocess.offset})",
        }
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        known = {f for f in cls.__dataclass_fields__}
        extra = set(data) - known - {"input"}
        if extra:
            raise ValueError(f"model card has unknown keys: {sorted(extra)}")
        labels = tuple(
            LabelCard(
                abnormality=_abnormality(lc["abnormality"]),
                threshold=float(lc["threshold"]),
                mask_threshold=float(lc.get("mask_threshold", 0.5)),
            )
            for lc in data["labels"]
        )
        rest = {k: v for k, v in data.items() if k not in ("config", "labels", "input")}
        return cls(config=UniCTConfig.from_dict(data["config"]), labels=labels, **rest)

    def to_markdown(self) -> str:
        """A human-readable card (MODEL_CARD.md) with the same content as the JSON."""
        pre = self.config.preprocess
        lines = [
            f"# Model card: {self.name} {self.version}",
            "",
            f"**{self.clinical_use}**",
            "",
            f"- Manufacturer: {self.manufacturer}",
            f"- Configuration: `{self.config.name}` (input {' x '.join(map(str, pre.size))} voxels "
            f"at {' x '.join(f'{s:g}' for s in pre.spacing_mm)} mm, orientation {pre.orientation}, "
            f"HU window [{pre.hu_window[0]:g}, {pre.hu_window[1]:g}], scaled (hu + 1000) / 1200 + ({pre.offset:g}))",
            f"- Weights: `{self.checkpoint_file}` (SHA-256 `{self.checkpoint_sha256}`), tokenizer `{self.tokenizer_file}`",
            "",
            "## Intended use",
            "",
            self.intended_use,
            "",
            "## Training data",
            "",
            self.training_data,
            "",
            "## Training command",
            "",
            f"```\n{self.training_command}\n```",
            "",
            "## Labels, codes and thresholds",
            "",
            "| code | abnormality | concept | reported as | threshold | mask threshold | colour |",
            "|---|---|---|---|---|---|---|",
        ]
        for lc in self.labels:
            a = lc.abnormality
            lines.append(
                f'| {a.code} | {a.name} | {a.concept.scheme} {a.concept.value} "{a.concept.meaning}" '
                f"| {_reported_as(a)} | {lc.threshold:.2f} | {lc.mask_threshold:.2f} | rgb{a.color_rgb} |"
            )
        if self.metrics:
            lines += ["", "## Evaluation", "", "```json", json.dumps(self.metrics, indent=2), "```"]
        return "\n".join(lines) + "\n"

    def save(self, path: Path) -> None:
        """Write the card as indented JSON."""
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """Read a card written by :meth:`save`."""
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _reported_as(a: Abnormality) -> str:
    if a.pattern == "diffuse":
        return f"extent ({a.site})"
    sizes = [f">= {a.min_diameter_mm:g} mm"] if a.min_diameter_mm else []
    sizes += [f">= {a.min_volume_ml:g} mL"] if a.min_volume_ml else []
    return f"lesions ({a.site}{', ' + ', '.join(sizes) if sizes else ''})"


def _abnormality(data: dict[str, Any]) -> Abnormality:
    """An abnormality of a card; cards written before ``pattern``, ``site`` and the minimum
    sizes existed take them from the default label of the same key (else focal, lung)."""
    default = default_abnormality(data["key"])
    fallback = {
        "pattern": default.pattern if default else "focal",
        "site": default.site if default else "lung",
        "min_diameter_mm": default.min_diameter_mm if default else 0.0,
        "min_volume_ml": default.min_volume_ml if default else 0.0,
    }
    pattern, site = data.get("pattern", fallback["pattern"]), data.get("site", fallback["site"])
    if pattern not in ("focal", "diffuse"):
        raise ValueError(f"label {data['key']!r}: pattern must be focal or diffuse, not {pattern!r}")
    if site not in ("lung", "pleura"):
        raise ValueError(f"label {data['key']!r}: site must be lung or pleura, not {site!r}")
    return Abnormality(
        code=data["code"],
        key=data["key"],
        name=data["name"],
        concept=CodedConcept(**data["concept"]),
        color_rgb=tuple(data["color_rgb"]),
        pattern=pattern,
        site=site,
        min_diameter_mm=float(data.get("min_diameter_mm", fallback["min_diameter_mm"])),
        min_volume_ml=float(data.get("min_volume_ml", fallback["min_volume_ml"])),
    )


def default_labels(threshold: float = 0.5) -> tuple[LabelCard, ...]:
    """The default label set with one threshold for all classes."""
    return tuple(LabelCard(a, threshold) for a in DEFAULT_LABELS)
