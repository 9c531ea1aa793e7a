"""Solvers over permutations and continuous variables that know nothing about neural networks.

Linear assignment (exact and its LP relaxation), the Birkhoff polytope (projection, Birkhoff–von Neumann
decomposition and sampling), the proximal alternating minimisation solver :class:`PAM` and the quadratic
assignment problem.

The functions that take matrices (assignment, Birkhoff, QAP, shuffled regression, and the constructors of
:class:`QAPProblem` and :class:`ShuffledRegressionProblem`) accept numpy arrays and other numeric array-likes
as well as tensors, and answer in the caller's kind: when none of the matrix arguments is a ``torch.Tensor``,
every tensor of the result (also the fields of a result dataclass) is a numpy array of the same dtype; with
tensors, results are tensors on the input's device, as before. :class:`PAM` and :func:`pam` work on a
:class:`PermutationProblem` written in torch and stay torch-only.
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
    BirkhoffStep,
    ExactStep,
    FunctionProblem,
    LinearizedStep,
    PAMResult,
    PAMState,
    PermutationProblem,
    PStep,
    p_step,
    pam,
    resolve_ties,
)
from neuralign.optim.problems import ShuffledRegressionProblem, solve_shuffled_regression
from neuralign.optim.qap import (
    QAP_LOCAL_SEARCHES,
    QAP_METHODS,
    TABU_ITERATIONS,
    QAPProblem,
    QAPResult,
    TwoOptResult,
    local_search_2opt,
    qap_objective,
    solve_qap,
    tabu_search,
)
from neuralign.optim.qaplib import load_qaplib, load_qaplib_solution, qaplib_path
from neuralign.optim.sinkhorn import sinkhorn

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
    "BirkhoffStep",
    "ExactStep",
    "LinearizedStep",
    "PStep",
    "p_step",
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
    "QAP_LOCAL_SEARCHES",
    "TABU_ITERATIONS",
    "QAPProblem",
    "QAPResult",
    "TwoOptResult",
    "load_qaplib",
    "load_qaplib_solution",
    "local_search_2opt",
    "qaplib_path",
    "qap_objective",
    "solve_qap",
    "tabu_search",
    "sinkhorn",
]
