"""The one outcome of every check of :mod:`neuralign.verification`: a ``verdict`` string and its ``passed``."""

from __future__ import annotations

__all__ = ["VERDICTS", "Verdict"]

#: A check's outcome: ``"pass"``, ``"fail"``, or ``"inconclusive"`` when the evidence cannot decide.
VERDICTS = ("pass", "fail", "inconclusive")


class Verdict:
    """Mixin of a check's result: ``passed`` is ``verdict == "pass"`` (an inconclusive check has not passed)."""

    verdict: str

    @property
    def passed(self) -> bool:
        """``verdict == "pass"``."""
        return self.verdict == "pass"
