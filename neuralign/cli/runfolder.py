"""The run-folder policy of the commands: skip a finished result, resume an interrupted one, refuse one made with
other options."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuralign._utils import atomic_write_text, load_checkpoint
from neuralign.cli.common import info

__all__ = [
    "finished",
    "announce_resume",
    "DATA_OPTIONS",
    "command_options",
    "file_digest",
    "describe_changes",
    "resume_guard",
]


def finished(what: str, path: Path, args: argparse.Namespace, options: dict[str, Any],
              recorded: dict[str, Any] | None, leftovers: Sequence[Path] = ()) -> bool:
    """Whether ``path`` (the final output of ``what``) is already there and is kept: then one line says so.

    With ``--force`` the output and its ``leftovers`` (checkpoints) are removed so that the command starts over. An
    output made with other options than ``options`` (those it ``recorded``) is refused in one line.
    """
    if args.force:
        for stale in (path, *leftovers):
            stale.unlink(missing_ok=True)
            stale.with_name(stale.name + ".options.json").unlink(missing_ok=True)
        return False
    if not path.exists():
        return False
    changes = describe_changes(recorded, options) if recorded is not None else None
    if changes:
        raise ValueError(f"{path} was made with other options: {changes}; --force redoes it, or choose another --out")
    info(f"{what} already done: {path}; --force redoes it", file=sys.stderr)
    return True


def announce_resume(what: str, checkpoint: Path, total: int, unit: str = "epoch") -> int:
    """One line when ``what`` resumes from ``checkpoint`` (an :class:`~neuralign._epochs.EpochCheckpoint`); returns
    the number of finished epochs (PAM: outer iterations; 0 without a checkpoint)."""
    if not checkpoint.exists():
        return 0
    state = load_checkpoint(checkpoint)
    if unit == "iteration":  # PAM on a curve: the solver's iterations
        done = state.get("objects", {}).get("pam", {}).get("n_iter")
    else:
        done = state.get("data", {}).get("epoch")
    done = int(done or 0)
    info(f"resuming {what} from {unit} {done} of {total} ({checkpoint})", file=sys.stderr)
    return done


DATA_OPTIONS = ("data", "resize", "train_size", "test_size", "align_size", "batch_size", "mean", "std")


def command_options(args: argparse.Namespace, *names: str, files: Sequence[str] = ()) -> dict[str, Any]:
    """The options that make a result (those of the data included), and for each option in ``files`` that names an
    input file, a fingerprint of its content (so that a result of other inputs at the same paths is not taken for
    this one)."""
    options = {name: getattr(args, name, None) for name in (*names, *DATA_OPTIONS)}
    for name in files:
        path = getattr(args, name, None)
        if path is not None and Path(path).is_file():
            options[f"{name}#content"] = file_digest(Path(path))
    return options


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def describe_changes(recorded: dict[str, Any], options: dict[str, Any]) -> str | None:
    """The options whose value differs from the ``recorded`` ones, in command-line words (None if none)."""
    differ = [k for k, v in options.items() if k in recorded and recorded[k] != v]
    if not differ:
        return None
    return ", ".join(
        f"the content of --{k[: -len('#content')].replace('_', '-')}" if k.endswith("#content")
        else f"--{k.replace('_', '-')} {recorded[k]!r} (now {options[k]!r})"
        for k in differ
    )  # fmt: skip


def resume_guard(what: str, checkpoint: Path, options: dict[str, Any]) -> Path:
    """Refuse to resume ``checkpoint`` when it was started with other options (one line), then record ``options``
    beside it for the next resume; returns that record's path (removed once the result is written)."""
    record = checkpoint.with_name(checkpoint.name + ".options.json")
    if checkpoint.exists() and record.exists():
        changes = describe_changes(json.loads(record.read_text()), options)
        if changes:
            raise ValueError(f"{checkpoint} holds an interrupted {what} started with other options: {changes}; "
                             "--force starts over, or rerun with the same options to resume it")  # fmt: skip
    return atomic_write_text(record, json.dumps(options, default=str))
