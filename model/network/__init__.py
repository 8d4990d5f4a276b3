"""The UniCT network: encoder, task adapters, fusion, modulation and heads."""

from model.network.unict import UniCT, UniCTOutput

__all__ = ["UniCT", "UniCTOutput"]
