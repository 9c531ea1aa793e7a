"""Permutation specs (traced with torch.fx or hand-built), applying permutations, and neuron alignment."""

from neuralign.alignment.align import ALIGNMENT_METHODS, AlignmentResult, align, weight_similarity
from neuralign.alignment.io import (
    FORMAT_VERSION,
    PermutationFile,
    load_permutation_file,
    save_permutation_file,
    state_dict_hash,
    state_dict_layout,
)
from neuralign.alignment.learned import (
    LEARNED_METHODS,
    LearnedCost,
    LearnedOptions,
    LearnedResult,
    learn_permutation,
    learned_from_weight_matching,
    sinkhorn_rebasin,
    straight_through,
)
from neuralign.alignment.permutation import (
    Permutation,
    apply_permutation,
    apply_permutation_matrices,
    compose_permutations,
    heads_permutation,
    identity_permutation,
    invert_permutation,
    permutation_distance,
    random_permutation,
    split_heads_permutation,
    validate_permutation,
)
from neuralign.alignment.spec import Heads, PermutationSpec, Segment, SpecBuilder, Tap, spec_from_axes
from neuralign.alignment.stats import ActivationMoments, activation_moments
from neuralign.alignment.trace import trace_spec

__all__ = [
    "FORMAT_VERSION",
    "PermutationFile",
    "load_permutation_file",
    "save_permutation_file",
    "state_dict_hash",
    "state_dict_layout",
    "ALIGNMENT_METHODS",
    "ActivationMoments",
    "AlignmentResult",
    "activation_moments",
    "align",
    "weight_similarity",
    "LEARNED_METHODS",
    "LearnedCost",
    "LearnedOptions",
    "LearnedResult",
    "learn_permutation",
    "learned_from_weight_matching",
    "sinkhorn_rebasin",
    "straight_through",
    "Heads",
    "heads_permutation",
    "split_heads_permutation",
    "Permutation",
    "PermutationSpec",
    "Segment",
    "SpecBuilder",
    "Tap",
    "apply_permutation",
    "apply_permutation_matrices",
    "compose_permutations",
    "identity_permutation",
    "invert_permutation",
    "permutation_distance",
    "random_permutation",
    "spec_from_axes",
    "trace_spec",
    "validate_permutation",
]
