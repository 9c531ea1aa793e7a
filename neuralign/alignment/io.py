"""The permutation file: a documented, versioned record of an alignment that can be applied later.

Format (``format_version`` 1)
    A header (JSON) and one ``int64`` index tensor per permutation group, in either container:

    - ``.pt`` / ``.pth``: a ``torch.save`` dict ``{"kind": "permutation", "format_version": 1, "header": <JSON
      string>, "perms": {group: LongTensor}}``, read back with ``torch.load(weights_only=True)``;
    - ``.safetensors``: tensors named ``perm/<group>`` and the header under the metadata key ``"neuralign"``.

    The header holds

    ========================  ==========================================================================
    ``format``                ``"neuralign-permutation"``
    ``format_version``        ``1``
    ``neuralign_version``     the version that wrote it
    ``spec``                  :meth:`PermutationSpec.to_dict`: group sizes, and per state-dict key and axis
                              the segments ``[group, size, expand]`` that act on it
    ``groups``                the group names, in order
    ``method``, ``settings``  how the permutation was found (e.g. ``"correlation"``, the data used)
    ``arch``                  the architecture, when known (``"torchvision:resnet18"``)
    ``model_a``, ``model_b``  ``{"hash": "sha256:...", "source": path, "layout": [[key, shape], ...]}`` of
                              the two inputs: hashes of the weights' content (:func:`state_dict_hash`), so the
                              same weights saved as ``.pt`` or ``.safetensors`` match, and the state dict's keys
                              and shapes (:func:`state_dict_layout`), the architecture's fingerprint
    ``results``               JSON-able figures of the run (per-group correlations before and after)
    ========================  ==========================================================================

    The permutation of group ``g`` relabels unit ``perms[g][i]`` of model B as unit ``i``
    (``B_new[i] = B_old[perms[g][i]]``), i.e. it maps B into A's frame; see :func:`apply_permutation`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuralign._utils import atomic_save, atomic_write, load_checkpoint
from neuralign.alignment.permutation import validate_permutation
from neuralign.alignment.spec import PermutationSpec
from neuralign.errors import CheckpointError, SpecError

__all__ = [
    "FORMAT_VERSION",
    "PermutationFile",
    "save_permutation_file",
    "load_permutation_file",
    "state_dict_hash",
    "state_dict_layout",
]

#: Version of the permutation file format written by :func:`save_permutation_file`.
FORMAT_VERSION = 1
_FORMAT = "neuralign-permutation"
_SUFFIXES = (".pt", ".pth", ".safetensors")


def state_dict_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's content: every key (sorted) with its dtype, shape and bytes.

    Parameters
    ----------
    state_dict : mapping str -> Tensor
        Any dtypes and devices.

    Returns
    -------
    str
        ``"sha256:<64 hex digits>"``; equal for equal weights whatever the file type they were read from.

    Examples
    --------
    >>> a = {"w": torch.ones(2, 2)}
    >>> state_dict_hash(a) == state_dict_hash({"w": torch.ones(2, 2)}), state_dict_hash(a) == state_dict_hash(
    ...     {"w": torch.ones(2, 2, dtype=torch.float64)})
    (True, False)
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`state_dict` entry {key!r} is a {type(value).__name__}, expected a tensor")
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def state_dict_layout(state_dict: Mapping[str, torch.Tensor]) -> list[list]:
    """The architecture's fingerprint: ``[[key, shape], ...]`` in the state dict's order (no values, no dtypes)."""
    return [[str(k), list(v.shape)] for k, v in state_dict.items()]


def _first_layout_difference(recorded: list, given: Mapping[str, torch.Tensor]) -> str | None:
    shapes = {str(k): list(s) for k, s in recorded}
    for key, value in given.items():
        if key not in shapes:
            return f"`{key}`, which the original lacks"
        if list(value.shape) != shapes[key]:
            return f"`{key}` of shape {tuple(value.shape)} where the original has {tuple(shapes[key])}"
    missing = [k for k in shapes if k not in given]
    return f"no `{missing[0]}`, which the original has" if missing else None


@dataclass(frozen=True)
class PermutationFile:
    """A permutation file (see the module's docstring for the format).

    Attributes
    ----------
    perms : dict str -> LongTensor
        Group -> ``(size,)`` int64 index tensor, a permutation of ``0..size-1``.
    spec : PermutationSpec
        The groups and the state-dict axes they act on.
    method : str
        How the permutation was found.
    settings : dict
        The method's settings.
    model_a, model_b : dict
        ``{"hash": ..., "source": ..., "layout": ...}`` of the inputs (each may be absent or ``None`` when
        unknown).
    arch : str or None
        The architecture.
    results : dict
        JSON-able figures of the run.
    neuralign_version : str
        The version that wrote the file.
    format_version : int
    path : str
        Where it was read from (``""`` if built in memory).
    """

    perms: dict[str, torch.Tensor]
    spec: PermutationSpec
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    model_a: dict[str, Any] = field(default_factory=dict)
    model_b: dict[str, Any] = field(default_factory=dict)
    arch: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    neuralign_version: str = ""
    format_version: int = FORMAT_VERSION
    path: str = ""

    def header(self) -> dict[str, Any]:
        """The JSON header of the file."""
        return {
            "format": _FORMAT, "format_version": self.format_version, "neuralign_version": self.neuralign_version,
            "arch": self.arch, "method": self.method, "settings": self.settings, "groups": list(self.perms),
            "model_a": self.model_a, "model_b": self.model_b, "results": self.results, "spec": self.spec.to_dict(),
        }  # fmt: skip

    def check_pair(
        self,
        *,
        arch: str | None = None,
        model_b: Mapping[str, torch.Tensor] | None = None,
        hash_a: str | None = None,
        hash_b: str | None = None,
    ) -> None:
        """Refuse the file if it was made for another architecture or another pair of models.

        Parameters
        ----------
        arch : str, optional
            The architecture, compared with the recorded one when both are known.
        model_b : mapping str -> Tensor, optional
            The state dict to be permuted, compared with the recorded layout (keys and shapes) and validated
            against the spec (keys and axis lengths).
        hash_a, hash_b : str, optional
            :func:`state_dict_hash` of the two models as given, compared with the recorded hashes.

        Raises
        ------
        CheckpointError
            One line saying which: ``"... was computed for torchvision:resnet18, not torchvision:resnet34
            (another architecture)"``, ``"... was computed for another architecture: model B has other keys or
            shapes (the first: ...)"``, ``"... does not fit model B (another architecture?): <first mismatch>"``,
            ``"... was computed for another model B (weights sha256:1a2b..., given sha256:3c4d...; another
            pair)"``.
        """
        where = f"permutation file {self.path or '<in memory>'!r}"
        if arch is not None and self.arch is not None and arch.lower() != self.arch.lower():
            raise CheckpointError(f"{where} was computed for {self.arch}, not {arch} (another architecture)")
        if model_b is not None and self.model_b.get("layout"):
            difference = _first_layout_difference(self.model_b["layout"], model_b)
            if difference is not None:
                raise CheckpointError(
                    f"{where} was computed for another architecture: model B has other keys or shapes (the first: "
                    f"{difference})"
                )
        if model_b is not None:
            try:
                self.spec.validate(model_b, name="model B")
            except (SpecError, ValueError) as exc:
                raise CheckpointError(f"{where} does not fit model B (another architecture?): {exc}") from exc
        for label, got, recorded in (("A", hash_a, self.model_a), ("B", hash_b, self.model_b)):
            expected = recorded.get("hash")
            if got is not None and expected and got != expected:
                raise CheckpointError(
                    f"{where} was computed for another model {label} (weights {expected[:19]}..., given "
                    f"{got[:19]}...; another pair)"
                )


def save_permutation_file(path: str | os.PathLike, record: PermutationFile) -> Path:
    """Write a permutation file atomically, as ``.pt`` / ``.pth`` or ``.safetensors`` by the suffix of ``path``.

    Parameters
    ----------
    path : path-like
    record : PermutationFile
        Its ``neuralign_version`` is set to the running version when empty.

    Raises
    ------
    ValueError
        Another suffix, or ``perms`` that are not permutations of the spec's groups.
    WriteError
        The file cannot be written.
    """
    path = Path(path)
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"a permutation file must end in one of {list(_SUFFIXES)}, got {str(path)!r}")
    validate_permutation(record.spec, record.perms)
    if not record.neuralign_version:
        from neuralign._version import __version__

        record = PermutationFile(**{**record.__dict__, "neuralign_version": __version__})
    header = json.dumps(record.header(), sort_keys=True)
    perms = {g: p.detach().to("cpu", torch.int64).contiguous() for g, p in record.perms.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        tensors = {f"perm/{g}": p for g, p in perms.items()}
        return atomic_write(path, lambda fh: fh.write(save(tensors, metadata={"neuralign": header})))
    return atomic_save({"kind": "permutation", "format_version": FORMAT_VERSION, "header": header, "perms": perms},
                       path)  # fmt: skip


def load_permutation_file(path: str | os.PathLike) -> PermutationFile:
    """Read and validate a permutation file written by :func:`save_permutation_file`.

    Parameters
    ----------
    path : path-like
        A ``.pt`` / ``.pth`` (read with ``weights_only=True``) or ``.safetensors`` permutation file.

    Returns
    -------
    PermutationFile
        With int64 CPU index tensors, validated against the spec.

    Raises
    ------
    CheckpointError
        Missing or unreadable file, another kind of file, a newer format version, a header that is not valid
        JSON or lacks an entry, or index tensors that are not permutations of the spec's groups. One line.
    """
    path = Path(path)
    where = f"permutation file {str(path)!r}"
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{where} does not exist")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                text = (fh.metadata() or {}).get("neuralign")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{where} is not a readable safetensors file: {exc}") from exc
        if text is None:
            raise CheckpointError(f"{where} has no neuralign header; it is not a permutation file")
        perms = {k[len("perm/") :]: v for k, v in tensors.items() if k.startswith("perm/")}
    else:
        state = load_checkpoint(path)
        if state.get("kind") != "permutation":
            old = state.get("kind") == "alignment"
            hint = " (an alignment file of an older neuralign; run align again)" if old else ""
            raise CheckpointError(f"{where} is of kind {state.get('kind')!r}, expected 'permutation'{hint}")
        text, perms = state.get("header"), state.get("perms")
        if not isinstance(text, str) or not isinstance(perms, dict):
            raise CheckpointError(f"{where} lacks its header or its index tensors")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where} has a header that is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise CheckpointError(f"{where} is not a neuralign permutation file")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format version {version!r}; this neuralign reads versions up to {FORMAT_VERSION}"
        )
    missing = [k for k in ("spec", "method", "groups", "model_a", "model_b") if k not in header]
    if missing:
        raise CheckpointError(f"{where} lacks the header entries {missing}")
    try:
        spec = PermutationSpec.from_dict(header["spec"])
    except SpecError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    try:
        validate_permutation(spec, perms)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    perms = {g: p.to(torch.int64) for g, p in perms.items()}
    order = [g for g in header["groups"] if g in perms]
    return PermutationFile(
        perms={g: perms[g] for g in order}, spec=spec, method=str(header["method"]),
        settings=dict(header.get("settings") or {}), model_a=dict(header["model_a"] or {}),
        model_b=dict(header["model_b"] or {}), arch=header.get("arch"), results=dict(header.get("results") or {}),
        neuralign_version=str(header.get("neuralign_version", "")), format_version=version, path=str(path),
    )  # fmt: skip
