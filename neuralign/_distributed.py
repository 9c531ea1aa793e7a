"""Data parallelism over torch.distributed's default process group: the few helpers the data-driven functions share.

When a default process group with more than one rank is initialised (by ``torchrun`` through the command line, or
by the caller), :func:`~neuralign.experiments.train_model`, :func:`~neuralign.curves.fit_curve`,
:func:`~neuralign.curves.fit_curve_pam`, :func:`~neuralign.curves.reestimate_bn`,
:func:`~neuralign.curves.evaluate_curve`, :func:`~neuralign.curves.evaluate_model` and
:func:`~neuralign.alignment.align` run data-parallel; otherwise every helper here is a no-op and the functions run
exactly as in one process.

Design
------
Every rank iterates **the same global loader** (built with the same seed, so the same global batches in the same
order, by construction; :func:`check_same_batch` refuses a run whose ranks' first batches differ). Gradient steps
keep each rank's slice of each batch (:func:`shard_batch`: contiguous slices whose sizes differ by at most one).
Passes without a gradient step (batch-norm re-estimation, evaluation) instead give each rank **whole batches,
round-robin** (:func:`owns_batch`: rank ``r`` of ``W`` takes batches ``r, r + W, ...``), so that every per-batch
statistic, in particular the batch statistics batch norm sees in train mode, is exactly the one-process one and the
all-reduced sums equal one process's, whatever the world size. Both give ``DistributedSampler`` semantics (each
sample of a global batch is seen by exactly one rank; the epoch order is the seed's) without touching the loaders,
their resumable state or their augmentation. What it costs: every rank loads and augments every global batch
(round-robin passes skip the batches of the other ranks after loading them), so the data pipeline is not divided by the
world size (cheap for the in-memory :class:`~neuralign.experiments.ArrayLoader`; with a slow decoding pipeline put
the loading on more workers).

Sums (losses, correct counts, batch-norm sums, activation moments) are all-reduced in float64. Gradients: each
rank weights its mean loss by its share :math:`n_r / N` of the global batch, so that the all-reduced **sum** of the
ranks' gradients is the gradient of the global batch's mean loss even when the slices differ in size. Batch norm
in train mode normalises with the statistics of the rank's slice, as under ``DistributedDataParallel`` without
``SyncBatchNorm``. Every file is written by rank 0 alone: :func:`neuralign._utils.atomic_write` runs its write
through :func:`on_rank_zero`, which also makes every rank wait for the write and raise its error, so that all
ranks see the same files at the same point of the program.

The backend follows the device: NCCL for CUDA, gloo for the CPU (:func:`backend_for`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_",
    "all_reduce_sum",
    "backend_for",
    "broadcast_",
    "check_same_batch",
    "close",
    "describe",
    "init_from_env",
    "is_distributed",
    "on_rank_zero",
    "owns_batch",
    "rank",
    "shard_batch",
    "sum_gradients_",
    "world_size",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def backend_for(device: torch.device | str) -> str:
    """``"nccl"`` for a CUDA device, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def describe() -> dict[str, Any]:
    """``{"world_size", "backend", "rank"}`` of the default group (``1, None, 0`` without one), for manifests."""
    if dist.is_available() and dist.is_initialized():
        return {"world_size": dist.get_world_size(), "backend": str(dist.get_backend()), "rank": dist.get_rank()}
    return {"world_size": 1, "backend": None, "rank": 0}


