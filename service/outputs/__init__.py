"""DICOM outputs of an analysis: the SEG (:mod:`.seg`) and the TID 1500 SR (:mod:`.sr`)."""

from service.outputs.seg import build_seg
from service.outputs.sr import build_sr

__all__ = ["build_seg", "build_sr"]
