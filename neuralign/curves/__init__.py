"""Curves between networks on unmodified modules (Garipov et al. 2018, arXiv:1802.10026; Tatro et al. 2020,
arXiv:2009.02439).

A curve (:class:`Line`, :class:`Bezier`, :class:`PolyChain`) holds its points as one flat buffer and gives the
weights :math:`w(t)` as a dict; any ``nn.Module`` is evaluated there with :func:`torch.func.functional_call`, never
edited. :func:`fit_curve` trains the control points, :func:`reestimate_bn` recomputes batch-norm statistics at given
weights, :func:`evaluate_curve` and :func:`evaluate_plane` measure loss and accuracy along a curve or over a plane,
:func:`midpoint_alignment` aligns the network at a point of a curve to its end points.
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
]
