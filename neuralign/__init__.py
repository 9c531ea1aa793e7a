"""neuralign: optimisation over permutations and curves for neuron alignment and mode connectivity.

The library (five packages, none of which imports the top floor: ``experiments``, ``study``, ``cli``):

- :mod:`neuralign.optim`: solvers over permutations and continuous variables (linear assignment, Birkhoff polytope,
  proximal alternating minimisation, QAP) that know nothing about neural networks;
- :mod:`neuralign.alignment`: permutation specs traced from any network with torch.fx, applying permutations, and
  neuron alignment by activation correlation, L2 or weight matching;
- :mod:`neuralign.curves`: curves between networks on unmodified modules, fitting, batch-norm re-estimation,
  evaluation, loss planes, and PAM on curves;
- :mod:`neuralign.verification`: checks that can fail (functional equivalence, Taylor tests, local optimality of
  an alignment);
- :mod:`neuralign.attacks`: L-infinity PGD against a network at given weights (robust end points and curves);

and the top floor: :mod:`neuralign.experiments` (reusable tools: data, models, training recipes, checkpoint
formats, the run-folder policy), :mod:`neuralign.study` (the paper's protocols, their results, report and plots, the
job executors) and :mod:`neuralign.cli` (the ``neuralign`` command line). The layers and the rules between them are
in the README's "Architecture" section and ``.importlinter``. Reference: Tatro et al., "Optimizing Mode Connectivity
via Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.

The public names below are imported on first use (PEP 562), so that ``import neuralign`` and ``neuralign
--version`` cost no torch; ``neuralign.__version__`` is always there.
"""

from __future__ import annotations

import importlib
from typing import Any

from neuralign._version import __version__

# the public names by home module (imported on first use, PEP 562); __all__ is read from here
_EXPORTS = {
    "neuralign.status": ("Status",),
    "neuralign.attacks": ("PGD", "pgd_attack"),
    "neuralign.alignment": ("AlignmentResult", "PermutationSpec", "SpecBuilder", "align", "apply_permutation",
                            "compose_permutations", "identity_permutation", "invert_permutation", "random_permutation",
                            "trace_spec"),
    "neuralign.curves": ("Bezier", "CurveEvaluation", "CurvePAMResult", "CurveResult", "Line", "PolyChain",
                         "evaluate_curve", "evaluate_model", "evaluate_plane", "fit_curve", "fit_curve_pam",
                         "reestimate_bn"),
    "neuralign.optim": ("PAM", "PAMResult", "pam", "solve_assignment", "solve_qap"),
    "neuralign.verification": ("VerificationReport", "check_equivalence", "verify_alignment"),
}  # fmt: skip
_HOMES = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["__version__", "errors", *_HOMES]
# the modules that ``import neuralign`` bound as attributes before its names were lazy
_SUBMODULES = ("alignment", "attacks", "curves", "errors", "optim", "status", "verification")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # the import binds it here
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
