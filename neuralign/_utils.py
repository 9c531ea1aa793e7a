"""Small helpers shared by the whole package: seeds, atomic files, checkpoints, state-dict checks.

Nothing here knows about a particular algorithm.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import numbers
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from neuralign._distributed import on_rank_zero
from neuralign.errors import CheckpointError, ShapeMismatchError, WriteError

__all__ = [
    "stable_seed",
    "as_generator",
    "as_seed",
    "seeded_rng",
    "split_batch",
    "atomic_write",
    "atomic_save",
    "atomic_write_text",
    "load_checkpoint",
    "check_compatible",
    "named_parameter_keys",
    "split_logits",
    "flat_logits",
    "classification_loss",
    "environment_versions",
    "usable_cores",
]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` with SHA-256 (never Python's salted ``hash``).

    >>> stable_seed("pair", 1) == stable_seed("pair", 1)
    True
    """
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def as_generator(generator: torch.Generator | int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """Return ``generator`` itself, a new generator seeded with an ``int``, or a fresh seeded one for ``None``.

    ``None`` gives a generator seeded from the global torch RNG, so that ``torch.manual_seed`` still controls it.
    """
    if isinstance(generator, torch.Generator):
        return generator
    if generator is not None and (isinstance(generator, bool) or not isinstance(generator, numbers.Integral)):
        raise TypeError(f"`generator` must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    seed = int(torch.randint(0, 2**62, (1,)).item()) if generator is None else int(generator)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def as_seed(generator: torch.Generator | int | None) -> int:
    """An int seed from ``generator``: an int itself, a draw from a ``torch.Generator``, or (``None``) a draw from
    torch's global RNG, so that ``torch.manual_seed`` still controls it. The value a function derives its
    per-part seeds from with :func:`stable_seed`.

    >>> as_seed(7)
    7
    """
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(generator, bool) or not isinstance(generator, numbers.Integral):
        raise TypeError(f"`generator` must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    return int(generator)


def split_batch(batch: Any, device: torch.device, label: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` on ``device`` from a loader item: a tensor, or a tuple/list whose first two entries are x, y."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True), None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True) if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return x, y
    raise TypeError(f"`{label}` must yield tensors or (inputs, targets) tuples, got {type(batch).__name__}")


@contextlib.contextmanager
def seeded_rng(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Run the block with the global RNG of the CPU (and of ``device``) seeded from ``generator`` and restored
    afterwards, so that dropout in a train-mode attack repeats with the attack's seed and leaves the global RNG
    untouched."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    accelerator = device.type != "cpu"
    devices = [device] if accelerator else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerator else "cuda"):
        torch.default_generator.manual_seed(seed)
        if accelerator:
            backend = torch.get_device_module(device.type)
            with backend.device(device):
                backend.manual_seed(seed)
        yield


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(path: Path, exc: OSError) -> WriteError:
    """One line naming ``path`` and the cause of ``exc`` ("No space left on device"), keeping its ``errno``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None and str(exc.filename) != str(path):
        reason += f": {str(exc.filename)!r}"
    error = WriteError(f"could not write {str(path)!r}: {reason}")
    error.errno = exc.errno
    return error


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, flush it to disk, then rename it to ``path``.

    A reader never sees half a file, and an interrupted or failed write leaves the previous file (if any) in place.
    Under a torch.distributed process group only rank 0 writes; every rank returns (or raises rank 0's error) once
    the file is in place (:func:`neuralign._distributed.on_rank_zero`), so all ranks must call it together.

    Raises
    ------
    WriteError
        If the folder, the temporary file or the rename fails with an :class:`OSError` (a full disk, a read-only
        file system, a missing permission): one line naming ``path`` and the cause, with the ``errno``.
    """
    return on_rank_zero(lambda: _atomic_write(Path(path), write))


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise _write_error(path, exc) from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _torch_save(obj: Any, fh: BinaryIO) -> None:
    """``torch.save(obj, fh)``, with the :class:`OSError` behind torch's write failures raised as itself.

    When the file cannot take more bytes (a full disk), torch's zip writer reports ``RuntimeError: [enforce fail at
    inline_container.cc] . unexpected pos ...`` or ``PytorchStreamWriter failed writing file``; the cause is the
    ``OSError`` of the failed ``write``, which torch keeps as the context of its error.
    """
    try:
        torch.save(obj, fh)
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause)) from exc
        text = str(exc)
        if "PytorchStreamWriter" in text or "inline_container" in text:
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise OSError(errno.EIO, f"torch.save could not write the file ({first})") from exc
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_write`): an interrupt never leaves half a file.

    Raises
    ------
    WriteError
        If the file cannot be written (see :func:`atomic_write`), including torch's own write failures on a full
        disk.
    """
    return atomic_write(path, lambda fh: _torch_save(obj, fh))


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNSUPPORTED_OPERAND = re.compile(r"Unsupported operand (\d+)")


def _read_error(path: Path, exc: BaseException) -> str:
    """One line saying why ``torch.load(path, weights_only=True)`` failed, without torch's advice to unpickle."""
    where = f"checkpoint {str(path)!r} could not be read as data"
    if isinstance(exc, pickle.UnpicklingError):  # torch's tensor-only unpickler refused what the file holds
        found = _UNSAFE_GLOBAL.search(str(exc))
        if found:
            what = f"it holds the Python object {found.group(1)}"
        else:
            operand = _UNSUPPORTED_OPERAND.search(str(exc))
            what = "it is corrupt or holds other data than tensors" + (
                f": pickle opcode {operand.group(1)}" if operand else ""
            )
        return f"{where}: it is not a plain tensor checkpoint ({what}); neuralign only loads tensor data"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR):
            return f"{where}: {exc.strerror or exc}"
        # the file opened but its content made the reader fail (e.g. EINVAL on a cut zip archive)
        return f"{where}: the file is corrupt or truncated ({exc.strerror or exc})"
    if isinstance(exc, EOFError):
        return f"{where}: the file is empty or truncated"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "weights_only" not in line]
    first = lines[0] if lines else type(exc).__name__
    first = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first)
    first = first.split(". This is an internal")[0]  # torch's explanation of a corrupt file follows
    return f"{where}: the file is corrupt or truncated ({first})"


