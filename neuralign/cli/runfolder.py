"""The run-folder policy of the commands: skip a finished result, resume an interrupted one, refuse one made with
other options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from neuralign._utils import load_checkpoint
from neuralign.cli.common import info, run_folder
from neuralign.experiments.runfolder import describe_changes

__all__ = ["DATA_OPTIONS", "announce_resume", "check_run", "command_options", "file_digest"]


def check_run(
    args: argparse.Namespace,
    what: str,
    options: dict[str, Any],
    *,
    outputs: Sequence[Path],
    checkpoints: Sequence[Path] = (),
    words: dict[str, str] | None = None,
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> str:
    """The command's run under the one run-folder policy (:class:`~neuralign.experiments.runfolder.RunFolder`):
    ``"done"`` (its ``outputs`` exist, made with these options: one line says it is skipped), ``"resume"`` (a
    checkpoint exists) or ``"start"``; with ``--force`` the outputs and checkpoints are removed (``"start"``).
    When the run goes on, ``options`` are recorded in the command's manifest, before any work. ``words`` maps
    (dotted) option names to the command's options where they differ (``pam.max_iter`` -> ``--iters``);
    ``normalize`` reads recorded options of an older version (e.g. fills an option added since).

    Raises
    ------
    CheckpointError
        One line, if the outputs or the checkpoint were made with other options (naming them in option words).
    """
    folder = run_folder(args)
    folder.normalize = normalize
    recorded = folder.recorded() or {}

    def refuse(state: str, changes: list[str]) -> str:
        said = describe_changes(recorded, options, changes, words)
        if state == "done":
            return f"{outputs[0]} was made with other options: {said}; --force redoes it, or choose another --out"
        return (f"{checkpoints[0]} holds an interrupted {what} started with other options: {said}; --force starts "
                "over, or rerun with the same options to resume it")  # fmt: skip

    state = folder.state(options, outputs=outputs, checkpoints=checkpoints, force=args.force, refuse=refuse)
    if state == "done":
        info(f"{what} already done: {outputs[0]}; --force redoes it", file=sys.stderr)
    else:
        record = folder.manifest() or {}
        record["options"] = options
        folder.save(record)
    return state


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


