"""Checks that can fail: functional equivalence of permuted models, Taylor tests of gradients, and the local
optimality of an alignment for the joint curve objective."""

from neuralign.verification.equivalence import EquivalenceResult, check_equivalence
from neuralign.verification.gradient import TaylorResult, taylor_test
from neuralign.verification.local import (
    CHECKS,
    MIN_HELDOUT_EXAMPLES,
    CheckResult,
    VerificationOptions,
    VerificationReport,
    swap_estimates,
    verify_alignment,
    wilson_interval,
)

__all__ = [
    "CHECKS",
    "MIN_HELDOUT_EXAMPLES",
    "CheckResult",
    "EquivalenceResult",
    "TaylorResult",
    "VerificationOptions",
    "VerificationReport",
    "check_equivalence",
    "swap_estimates",
    "taylor_test",
    "verify_alignment",
    "wilson_interval",
]