def load_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str | None = None,
    required: tuple[str, ...] = (),
    map_location: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint written by neuralign with ``torch.load(weights_only=True)`` and validate it.

    Only tensors, numbers, strings and containers of them are read: a file that holds any other Python object is
    refused, never unpickled.

    Parameters
    ----------
    path : path-like
        The file.
    kind : str, optional
        When given, the checkpoint's ``"kind"`` entry must equal it (e.g. ``"fit_curve"``).
    required : tuple of str
        Keys that must be present.
    map_location : device, optional
        Passed to ``torch.load``.

    Raises
    ------
    CheckpointError
        If the file is missing, cannot be read, is corrupt, holds other Python objects than tensor data, is not a
        dict, or lacks what was asked for. The message is one line.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(_read_error(path, exc)) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    if kind is not None and obj.get("kind") != kind:
        raise CheckpointError(f"checkpoint {str(path)!r} is of kind {obj.get('kind')!r}, expected {kind!r}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the entries {missing}")
    return obj


def check_compatible(
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    names: tuple[str, str] = ("model_a", "model_b"),
    *,
    what: str = "parameter",
) -> None:
    """Raise :class:`ShapeMismatchError` naming the first key or shape on which two state dicts differ.

    >>> import torch
    >>> check_compatible({"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 2)})
    Traceback (most recent call last):
    ...
    neuralign.errors.ShapeMismatchError: `model_b` has parameter `w` of shape (3, 2) but `model_a` has (2, 3)
    """
    for key in first:
        if key not in second:
            raise ShapeMismatchError(f"`{names[1]}` has no {what} `{key}`, which `{names[0]}` has")
        a, b = first[key], second[key]
        if tuple(a.shape) != tuple(b.shape):
            raise ShapeMismatchError(
                f"`{names[1]}` has {what} `{key}` of shape {tuple(b.shape)} but `{names[0]}` has {tuple(a.shape)}"
            )
    for key in second:
        if key not in first:
            raise ShapeMismatchError(f"`{names[0]}` has no {what} `{key}`, which `{names[1]}` has")


def named_parameter_keys(model: torch.nn.Module) -> list[str]:
    """The state-dict keys of ``model`` that are parameters (not buffers), in registration order."""
    return [name for name, _ in model.named_parameters()]


def split_logits(output: torch.Tensor | tuple | list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Split a model output into main logits and auxiliary logits.

    Models with auxiliary heads (GoogLeNet in train mode) return ``(logits, aux1, aux2, ...)``; every other model
    returns a tensor.
    """
    if isinstance(output, torch.Tensor):
        return output, []
    if isinstance(output, (tuple, list)) and output and all(isinstance(o, torch.Tensor) for o in output):
        return output[0], list(output[1:])
    raise TypeError(f"a model output must be a tensor or a tuple of tensors, got {type(output).__name__}")


def flat_logits(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with the classes on the last axis and one target per leading position, as ``(N, K)`` and ``(N,)``.

    A classifier's ``(B, K)`` logits and ``(B,)`` targets are returned as they are; a language model's ``(B, T, V)``
    next-token logits and ``(B, T)`` targets become ``(B*T, V)`` and ``(B*T,)`` (every token one example). Other
    shapes are returned unchanged (``cross_entropy``'s own conventions apply).
    """
    if logits.dim() > 2 and target.dim() == logits.dim() - 1 and logits.shape[:-1] == target.shape:
        return logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    return logits, target


def classification_loss(
    output: torch.Tensor | tuple | list, target: torch.Tensor, *, aux_weight: float = 0.3
) -> torch.Tensor:
    """Mean cross-entropy of the main logits plus ``aux_weight`` times that of each auxiliary head.

    This is the GoogLeNet training criterion of Tatro et al. (``CE + 0.3 CE_aux1 + 0.3 CE_aux2``) and plain
    cross-entropy for single-output models; for a language model's ``(B, T, V)`` logits and ``(B, T)`` targets the
    mean over all ``B*T`` tokens (:func:`flat_logits`).
    """
    main, aux = split_logits(output)
    loss = torch.nn.functional.cross_entropy(*flat_logits(main, target))
    for a in aux:
        loss = loss + aux_weight * torch.nn.functional.cross_entropy(*flat_logits(a, target))
    return loss


def usable_cores() -> int:
    """The CPU cores this process may run on (its CPU affinity: a container's or Slurm's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def environment_versions() -> dict[str, str]:
    """Python, the platform and the versions of neuralign and the numerical packages it runs on (for manifests).

    torch's own ``__version__`` (with its build tag, e.g. ``+cu130``); the others from the installed distributions'
    metadata, so that nothing is imported to learn a version.
    """
    import platform
    import sys
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    from neuralign._version import __version__

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "neuralign": __version__,
        "torch": torch.__version__,
        "numpy": version("numpy"),
        "scipy": version("scipy"),
    }
