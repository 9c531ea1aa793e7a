"""Solvers over permutations and continuous variables that know nothing about neural networks.

Linear assignment (exact and its LP relaxation), the Birkhoff polytope (projection, Birkhoff–von Neumann
decomposition and sampling), the proximal alternating minimisation solver :class:`PAM` and the quadratic
assignment problem.
"""

from __future__ import annotations

from neuralign.optim.assignment import (
    AssignmentLPResult,
    AssignmentResult,
    StepBoundResult,
    assignment_duals,
    proximal_step_bound,
    solve_assignment,
    solve_assignment_lp,
    solve_assignments,
)
from neuralign.optim.birkhoff import (
    BirkhoffDecomposition,
    birkhoff_decomposition,
    is_permutation,
    matrix_to_perm,
    nearest_permutation,
    perm_to_matrix,
    project_doubly_stochastic,
    project_unit_marginals,
    sample_permutations,
)
from neuralign.optim.pam import (
    DEFAULT_X_LR,
    PAM,
    PAM_METHODS,
    FunctionProblem,
    PAMResult,
    PAMState,
    PermutationProblem,
    pam,
    resolve_ties,
)
from neuralign.optim.problems import ShuffledRegressionProblem, solve_shuffled_regression
from neuralign.optim.qap import (
    QAP_METHODS,
    QAPProblem,
    QAPResult,
    TwoOptResult,
    load_qaplib,
    load_qaplib_solution,
    local_search_2opt,
    qap_objective,
    solve_qap,
)

__all__ = [
    "StepBoundResult",
    "proximal_step_bound",
    "AssignmentLPResult",
    "AssignmentResult",
    "assignment_duals",
    "solve_assignment",
    "solve_assignment_lp",
    "solve_assignments",
    "BirkhoffDecomposition",
    "birkhoff_decomposition",
    "is_permutation",
    "matrix_to_perm",
    "nearest_permutation",
    "perm_to_matrix",
    "project_doubly_stochastic",
    "project_unit_marginals",
    "sample_permutations",
    "DEFAULT_X_LR",
    "PAM",
    "PAM_METHODS",
    "FunctionProblem",
    "PAMResult",
    "PAMState",
    "PermutationProblem",
    "pam",
    "resolve_ties",
    "ShuffledRegressionProblem",
    "solve_shuffled_regression",
    "QAP_METHODS",
    "QAPProblem",
    "QAPResult",
    "TwoOptResult",
    "load_qaplib",
    "load_qaplib_solution",
    "local_search_2opt",
    "qap_objective",
    "solve_qap",
]
