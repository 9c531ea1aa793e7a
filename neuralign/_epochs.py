"""One checkpoint for every resumable loop (end-point training, curve fitting, PAM on a curve).

:class:`EpochCheckpoint` writes, atomically, everything a loop needs to continue exactly where it stopped, in one
format with a version field:

- ``kind`` (which loop) and ``version`` (:data:`CHECKPOINT_VERSION`);
- ``config``: what must match for a resume (settings, shapes, fingerprints of the inputs); a checkpoint of another
  run is refused, naming the first entry that differs;
- ``objects``: the state of every stateful object of the loop (modules, optimizers, schedulers, solvers: their
  ``state_dict``; generators: their state; tensors: their values);
- ``rng``: torch's global CPU generator (dropout, default draws);
- ``loader``: the training loader's position (its ``state_dict`` at an epoch boundary, else its generator);
- ``data``: plain values (the epoch count, the history, ...).

A file of another kind, or written by neuralign before 0.2 (no version field), is refused by name, so that a run
never continues from state it cannot read correctly. Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuralign._utils import atomic_save, check_compatible, load_checkpoint
from neuralign.errors import CheckpointError

__all__ = ["CHECKPOINT_VERSION", "EpochCheckpoint", "loader_state", "restore_loader"]

#: Version of the checkpoint format written by :class:`EpochCheckpoint` (1 was each loop's own, before 0.2).
CHECKPOINT_VERSION = 2


def loader_state(loader: Any, at_epoch_end: bool = True) -> dict[str, Any] | None:
    """The position of ``loader``: its ``state_dict()`` at an epoch boundary (a stateful loader), else the state of
    its ``generator`` (an epoch cut short leaves a stateful loader mid-epoch, and restoring that would resume the
    cut epoch; between epochs only the generator matters, the next epoch starts from it); None for a plain
    iterable."""
    if at_epoch_end and hasattr(loader, "state_dict") and callable(loader.state_dict):
        return {"kind": "state_dict", "state": loader.state_dict()}
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        return {"kind": "generator", "state": gen.get_state()}
    return None


def restore_loader(loader: Any, saved: Mapping[str, Any] | None) -> None:
    """Put ``loader`` back at the position :func:`loader_state` recorded (nothing for None)."""
    if saved is None:
        return
    if saved["kind"] == "state_dict" and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(saved["state"])
    elif saved["kind"] == "generator" and isinstance(getattr(loader, "generator", None), torch.Generator):
        loader.generator.set_state(saved["state"])


def _snapshot(obj: Any) -> Any:
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if obj is None:
        return None
    return obj.state_dict()


def _same(saved: Any, now: Any) -> bool:
    if isinstance(now, torch.Tensor) or isinstance(saved, torch.Tensor):
        if not (isinstance(now, torch.Tensor) and isinstance(saved, torch.Tensor)) or saved.shape != now.shape:
            return False
        if now.is_floating_point():
            return bool(torch.allclose(saved.to(now), now, rtol=1e-9, atol=0.0))
        return bool(torch.equal(saved.to(now.device), now))
    if isinstance(now, Mapping) and isinstance(saved, Mapping):
        return set(saved) == set(now) and all(_same(saved[k], now[k]) for k in now)
    return saved == now


class EpochCheckpoint:
    """The checkpoint of one resumable loop at ``path`` (nothing is read or written when ``path`` is None).

    Parameters
    ----------
    path : path-like or None
        The checkpoint file.
    kind : str
        Which loop writes it (``"train_model"``, ``"fit_curve"``, ``"fit_curve_pam"``).
    config : mapping
        What must be equal for a resume: plain values compared with ``==``, tensors with ``torch.equal`` (floating
        point: relative tolerance 1e-9).
    objects : mapping
        The loop's stateful objects by name: modules, optimizers, schedulers, anything with ``state_dict`` /
        ``load_state_dict``, generators and tensors (restored in place).
    loader : iterable, optional
        The training loader, whose position is saved and restored (:func:`loader_state`).
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        kind: str,
        *,
        config: Mapping[str, Any],
        objects: Mapping[str, Any],
        loader: Any = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.kind = kind
        self.config = dict(config)
        self.objects = dict(objects)
        self.loader = loader

    def restore(self) -> dict[str, Any] | None:
        """If the checkpoint exists: check it, restore every object, torch's global RNG and the loader, and return
        its ``data``; None when there is no checkpoint.

        Raises
        ------
        CheckpointError
            For a file that is unreadable, of another kind, of an older format, or of another run (names the first
            ``config`` entry or object that differs).
        """
        if self.path is None or not self.path.exists():
            return None
        where = f"checkpoint {str(self.path)!r}"
        state = load_checkpoint(self.path)
        if state.get("kind") != self.kind:
            raise CheckpointError(f"{where} is of kind {state.get('kind')!r}, expected {self.kind!r}")
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{where} has format version {state.get('version')!r}, this neuralign reads version "
                f"{CHECKPOINT_VERSION} (it was written by an older neuralign): delete it to start over"
            )
        missing = [k for k in ("config", "objects", "rng", "loader", "data") if k not in state]
        if missing:
            raise CheckpointError(f"{where} lacks the entries {missing}")
        for key, value in self.config.items():
            if key not in state["config"] or not _same(state["config"][key], value):
                shown = state["config"].get(key)
                if isinstance(value, torch.Tensor) or isinstance(shown, torch.Tensor):
                    raise CheckpointError(f"{where} belongs to another run: its {key} entry differs from this run's "
                                          "(delete it or choose another path)")  # fmt: skip
                raise CheckpointError(f"{where} belongs to another run: its {key} is {shown!r}, this run's is "
                                      f"{value!r} (delete it or choose another path)")  # fmt: skip
        for name, obj in self.objects.items():
            saved = state["objects"].get(name)
            if obj is None or saved is None:
                continue
            if isinstance(obj, torch.Generator):
                obj.set_state(saved)
            elif isinstance(obj, torch.Tensor):
                with torch.no_grad():
                    obj.copy_(saved)
            else:
                if isinstance(obj, nn.Module):
                    try:
                        check_compatible(obj.state_dict(), saved, ("model", "checkpoint"))
                    except ValueError as exc:
                        raise CheckpointError(f"{where} belongs to another model: {exc}") from exc
                obj.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
        restore_loader(self.loader, state["loader"])
        return dict(state["data"])

    def save(self, data: Mapping[str, Any], *, at_epoch_end: bool = True) -> None:
        """Write the checkpoint atomically: the objects' states, torch's global RNG, the loader's position and
        ``data`` (plain values). Under a process group rank 0 writes."""
        if self.path is None:
            return
        atomic_save(
            {
                "kind": self.kind,
                "version": CHECKPOINT_VERSION,
                "config": self.config,
                "objects": {name: _snapshot(obj) for name, obj in self.objects.items()},
                "rng": torch.get_rng_state(),
                "loader": loader_state(self.loader, at_epoch_end),
                "data": dict(data),
            },
            self.path,
        )

    def remove(self) -> None:
        """Delete the checkpoint file (once the loop's result is written)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
