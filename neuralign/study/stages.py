"""The stage graph of a study: which stages there are, what each needs and writes, and when one is done."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from neuralign.experiments.runfolder import RunFolder
from neuralign.study.config import StudyConfig

__all__ = ["STAGE_KINDS", "Stage", "endpoint_stages", "first_run", "stage_done", "stage_to_run", "study_stages"]


# ------------------------------------------------------------------------------------------------- the graph
#: The kinds of stage, in the order of a sequential run.
STAGE_KINDS = ("endpoint", "alignment", "curve", "eval", "midpoint", "verification", "plane", "report")


@dataclass(frozen=True)
class Stage:
    """One stage of a study.

    Attributes
    ----------
    name : str
        As recorded in the manifest and shown to users (``"pair 1 curve aligned"``).
    needs : tuple of str
        The names of the stages it needs.
    outputs : tuple of str
        Paths relative to the study folder; the stage is done when they all exist.
    kind : str
        One of :data:`STAGE_KINDS`: what the stage does (the runner dispatches on it).
    index : int, optional
        The end point's seed (``endpoint``) or the pair (the per-pair stages).
    setting : str, optional
        The curve setting (``curve``, ``eval``).
    """

    name: str
    needs: tuple[str, ...]
    outputs: tuple[str, ...]
    kind: str = "report"
    index: int | None = None
    setting: str | None = None

    @property
    def slug(self) -> str:
        """The name as a file name (``pair_1_curve_aligned``)."""
        return self.name.replace(" ", "_")


def endpoint_stages(pairs: int, given: bool) -> tuple[list[Stage], list[tuple[str, ...]]]:
    """The end-point stages of ``pairs`` pairs (none when the end points are ``given``) and, per pair, the names
    of the stages its alignment needs (pair ``k`` is seeds ``2k - 1`` and ``2k``); shared by the study and
    ``neuralign compare``."""
    if given:
        return [], [()] * pairs
    stages = [Stage(f"endpoint {s}", (), (f"endpoints/seed{s}.pt",), "endpoint", s) for s in range(1, 2 * pairs + 1)]
    return stages, [(f"endpoint {2 * k - 1}", f"endpoint {2 * k}") for k in range(1, pairs + 1)]


def study_stages(config: StudyConfig) -> list[Stage]:
    """The stages of a study in an order that respects their dependencies (the order of a sequential run).

    End points (unless given) -> per pair: alignment -> per setting: curve -> evaluation; the aligned curve ->
    verification and (pair 1) the plane; everything -> ``report``. Stages of different pairs and settings do not
    depend on each other.
    """
    c = config
    stages, pair_ends = endpoint_stages(c.pairs, given=c.endpoints is not None)
    for k, ends in enumerate(pair_ends, start=1):
        alignment = Stage(f"pair {k} alignment", ends, (f"pair{k}/alignment.pt",), "alignment", k)
        stages.append(alignment)
        for setting in c.settings:
            curve = Stage(f"pair {k} curve {setting}", (alignment.name,),
                          (f"pair{k}/curve_{setting}.pt", f"pair{k}/curve_{setting}.json"), "curve", k, setting)
            stages += [curve, Stage(f"pair {k} eval {setting}", (curve.name,), (f"pair{k}/eval_{setting}.json",),
                                    "eval", k, setting)]  # fmt: skip
        if "aligned" in c.settings:
            needs = (f"pair {k} curve aligned",)
            stages.append(Stage(f"pair {k} midpoint alignment",
                                needs + ((f"pair {k} curve unaligned",) if "unaligned" in c.settings else ()),
                                (f"pair{k}/midpoint_alignment.json",), "midpoint", k))  # fmt: skip
            if c.verification is not None:
                stages.append(Stage(f"pair {k} verification", needs,
                                    (f"pair{k}/verification.json", f"pair{k}/verification.md"), "verification", k))
            if c.evaluation.plane_grid and k == 1:
                stages.append(Stage(f"pair {k} plane", needs, (f"pair{k}/plane.json",), "plane", k))
    stages.append(Stage("report", tuple(s.name for s in stages), ("results.json", "report.md"), "report"))
    return stages


def stage_done(out: str | os.PathLike, stage: Stage) -> bool:
    """Whether every output of ``stage`` exists in the study folder ``out``."""
    return all((Path(out) / name).exists() for name in stage.outputs)


def first_run(out: str | os.PathLike, stages: Sequence[Stage]) -> AbstractContextManager[None]:
    """The with-block of a run of ``stages`` in ``out`` (a study's, a comparison's; sequential or as jobs): if it
    is the folder's first and raises before any stage but the report is done, it leaves no manifest
    (:meth:`~neuralign.experiments.runfolder.RunFolder.first_run`), so that a run that failed on its settings (a
    missing dataset, a typo in an architecture's name) does not lock the folder to them."""
    return RunFolder(out).first_run(started=lambda: any(stage_done(out, s) for s in stages if s.kind != "report"))


def stage_to_run(out: str | os.PathLike, stages: Sequence[Stage], name: str, *, what: str = "study") -> Stage | None:
    """The stage ``name`` of ``stages`` if it is to run in ``out`` (a job's or a stage runner's first step), None
    if it is done; the ``report`` stage is always run (it reflects the files present).

    Raises
    ------
    ValueError
        For a stage ``stages`` does not have (``what``, e.g. ``"comparison"``, names the run).
    RuntimeError
        If a stage it needs is not done (names them).
    """
    by_name = {s.name: s for s in stages}
    if name not in by_name:
        raise ValueError(f"unknown {what} stage {name!r}; this {what} has {list(by_name)}")
    stage = by_name[name]
    missing = [n for n in stage.needs if not stage_done(out, by_name[n])]
    if missing:
        raise RuntimeError(f"{what} stage {name!r} needs {missing}, which are not done in {out}")
    return None if stage.kind != "report" and stage_done(out, stage) else stage
