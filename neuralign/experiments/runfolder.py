"""One policy for the output folder of a run, shared by every command of ``neuralign`` and by the study.

A run is identified by its **options**: what makes its result (settings, and fingerprints of its input files). Its
manifest (a JSON file in the folder, written atomically) records them, with the package versions, the device and
every start of the run. Then, for a rerun:

- **done**: the run's outputs all exist. With the same options it is skipped; with other options it is refused,
  naming the options that differ (a result is never silently replaced by one of other settings);
- **resume**: a checkpoint of the run exists but not its outputs. With the same options the run continues from the
  checkpoint; with other options it is refused;
- **start**: neither; the run starts (and records its options before any work).

``force`` removes the outputs and checkpoints first, so that the run starts over. A first run that fails before it
has produced anything leaves no manifest (:meth:`RunFolder.first_run`): it would lock the folder to the settings of
a run that never ran (a missing dataset, a typo in an architecture's name). Options recorded by an older
version that lacks a newer option are compared on the options both know (an option added later ran with its
default). The study is one run whose units are its stages: a stage is done when its outputs exist
(:func:`neuralign.study.stage_done`), under the options of the whole study.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from neuralign._utils import atomic_write_text
from neuralign.errors import CheckpointError

__all__ = ["RunFolder", "describe_changes", "option_changes"]


def option_changes(recorded: Mapping[str, Any], options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The (dotted) names of the options whose values differ between ``recorded`` and ``options``; names that only
    one side has are not compared (an option added later ran with its default).

    >>> option_changes({"lr": 0.1, "pam": {"lam": 10}}, {"lr": 0.1, "pam": {"lam": 1}, "new": 3})
    ['pam.lam']
    """
    out = []
    for key in options:
        if key not in recorded:
            continue
        a, b = recorded[key], options[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += option_changes(a, b, f"{prefix}{key}.")
        elif _plain(a) != _plain(b):
            out.append(f"{prefix}{key}")
    return out


def describe_changes(
    recorded: Mapping[str, Any],
    options: Mapping[str, Any],
    changes: Sequence[str],
    words: Mapping[str, str] | None = None,
    *,
    dashes: bool = True,
) -> str:
    """The ``changes`` (dotted option names, from :func:`option_changes`) with both values, in command-line words:
    ``--epochs 2 (now 3)``; ``words`` maps a name to its flag where it is not ``--`` + the name with dashes, and
    without ``dashes`` a name is shown as it is (``curve.epochs 2 (now 3)``, a ``--set`` name).

    >>> describe_changes({"pam": {"lam": 10}}, {"pam": {"lam": 1}}, ["pam.lam"], dashes=False)
    'pam.lam 10 (now 1)'
    """
    words = words or {}

    def flag(name: str) -> str:
        return words.get(name, f"--{name.replace('_', '-')}" if dashes else name)

    return ", ".join(
        f"the content of {flag(k[: -len('#content')])}" if k.endswith("#content")
        else f"{flag(k)} {_get(recorded, k)!r} (now {_get(options, k)!r})"
        for k in changes
    )  # fmt: skip


def _get(options: Any, path: str) -> Any:
    for part in path.split("."):
        options = options.get(part) if isinstance(options, Mapping) else None
    return options


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (a JSON round trip turns one into the other)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


class RunFolder:
    """The output folder ``folder`` of a run, with its manifest ``folder / manifest`` (see the module docs).

    Parameters
    ----------
    folder : path-like
        The output folder (created when the run starts).
    manifest : str
        The manifest's file name (several runs may share a folder, each with its own manifest).
    key : str
        The manifest's entry holding the options (``"options"``; ``"config"`` for a study).
    normalize : callable, optional
        Applied to recorded options before they are compared (e.g. reading an older format).

    Raises
    ------
    NotADirectoryError
        If ``folder`` is an existing file (one line naming it).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        manifest: str = "manifest.json",
        *,
        key: str = "options",
        normalize: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    ) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is a file: the run's outputs go to a folder (choose another "
                                     "--out)")
        self.path = self.folder / manifest
        self.key = key
        self.normalize = normalize

    def manifest(self) -> dict[str, Any] | None:
        """The manifest, or None without one.

        Raises
        ------
        CheckpointError
            If it is not a JSON object.
        """
        if not self.path.exists():
            return None
        try:
            record = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.path} is not valid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise CheckpointError(f"{self.path} is not a run's manifest (a JSON object)")
        return record

    def recorded(self) -> Mapping[str, Any] | None:
        """The options the manifest records (normalised), or None."""
        record = self.manifest()
        if record is None or not isinstance(record.get(self.key), Mapping):
            return None
        options = record[self.key]
        return self.normalize(options) if self.normalize is not None else options

    def changes(self, options: Mapping[str, Any]) -> list[str]:
        """The options that differ from the recorded ones (none without a record)."""
        recorded = self.recorded()
        return [] if recorded is None else option_changes(recorded, options)

    def refuse_other_settings(self, options: Mapping[str, Any], what: str) -> dict[str, Any] | None:
        """The manifest (None without one), refusing a folder whose recorded options differ from ``options``.

        Raises
        ------
        CheckpointError
            ``"<folder> holds <what> with other settings: <name> <recorded> (now <value>); use another --out
            folder"``.
        """
        manifest = self.manifest()
        changes = self.changes(options) if manifest is not None else []
        if changes:
            said = describe_changes(self.recorded() or {}, options, changes, dashes=False)
            raise CheckpointError(f"{self.folder} holds {what} with other settings: {said}; use another --out folder")
        return manifest

    def state(
        self,
        options: Mapping[str, Any],
        *,
        outputs: Sequence[str | os.PathLike],
        checkpoints: Sequence[str | os.PathLike] = (),
        force: bool = False,
        refuse: Callable[[str, list[str]], str] | None = None,
    ) -> str:
        """``"done"``, ``"resume"`` or ``"start"`` for a run with ``options`` whose results are ``outputs`` and
        whose interrupted state is in ``checkpoints`` (paths relative to the folder, or absolute).

        With ``force``, the outputs and checkpoints are removed first (``"start"``). ``refuse(state, changes)``
        words the refusal of a done or interrupted run made with other options.

        Raises
        ------
        CheckpointError
            If the run is done or interrupted with other options (one line naming them).
        """
        outputs = [self.folder / p for p in outputs]
        checkpoints = [self.folder / p for p in checkpoints]
        if force:
            for stale in (*outputs, *checkpoints):
                stale.unlink(missing_ok=True)
            return "start"
        state = "done" if outputs and all(p.exists() for p in outputs) else (
            "resume" if any(p.exists() for p in checkpoints) else "start")  # fmt: skip
        if state != "start":
            changes = self.changes(options)
            if changes:
                raise CheckpointError(refuse(state, changes) if refuse is not None else
                                      f"{self.folder} holds a run with other options ({', '.join(changes)})")
        return state

    @contextlib.contextmanager
    def first_run(self, started: Callable[[], bool]) -> Iterator[None]:
        """The with-block of a run that may be the folder's first: if no manifest existed when it was entered and
        the block raises before ``started()`` is true (the run has produced something, e.g. a stage's outputs), the
        manifest the block wrote is removed, so that the folder is fresh again for the corrected command.

        Examples
        --------
        >>> import tempfile
        >>> folder = RunFolder(tempfile.mkdtemp())
        >>> try:
        ...     with folder.first_run(started=lambda: False):
        ...         folder.save({"options": {"data": "nosuch"}})
        ...         raise FileNotFoundError("nosuch")
        ... except FileNotFoundError:
        ...     pass
        >>> folder.manifest() is None
        True
        """
        first = not self.path.exists()
        try:
            yield
        except BaseException:
            if first and not started():
                self.path.unlink(missing_ok=True)
            raise

    def save(self, record: Mapping[str, Any]) -> None:
        """Write the manifest atomically (rank 0 under a process group)."""
        atomic_write_text(self.path, json.dumps(record, indent=1, default=str))
