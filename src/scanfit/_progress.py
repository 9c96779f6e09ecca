"""A progress bar updated at chunk boundaries only (a per-step callback would cost per step)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


def wanted(progress: bool | None) -> bool:
    """``None`` means: on when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


class ChunkProgress:
    """Updates done/total, updates/s, ETA and the last chunk's mean loss."""

    def __init__(self, total: int, start: int, enabled: bool):
        self._enabled = enabled
        self._start_step = start
        self._t0 = time.perf_counter()
        if not enabled:
            return
        self._bar = Progress(
            TextColumn("[bold]scanfit"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} updates/s"),
            TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]}{task.fields[skipped]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task(
            "train", total=total, completed=start, rate="-", loss="-", skipped=""
        )

    def __enter__(self) -> ChunkProgress:
        if self._enabled:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._enabled:
            self._bar.stop()

    def update(self, step: int, mean_loss: float | None, skipped: int) -> None:
        if not self._enabled:
            return
        rate = (step - self._start_step) / max(time.perf_counter() - self._t0, 1e-9)
        self._bar.update(
            self._task,
            completed=step,
            rate=f"{rate:,.0f}",
            loss="-" if mean_loss is None else f"{mean_loss:.4g}",
            skipped=f", {skipped} skipped" if skipped else "",
        )
