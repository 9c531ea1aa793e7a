"""The entry point of ``neuralign`` (also ``python -m neuralign``): demo, train, align, apply, curve, pam, verify,
evaluate, study.

Every command writes its results into ``--out`` (atomically; long loops checkpoint every epoch and a rerun of the
same command resumes), shows progress bars on standard error, and ends by printing the paths it wrote. Launched
with ``torchrun --nproc_per_node=N -m neuralign <command>`` it joins the process group (NCCL for a CUDA
``--device``, gloo for the CPU) and runs data-parallel; rank 0 alone writes files, shows progress and prints. Errors,
including I/O failures such as a full disk (which leave the previous checkpoint in place), are one line on standard
error and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from neuralign import _distributed
from neuralign.cli.commands import COMMAND_MODULES
from neuralign.cli.common import one_line, parse_device, usable_cores, write_manifest
from neuralign.cli.parser import build_parser
from neuralign.cli.progress import ProgressBars
from neuralign.errors import NeuralignError

__all__ = ["COMMANDS", "in_option_words", "warning_printer", "main"]


#: Command name -> its body, filled by :func:`main` from the command modules' registries (which building the parser
#: imported); entries set beforehand, e.g. by a test, are kept.
COMMANDS: dict[str, Callable[[argparse.Namespace, ProgressBars], list[Path]]] = {}


def _register_commands() -> None:
    for module in COMMAND_MODULES:  # imported by build_parser already
        for name, (_, run) in importlib.import_module(f"neuralign.cli.commands.{module}").COMMANDS.items():
            COMMANDS.setdefault(name, run)


def in_option_words(text: str, parser: argparse.ArgumentParser, command: str) -> str:
    """``text`` (a library message) with the Python argument names it mentions replaced by the command's options:
    "pass download=True" -> "pass --download", "`resize`" -> "--resize"."""
    import re

    options = {}
    for action in parser._subparsers._group_actions[0].choices[command]._actions:  # type: ignore[union-attr]
        long = [o for o in action.option_strings if o.startswith("--")]
        if long:
            options[action.dest] = long[0]
    options.setdefault("root", options.get("data_root", "--data-root"))
    # library argument names that the commands pass from differently named options
    aliases = {"max_iter": "iters", "x_epochs": "epochs", "point_a": "model_a", "point_b": "model_b",
               "train_loader": "data", "example_input": "data", "lam": "lam"}  # fmt: skip
    for name, dest in aliases.items():
        if dest in options:
            options.setdefault(name, options[dest])
    text = re.sub(r"\b(\w+)=True\b", lambda m: options.get(m.group(1), m.group(0)), text)
    text = text.replace("root (--data-root)", "--data-root")
    return re.sub(r"`(\w+)`", lambda m: options.get(m.group(1), m.group(0)), text)


def warning_printer(parser: argparse.ArgumentParser, command: str):
    """``warnings.showwarning`` for the command: a library warning on one line, in the command's option words,
    without Python's source line."""
    from tqdm import tqdm

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        tqdm.write(f"neuralign: warning: {in_option_words(one_line(message), parser, command)}", file=sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``neuralign`` and ``python -m neuralign``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            print(f"neuralign: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), usable_cores())))
    distributed = False
    if args.command in ("study", "compare") and getattr(args, "executor", "sequential") != "sequential" and (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):  # every rank would submit every stage: refused once, by rank 0
        if os.environ.get("RANK", "0") == "0":
            print(f"neuralign: error: --executor {args.executor} submits the stages as jobs itself: run it as one "
                  "process, not under torchrun (--gpus-per-job and --tasks-per-job run each Slurm job "
                  "data-parallel)",
                  file=sys.stderr)  # fmt: skip
        return 2
    if "WORLD_SIZE" in os.environ:
        # under torchrun: the default process group, backend from --device; every data-driven function then runs
        # data-parallel and only rank 0 writes files or shows progress
        try:
            device = parse_device(args.device)
        except ValueError as exc:
            print(f"neuralign: error: {one_line(exc)}", file=sys.stderr)
            return 2
        try:
            distributed = _distributed.init_from_env(device)
        except (ValueError, RuntimeError) as exc:
            print(f"neuralign: error: could not join the torchrun process group: {one_line(exc)}", file=sys.stderr)
            return 2
    try:
        with _sigterm_as_interrupt():
            code = _run(parser, args)
    except BaseException:
        if distributed:  # no barrier: the other ranks may never reach it
            torch.distributed.destroy_process_group()
        raise
    if distributed:
        if code == 0:
            _distributed.close()
        else:
            torch.distributed.destroy_process_group()
    return code


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C; the command exits with 143 (128 + SIGTERM), as a process killed by it would."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's stop) interrupts the command as Ctrl-C does: checkpoints are kept, local
    jobs stopped (not left running), the same one line. Only in the main thread, where Python runs handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The command of ``args``: its exit status (0, 2 on an error, 130 when interrupted, 143 when terminated)."""
    bars = ProgressBars(enabled=not args.quiet and _distributed.rank() == 0)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = warning_printer(parser, args.command)
            # a study or a comparison keeps its own, richer manifest; --status and --cancel look at another folder
            if args.command not in ("demo", "study", "compare") and not (getattr(args, "status", None)
                                                               or getattr(args, "cancel", None)):  # fmt: skip
                write_manifest(args)
            _register_commands()
            paths = COMMANDS[args.command](args, bars)
    except KeyboardInterrupt as exc:
        bars.close()
        resumable = args.command in ("train", "curve", "pam", "study", "demo", "compare")
        print("neuralign: interrupted" + ("; run the same command again to resume from the checkpoints" if resumable
                                          else ""), file=sys.stderr)  # fmt: skip
        return 128 + signal.SIGTERM if isinstance(exc, _Terminated) else 130
    except (NeuralignError, ValueError, TypeError, OSError) as exc:  # OSError: a full disk, a missing permission
        bars.close()
        print(f"neuralign: error: {in_option_words(one_line(exc), parser, args.command)}", file=sys.stderr)
        return 2
    bars.close()
    if _distributed.rank() == 0:
        for path in paths:
            print(path)
    return 0
