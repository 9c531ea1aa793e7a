"""Progress bars of the command line (tqdm), fed by the library's progress events."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["ProgressBars"]


class ProgressBars:
    """tqdm progress bars keyed by stage and label, fed by the library's progress events.

    An event ``{"stage", "label", "step", "total", "record"}`` moves the bar ``"<stage>: <label>"`` to ``step``
    (steps done) and shows the record's loss or accuracy; a bar closes when it reaches ``total``. A bar's clock
    starts at its first event with ``"start": True`` (sent before the work begins, with ``step`` the steps already
    done by a resumed run), or else at the previous event, so that its rate and ETA count the first step's time.
    An event with ``"expected_seconds"`` (a verification check's estimate from its measured first step) prints
    that estimate above the bars.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}
        self.mark = time.time()

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        key = f"{event.get('stage', '')}: {event.get('label', '')}"
        total = event.get("total")
        step = event.get("step", 0)
        bar = self.bars.get(key)
        if bar is None:
            initial = step if event.get("start") else 0
            bar = self.bars[key] = tqdm(total=total, desc=key, unit="step", leave=True, file=sys.stderr,
                                        dynamic_ncols=True, smoothing=0, initial=initial)  # fmt: skip
            if not event.get("start"):  # the work began before its first event: count from the previous one
                bar.start_t = bar.last_print_t = self.mark
        if total is not None and bar.total != total:  # a bar opened before its work knew its size
            bar.total = total
        if event.get("expected_seconds") is not None:  # a measured first step's estimate of the whole
            bar.write(f"{key}: expected {bar.format_interval(event['expected_seconds'])} (from its first step)")
        record = event.get("record") or {}
        shown = {k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "train_loss", "accuracy", "test_accuracy")
                 and isinstance(v, float)}  # fmt: skip
        if shown:  # before the update, so that the line drawn for this step shows this step's numbers
            bar.set_postfix(shown, refresh=False)
        if step > bar.n:
            bar.update(step - bar.n)
        if total is not None and step >= total:
            bar.close()
            del self.bars[key]
        self.mark = time.time()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
