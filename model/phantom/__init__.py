"""Synthetic chest-CT phantoms with the ten UniCT abnormalities, their masks and reports.

A case is drawn as a grid-independent :class:`CaseSpec` (analytic anatomy in mm plus
lesions), then rendered on a :class:`Grid`: coarse and fast for training
(:func:`training_grid`), or clinical-looking 512 x 512 thin slices (:func:`realistic_grid`).

>>> from model.phantom import generate, read_findings
>>> phantom = generate(7)
>>> bool((read_findings(phantom.report) == phantom.present).all())
True
"""

from model.phantom.case import CaseSpec, Phantom, sample_case
from model.phantom.findings import Lesion
from model.phantom.generate import generate
from model.phantom.grid import Grid, realistic_grid, training_grid
from model.phantom.render import render
from model.phantom.reports import compose_report, read_findings

__all__ = [
    "CaseSpec",
    "Grid",
    "Lesion",
    "Phantom",
    "compose_report",
    "generate",
    "read_findings",
    "realistic_grid",
    "render",
    "sample_case",
    "training_grid",
]
