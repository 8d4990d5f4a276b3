"""The pipeline stages a job goes through, as recorded with its timings and failures."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Stage"]


class Stage(StrEnum):
    """Pipeline stages, as recorded with a job's timings and failures."""

    RECEIVE = "receive"
    ASSEMBLY = "assembly"
    SELECTION = "selection"
    LOAD = "load"
    PREPROCESS = "preprocess"
    INFER = "infer"
    POSTPROCESS = "postprocess"
    ENCODE = "encode"
    SEND = "send"
