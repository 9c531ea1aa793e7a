"""Reading and writing model weights in the formats users bring: our end points, plain state dicts, safetensors.

Three formats are read, all as data (never unpickled objects):

- an end point written by ``neuralign train`` or :func:`~neuralign.experiments.run_study` (a ``.pt`` dict with
  ``kind="endpoint"``, the architecture and the state dict);
- a plain state dict in a ``.pt`` / ``.pth`` file, read with ``torch.load(weights_only=True)``, possibly wrapped:
  ``{"state_dict": {...}, ...}`` (Lightning, many training scripts), ``{"model": {...}, ...}`` (torchvision's
  reference scripts, timm's ``checkpoint-*.pth.tar``), and keys with the ``module.`` prefix of
  ``DistributedDataParallel``;
- a ``.safetensors`` file (via the ``safetensors`` package).

A wrapper or prefix is recognised, removed and reported in one line (:attr:`WeightsFile.note`); the weights are
then validated against the architecture key by key, naming the first missing, unexpected or mis-shaped entry.
:func:`write_weights` writes a state dict back in the layout it was read in (same wrapper, prefix and file type),
so that an aligned checkpoint loads wherever the original did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuralign._utils import atomic_save, atomic_write, load_checkpoint
from neuralign.alignment.io import state_dict_hash, state_dict_layout
from neuralign.errors import CheckpointError, ShapeMismatchError
from neuralign.experiments.models import build_model

__all__ = ["WeightsFile", "read_weights", "write_weights", "load_endpoint", "check_state_dict"]

_WRAPPERS = ("state_dict", "model")
_PREFIX = "module."
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class WeightsFile:
    """Weights read by :func:`read_weights`.

    Attributes
    ----------
    state_dict : dict str -> Tensor
        The weights, unwrapped, without a ``module.`` prefix, on the CPU, in the file's dtypes.
    format : {"endpoint", "state_dict", "safetensors"}
        What the file is.
    wrapper : str or None
        The key the state dict sat under (``"state_dict"``, ``"model"``), ``None`` if it was the whole file.
    prefix : str
        The prefix removed from every key (``"module."`` or ``""``).
    meta : dict
        Everything in the file besides the state dict (an end point's ``arch``, ``num_classes``, ``model_kwargs``,
        ``history``; a wrapped checkpoint's other entries; a safetensors file's string metadata).
    path : str
        Where it was read from.
    note : str
        One line saying how the file was read when it was wrapped or prefixed (``""`` otherwise).
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    wrapper: str | None = None
    prefix: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    note: str = ""


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_weights(path: str | os.PathLike) -> WeightsFile:
    """Read the weights of a model from an end point, a (wrapped) ``.pt`` / ``.pth`` state dict or safetensors.

    Parameters
    ----------
    path : path-like
        The file. ``.safetensors`` files are read with ``safetensors.torch.load_file``; anything else with
        ``torch.load(weights_only=True)`` (tensors, numbers, strings and containers only).

    Returns
    -------
    WeightsFile
        The unwrapped state dict (CPU tensors) and how it was stored.

    Raises
    ------
    CheckpointError
        Missing or unreadable file, a pickle of Python objects, or a dict in which no state dict (a dict of
        tensors, directly or under ``"state_dict"`` / ``"model"``) can be found. One line.
    """
    path = Path(path)
    label = str(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"checkpoint {label!r} does not exist")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = dict(fh.metadata() or {})
                state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {label!r} is not a readable safetensors file: {exc}") from exc
        if not state:
            raise CheckpointError(f"checkpoint {label!r} holds no tensors")
        return _unprefix(WeightsFile(state, "safetensors", meta=meta, path=label))
    obj = load_checkpoint(path)
    if obj.get("kind") == "endpoint":
        if not _is_state_dict(obj.get("state_dict")):
            raise CheckpointError(f"end point {label!r} lacks its state dict")
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        for key in ("arch", "num_classes", "model_kwargs"):
            if key not in meta:
                raise CheckpointError(f"end point {label!r} lacks the entry {key!r}")
        return WeightsFile(dict(obj["state_dict"]), "endpoint", wrapper="state_dict", meta=meta, path=label)
    if _is_state_dict(obj):
        return _unprefix(WeightsFile(dict(obj), "state_dict", path=label))
    for key in _WRAPPERS:
        if _is_state_dict(obj.get(key)):
            meta = {k: v for k, v in obj.items() if k != key}
            return _unprefix(WeightsFile(dict(obj[key]), "state_dict", wrapper=key, meta=meta, path=label))
    found = sorted(str(k) for k in obj)[:8]
    raise CheckpointError(
        f"checkpoint {label!r} is a dict without a state dict (no dict of tensors at the top level or under "
        f"'state_dict' or 'model'); its keys are {found}"
    )


