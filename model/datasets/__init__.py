"""Readers of public chest-CT datasets into one :class:`Sample` form.

* :func:`read_rexgroundingct`: ReXGroundingCT findings, categories and per-finding
  masks on CT-RATE volumes -> masks and presence of the ten UniCT labels, findings text.
* :func:`read_ctrate`: CT-RATE volumes with ``metadata.csv`` rescale and spacing,
  reports, and the 18 report-derived labels mapped to the ten where a mapping exists.
* :func:`read_radchestct`: RAD-ChestCT ``.npz`` volumes (``arr_0``, axial first).

Every sample is in the node's array convention (:mod:`model.datasets.sample`);
:func:`to_model_input` applies the same preprocessing as training and inference.
:mod:`model.phantom.layouts` writes phantoms in these layouts for tests.
"""

from model.datasets.ctrate import read_ctrate
from model.datasets.radchestct import read_radchestct
from model.datasets.rexgroundingct import read_rexgroundingct
from model.datasets.sample import Sample, canonical_axes, to_model_input

__all__ = [
    "Sample",
    "canonical_axes",
    "read_ctrate",
    "read_radchestct",
    "read_rexgroundingct",
    "to_model_input",
]
