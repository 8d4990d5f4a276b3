"""UniCT inference in PyTorch: the network's forward pass and the greedy report decoder.

:class:`Predictor` runs the whole model on one preprocessed volume; it is what
``unict-node evaluate`` measures and what the PyTorch engine (:mod:`engines.pytorch`, the
reference every other backend is compared to) serves. :class:`ReportGenerator` is the one
report decoder every backend runs on the visual memory it computed, so report tokens are
produced the same way whatever ran the visual path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from model.bundle import ModelBundle
from model.network import UniCT
from model.network.heads import ReportDecoder
from model.network.unict import FINDINGS_SLOT
from model.prediction import Prediction
from model.tokenizer import Tokenizer

__all__ = ["Prediction", "Predictor", "ReportGenerator", "decoded_ids", "resolve_device"]

_REPORTER_PREFIX = "reporter."
_FINDINGS_PREFIX = "findings_token."


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when PyTorch sees a GPU, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def decoded_ids(ids: tuple[int, ...], eos: int) -> tuple[int, ...]:
    """Token ids up to (not including) the first EOS."""
    return ids[: ids.index(eos)] if eos in ids else ids


class ReportGenerator:
    """Greedy report decoding from the visual memory, in PyTorch.

    Parameters
    ----------
    decoder
        The report decoder (``UniCT.reporter``), in eval mode.
    tokenizer
        The bundle's tokenizer (BOS/EOS ids and detokenisation).
    max_len
        Longest report, special tokens included (the configuration's
        ``max_report_tokens``).
    """

    def __init__(
        self,
        decoder: ReportDecoder,
        tokenizer: Tokenizer,
        max_len: int,
        findings: torch.nn.Linear | None = None,
        thresholds: tuple[float, ...] = (),
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.findings = findings
        self.thresholds = thresholds

    @classmethod
    def from_bundle(
        cls, bundle: ModelBundle, device: str | torch.device = "cpu"
    ) -> ReportGenerator:
        """Only the decoder's weights of ``bundle``, float32, on ``device``.

        Backends that run the visual path elsewhere (ONNX Runtime, TensorRT) use this, so
        they do not hold a second copy of the encoder in memory.
        """
        cfg = bundle.card.config
        decoder = ReportDecoder(
            len(bundle.tokenizer), cfg.d_model, cfg.heads, cfg.decoder_layers, cfg.dropout
        )
        weights = {
            k[len(_REPORTER_PREFIX) :]: v.float()
            for k, v in bundle.state_dict.items()
            if k.startswith(_REPORTER_PREFIX)
        }
        decoder.load_state_dict(weights)
        findings = torch.nn.Linear(cfg.num_labels, cfg.d_model)
        findings.load_state_dict(
            {
                k[len(_FINDINGS_PREFIX) :]: v.float()
                for k, v in bundle.state_dict.items()
                if k.startswith(_FINDINGS_PREFIX)
            }
        )
        return cls(
            decoder.to(device).eval(),
            bundle.tokenizer,
            cfg.max_report_tokens,
            findings.to(device).eval(),
            bundle.card.thresholds,
        )

    def generate(
        self, memory: torch.Tensor, probabilities: npt.ArrayLike | None = None
    ) -> tuple[tuple[int, ...], str]:
        """Tokens (without BOS/EOS) and text for the first memory of a ``(B, M, d)`` batch.

        With ``probabilities`` (the first case's ``(L,)``), the findings token is made from
        the card's decisions (probability >= threshold) rather than the raw probabilities:
        the text then states exactly the findings the SR reports as present, and the
        decoder sees 0/1 findings as in training's teacher-forced batches.
        """
        param = next(self.decoder.parameters())
        memory = memory.to(device=param.device, dtype=param.dtype)
        if probabilities is not None and self.findings is not None and self.thresholds:
            p = np.asarray(probabilities, dtype=np.float32).reshape(-1)
            decided = torch.as_tensor(
                (p >= np.asarray(self.thresholds, dtype=np.float32)).astype(np.float32),
                device=param.device,
            )
            with torch.inference_mode():
                token = self.findings(decided[None].to(param.dtype))
            memory = memory[:1].clone()
            memory[:, FINDINGS_SLOT] = token
        with torch.inference_mode():
            tokens = self.decoder.greedy(
                memory, self.tokenizer.bos_id, self.tokenizer.eos_id, self.max_len
            )
        ids = tuple(int(t) for t in tokens[0].tolist())
        return decoded_ids(ids, self.tokenizer.eos_id), self.tokenizer.decode(ids)


class Predictor:
    """UniCT in PyTorch eager mode on CPU or CUDA, optionally through ``torch.compile``.

    Parameters
    ----------
    bundle
        The loaded checkpoint.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when present).
    half
        Run the visual path in FP16 (CUDA only).
    compile
        Wrap the network in ``torch.compile``.
    threads
        CPU threads (``torch.set_num_threads``); 0 leaves the default.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        device: str = "auto",
        half: bool = False,
        compile: bool = False,
        threads: int = 0,
    ) -> None:
        self.bundle = bundle
        self.device = resolve_device(device)
        self.half = half and self.device.type == "cuda"
        self.compile = compile
        self.threads = threads
        self._model: UniCT | None = None
        self._forward: Any = None
        self._report: ReportGenerator | None = None

    @property
    def loaded(self) -> bool:
        """True once :meth:`load` has run."""
        return self._model is not None

    def load(self) -> None:
        """Build the network from the bundle on the device. Idempotent."""
        if self._model is not None:
            return
        if self.threads:
            torch.set_num_threads(self.threads)
        model = self.bundle.build(self.device)
        # The decoder keeps float32 weights: greedy decoding is cheap and FP16 could change
        # an argmax, i.e. the report, against the reference.
        self._report = ReportGenerator(
            model.reporter,
            self.bundle.tokenizer,
            model.cfg.max_report_tokens,
            model.findings_token,
            self.bundle.card.thresholds,
        )
        if self.half:
            model.encoder.half()
            model.adapters.half()
            model.fusion.half()
            model.classifier.half()
            model.segmenter.half()
        self._forward = torch.compile(model) if self.compile else model
        self._model = model

    @property
    def model(self) -> UniCT:
        """The loaded network."""
        if self._model is None:
            raise RuntimeError("model not loaded: call load() first")
        return self._model

    def predict(self, image: npt.NDArray[np.float32]) -> Prediction:
        """Run UniCT on a ``(D, H, W)`` preprocessed volume (see :mod:`model.transforms`)."""
        self.load()
        assert self._report is not None
        x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32), device=self.device)[None]
        if self.half:
            x = x.half()
        with torch.inference_mode():
            out = self._forward(x)
            probs = torch.sigmoid(out.cls_logits.float())[0].cpu().numpy()
            tokens, text = self._report.generate(out.memory, probs)
            seg = torch.sigmoid(out.seg_logits.float())[0].cpu().numpy()
            attention = out.fusion_attention.float()[0].cpu().numpy()
        return Prediction(
            probabilities=probs.astype(np.float32),
            segmentation=seg.astype(np.float32),
            report_tokens=tokens,
            report_text=text,
            fusion_attention=attention.astype(np.float32),
        )