def _unprefix(weights: WeightsFile) -> WeightsFile:
    state, prefix = weights.state_dict, ""
    if all(k.startswith(_PREFIX) for k in state):
        state, prefix = {k[len(_PREFIX) :]: v for k, v in state.items()}, _PREFIX
    parts = []
    if weights.wrapper is not None:
        parts.append(f"the state dict under {weights.wrapper!r}")
    if prefix:
        parts.append(f"keys without their {prefix!r} prefix (DistributedDataParallel)")
    note = f"{weights.path}: read {' and '.join(parts)}" if parts else ""
    return WeightsFile(state, weights.format, weights.wrapper, prefix, weights.meta, weights.path, note)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, arch: str, source: str) -> None:
    """Raise if ``state_dict`` does not have exactly ``model``'s keys and shapes, naming the first difference.

    Raises
    ------
    ShapeMismatchError
        ``"checkpoint 'b.pt' does not fit torchvision:resnet18: it has `fc.weight` of shape (100, 512) where the
        architecture has (10, 512)"``, or a missing / unexpected key (in the model's key order).
    """
    expected = model.state_dict()
    where = f"checkpoint {source!r} does not fit {arch}"
    for key, value in expected.items():
        if key not in state_dict:
            raise ShapeMismatchError(f"{where}: it lacks `{key}`")
        got = state_dict[key]
        if tuple(got.shape) != tuple(value.shape):
            raise ShapeMismatchError(
                f"{where}: it has `{key}` of shape {tuple(got.shape)} where the architecture has {tuple(value.shape)}"
            )
    for key in state_dict:
        if key not in expected:
            raise ShapeMismatchError(f"{where}: it has `{key}`, which the architecture does not")


def load_endpoint(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A model with the weights of ``path``, in eval mode, and the metadata of how it was read.

    Parameters
    ----------
    path : path-like
        An end point of ``neuralign train`` / :func:`~neuralign.experiments.run_study` (it records its
        architecture), or a plain / wrapped state dict (``.pt``, ``.pth``) or ``.safetensors`` file (then
        ``arch`` and ``num_classes`` are needed).
    arch : str, optional
        Architecture for :func:`~neuralign.experiments.build_model` (``"resnet20"``, ``"torchvision:resnet18"``,
        ``"timm:resnet18"``). For an end point it must agree with the recorded one when given.
    num_classes : int, optional
        Classifier outputs of a plain checkpoint (an end point records its own).
    model_kwargs : mapping, optional
        Builder keyword arguments of a plain checkpoint.

    Returns
    -------
    (torch.nn.Module, dict)
        The model (float32, CPU, eval mode) and metadata: ``arch``, ``num_classes``, ``model_kwargs``, ``format``,
        ``wrapper``, ``prefix``, ``note`` (one line when the file was wrapped or prefixed), ``path``, ``hash``
        (:func:`~neuralign.alignment.state_dict_hash` of the weights as stored), ``layout`` (their keys and
        shapes, :func:`~neuralign.alignment.state_dict_layout`), plus an end
        point's own entries (``seed``, ``history``, ``test``, ``dataset``).

    Raises
    ------
    CheckpointError
        Unreadable file; a plain checkpoint without ``arch`` or ``num_classes``; an end point of another
        architecture than ``arch``.
    ShapeMismatchError
        Weights that do not fit the architecture (names the first missing, unexpected or mis-shaped key).
    """
    weights = read_weights(path)
    label = str(path)
    if weights.format == "endpoint":
        recorded = str(weights.meta["arch"])
        if arch is not None and arch.lower() != recorded.lower():
            raise CheckpointError(f"end point {label!r} is a {recorded}, not a {arch}")
        arch, classes, kwargs = recorded, int(weights.meta["num_classes"]), dict(weights.meta["model_kwargs"])
    else:
        if arch is None:
            raise CheckpointError(
                f"checkpoint {label!r} is a plain {weights.format} file that does not record its architecture; "
                "give it with --arch (e.g. --arch torchvision:resnet18)"
            )
        if num_classes is None:
            raise CheckpointError(f"checkpoint {label!r} needs the number of classes of its architecture")
        classes, kwargs = int(num_classes), dict(model_kwargs or {})
    model = build_model(arch, classes, **kwargs)
    check_state_dict(model, weights.state_dict, arch=arch, source=label)
    model.load_state_dict(weights.state_dict)
    meta = {
        **{k: v for k, v in weights.meta.items() if weights.format == "endpoint"},
        "arch": arch, "num_classes": classes, "model_kwargs": kwargs, "format": weights.format,
        "wrapper": weights.wrapper, "prefix": weights.prefix, "note": weights.note, "path": label,
        "hash": state_dict_hash(weights.state_dict), "layout": state_dict_layout(weights.state_dict),
    }  # fmt: skip
    return model.eval(), meta


def write_weights(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    like: WeightsFile | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` atomically as ``.safetensors`` or ``.pt`` / ``.pth`` (by the suffix of ``path``).

    Parameters
    ----------
    path : path-like
        Output file; its suffix chooses the file type.
    state_dict : mapping str -> Tensor
        The weights (any device; written from the CPU, contiguous).
    like : WeightsFile, optional
        The file the weights were read from: its ``module.`` prefix is put back, and in a ``.pt`` file its
        wrapper too (the other entries of a wrapped file, or an end point's metadata, are kept alongside), so
        the output loads wherever the input did. Without it, a plain state dict.
    metadata : mapping str -> str, optional
        Recorded in a safetensors file's header, or under ``"neuralign"`` in a wrapped / end point ``.pt`` file.

    Raises
    ------
    ValueError
        A suffix other than ``.safetensors``, ``.pt``, ``.pth``.
    WriteError
        The file cannot be written.
    """
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"output {str(path)!r} must end in one of {list(WEIGHT_SUFFIXES)}")
    prefix = like.prefix if like is not None else ""
    flat = {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        header = {str(k): str(v) for k, v in (metadata or {}).items()}
        owned = {k: v.clone() for k, v in flat.items()}  # safetensors refuses tensors that share storage
        return atomic_write(path, lambda fh: fh.write(save(owned, metadata=header or None)))
    if like is None or like.wrapper is None:
        return atomic_save(flat, path)
    extra = dict(like.meta)
    if metadata:
        extra["neuralign"] = json.dumps(dict(metadata))
    return atomic_save({**extra, like.wrapper: flat}, path)
