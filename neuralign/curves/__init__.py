"""Curves between networks on unmodified modules (Garipov et al. 2018, arXiv:1802.10026; Tatro et al. 2020,
arXiv:2009.02439).

A curve (:class:`Line`, :class:`Bezier`, :class:`PolyChain`) holds its points as one flat buffer and gives the
weights :math:`w(t)` as a dict; any ``nn.Module`` is evaluated there with :func:`torch.func.functional_call`, never
edited. :func:`fit_curve` trains the control points, :func:`reestimate_bn` recomputes batch-norm statistics at given
weights, :func:`evaluate_curve` and :func:`evaluate_plane` measure loss and accuracy along a curve or over a plane,
:func:`midpoint_alignment` aligns the network at a point of a curve to its end points.
:func:`evaluate_interpolation` evaluates the segment between two end points under one
:class:`InterpolationProtocol` (both barrier definitions, area under the curve, batch norm re-estimated, interpolated
or REPAIRed by :func:`repair`).
"""

from __future__ import annotations

from neuralign.curves.along import MidpointAlignment, midpoint_alignment
from neuralign.curves.bn import reestimate_bn
from neuralign.curves.evaluate import (
    CurveEvaluation,
    PlaneEvaluation,
    arc_length,
    arc_length_average,
    evaluate_curve,
    evaluate_plane,
    project_to_plane,
)
from neuralign.curves.families import CURVE_FAMILIES, Bezier, Curve, Line, PolyChain
from neuralign.curves.fit import CurveResult, fit_curve, garipov_lr_factor, paper_lr_factor
from neuralign.curves.metrics import evaluate_model
from neuralign.curves.pam import CurvePAMOptions, CurvePAMResult, fit_curve_pam
from neuralign.curves.problem import CurvePermutationProblem
from neuralign.curves.protocol import (
    BARRIER_DEFINITIONS,
    BN_MODES,
    InterpolationProtocol,
    InterpolationResult,
    SplitSummary,
    area_under_curve,
    barrier,
    evaluate_interpolation,
)
from neuralign.curves.repair import RepairStatistics, repair, repair_points, repair_statistics

__all__ = [
    "Curve",
    "Line",
    "Bezier",
    "PolyChain",
    "CURVE_FAMILIES",
    "fit_curve",
    "fit_curve_pam",
    "CurvePAMOptions",
    "CurvePAMResult",
    "CurvePermutationProblem",
    "evaluate_model",
    "CurveResult",
    "paper_lr_factor",
    "garipov_lr_factor",
    "reestimate_bn",
    "evaluate_curve",
    "CurveEvaluation",
    "arc_length",
    "arc_length_average",
    "evaluate_plane",
    "PlaneEvaluation",
    "project_to_plane",
    "midpoint_alignment",
    "MidpointAlignment",
    "InterpolationProtocol",
    "InterpolationResult",
    "SplitSummary",
    "BARRIER_DEFINITIONS",
    "BN_MODES",
    "barrier",
    "area_under_curve",
    "evaluate_interpolation",
    "repair",
    "repair_statistics",
    "repair_points",
    "RepairStatistics",
]