def init_from_env(device: torch.device | str) -> bool:
    """Initialise the default process group from ``torchrun``'s environment; True if one is (now) initialised.

    Does nothing without ``WORLD_SIZE`` in the environment or when a group already exists. The backend follows
    ``device`` (:func:`backend_for`); on CUDA the process takes the GPU ``LOCAL_RANK``.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def close() -> None:
    """Wait for every rank, then destroy the default process group (nothing without one).

    The barrier keeps any rank from tearing down its connections while another still uses them: a gloo rank whose
    peer had already shut down was seen to abort at exit (``terminate called without an active exception``).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_batch(
    x: torch.Tensor, y: torch.Tensor | None = None, *, label: str = "loader"
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """This rank's slice of a global batch, and its share ``n_r / N`` of the batch (``x, y, 1.0`` in one process).

    Rank ``r`` of ``W`` keeps the ``r``-th of ``torch.tensor_split(batch, W)`` (contiguous; sizes differ by one
    at most).

    Raises
    ------
    ValueError
        If the batch has fewer samples than there are ranks (some rank would have nothing to compute on).
    """
    if not is_distributed():
        return x, y, 1.0
    n, size = int(x.shape[0]), world_size()
    if n < size:
        raise ValueError(
            f"`{label}` yielded a batch of {n} samples, which cannot be split over {size} ranks; choose a batch size "
            f"and a data-set size (e.g. --batch-size, --train-size) for which every batch, the last one included, "
            f"has at least {size} samples"
        )
    r = rank()
    xs = torch.tensor_split(x, size)[r]
    ys = torch.tensor_split(y, size)[r] if y is not None else None
    return xs, ys, int(xs.shape[0]) / n


def owns_batch(index: int) -> bool:
    """Whether this rank takes global batch ``index`` in a round-robin pass (rank ``r`` of ``W`` takes the batches
    ``r, r + W, r + 2W, ...``); always True in one process."""
    return not is_distributed() or index % world_size() == rank()


def _checksum(t: torch.Tensor) -> list[float]:
    flat = t.detach().reshape(-1).to(torch.float64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) / max(flat.numel(), 1)
    return [float(flat.numel()), float(flat.sum()), float((flat * weights).sum())]


def check_same_batch(x: torch.Tensor, y: torch.Tensor | None = None, *, label: str = "loader") -> None:
    """Refuse ranks whose loaders yield different global batches (no-op in one process).

    Every rank must call it with its (unsharded) first global batch; a checksum of the inputs and targets (size,
    sum and a position-weighted sum, in float64) is compared across the ranks with one all-reduce, so a loader
    built with another seed (another order) on some rank is caught.

    Raises
    ------
    ValueError
        On every rank, if the checksums differ (relative 1e-6, far above the rounding of equal data).
    """
    if not is_distributed():
        return
    parts = _checksum(x) + (_checksum(y) if isinstance(y, torch.Tensor) else [0.0, 0.0, 0.0])
    local = torch.tensor(parts, dtype=torch.float64)
    both = all_reduce_(torch.cat([local, -local]), dist.ReduceOp.MAX)
    high, low = both[: len(parts)], -both[len(parts) :]
    if not torch.all((high - low).abs() <= 1e-6 * torch.maximum(high.abs(), low.abs()).clamp_min(1.0)):
        raise ValueError(
            f"`{label}` yields different first batches on different ranks: under a process group every rank must "
            "iterate the same global loader (same data, batch size and seed)"
        )


def _comm_device(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return t.device if t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` in place over the default group (no-op in one process); returns it.

    The tensor travels to the backend's device (CPU for gloo, CUDA for NCCL) and back when it lives elsewhere.
    """
    if not is_distributed():
        return tensor
    device = _comm_device(tensor)
    if tensor.device == device:
        dist.all_reduce(tensor, op=op)
    else:
        moved = tensor.to(device)
        dist.all_reduce(moved, op=op)
        tensor.copy_(moved)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks, in float64 (a new tensor on ``tensor``'s device; a float64 copy in one
    process)."""
    return all_reduce_(tensor.detach().to(torch.float64, copy=True))


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (no-op in one process)."""
    if not is_distributed():
        return
    with torch.no_grad():
        _broadcast(tensors, src)


def _broadcast(tensors: Sequence[torch.Tensor], src: int) -> None:
    for t in tensors:
        device = _comm_device(t)
        moved = t if t.device == device else t.to(device)
        dist.broadcast(moved, src=src)
        if moved is not t:
            t.copy_(moved)


def on_rank_zero(fn: Callable[[], T]) -> T:
    """Run ``fn()`` on rank 0 only; every rank gets its result, or raises its exception, after it has finished.

    In one process this is ``fn()``. Under a process group it is a collective: every rank must call it at the same
    point (as every rank runs the same program, this holds for the library's writes). The result and any exception
    travel by pickling (``torch.distributed.broadcast_object_list``).
    """
    if not is_distributed():
        return fn()
    outcome: list[Any] = [None]
    if rank() == 0:
        try:
            outcome[0] = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 - every rank must learn of the failure, then raise it
            outcome[0] = ("error", exc)
        try:
            pickle.dumps(outcome[0])
        except Exception as exc:  # noqa: BLE001 - an unpicklable result or exception would stall the other ranks
            outcome[0] = ("error", RuntimeError(f"rank 0 could not share the outcome of its write: {exc}"))
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def sum_gradients_(parameters: Sequence[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """Sum the ``.grad`` of ``parameters`` over the ranks in place, with a scalar ``value``, in one all-reduce.

    Returns the summed ``value`` (``value`` itself in one process). Used with losses weighted by each rank's share
    of the batch, so that the summed gradients are the global batch's and the summed loss its mean loss (every rank
    sees the same loss, so a non-finite one stops all ranks alike). Parameters without a gradient are left out (the
    same on every rank, as every rank runs the same program).
    """
    if not is_distributed():
        return value
    grads = [p.grad for p in parameters if p.grad is not None]
    dtype = grads[0].dtype if grads else value.dtype
    flat = torch.cat([g.reshape(-1) for g in grads] + [value.detach().reshape(1).to(dtype)])
    all_reduce_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1]
