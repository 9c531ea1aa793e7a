"""Checks that can fail: functional equivalence of permuted models, local optimality of an alignment."""

from neuralign.verification.equivalence import EquivalenceResult, check_equivalence

__all__ = ["EquivalenceResult", "check_equivalence"]
