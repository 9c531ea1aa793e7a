"""A small MLP and a planted copy of it, shared by the data-parallel and the GPU tests (each compares a function's
result on another engine with the one-process CPU result on these inputs)."""

from __future__ import annotations

import torch
from torch import nn


def small_mlp(seed: int) -> nn.Module:
    """6 -> 16 -> 12 -> 3 with ReLUs, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def planted_copy(a: nn.Module) -> nn.Module:
    """``a`` (a :func:`small_mlp`) with its hidden units permuted (seeded) and a little noise (std 0.01): alignment
    has a clear answer, with no near-ties that float rounding on another device or rank could flip."""
    g = torch.Generator().manual_seed(3)
    p0, p1 = torch.randperm(16, generator=g), torch.randperm(12, generator=g)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    sd["0.weight"], sd["0.bias"] = sd["0.weight"][p0], sd["0.bias"][p0]
    sd["2.weight"], sd["2.bias"] = sd["2.weight"][p1][:, p0], sd["2.bias"][p1]
    sd["4.weight"] = sd["4.weight"][:, p1]
    planted = small_mlp(0)
    planted.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()})
    return planted
