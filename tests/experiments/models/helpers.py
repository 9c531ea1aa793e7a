"""Helpers shared by the zoo's tests."""

from __future__ import annotations

from torch import nn


def n_params(model: nn.Module) -> int:
    """Number of parameters (weights, biases, batch-norm affine terms; no buffers)."""
    return sum(p.numel() for p in model.parameters())
