"""The metrics log of ``fit(log_dir=...)``: ``metrics.jsonl`` and TensorBoard event files.

One JSON object per line: ``{"step": ..., "kind": "chunk" | "eval", name: value, ...}``,
flushed as written so a killed run keeps what it logged. When ``tensorboardX`` is
installed the same scalars go to TensorBoard event files in the same directory,
tagged ``<kind>/<name>``. Host code: files only, nothing traced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

FILE = "metrics.jsonl"


def learning_rate(opt_state: Any) -> float | None:
    """The learning rate an optimizer state exposes (``optax.inject_hyperparams``), or None."""
    found = []

    def visit(node):
        hyper = getattr(node, "hyperparams", None)
        if isinstance(hyper, dict) and "learning_rate" in hyper:
            found.append(hyper["learning_rate"])
        return node

    is_leaf = lambda n: hasattr(n, "hyperparams")  # noqa: E731
    jax.tree.map(visit, opt_state, is_leaf=is_leaf)
    if not found or np.ndim(found[0]) != 0:
        return None  # absent, or one per sweep config: not a single number
    return float(np.asarray(found[0]))


def _number(value: Any) -> float | int | None:
    """A JSON-able scalar; NaN and infinities become None (JSON has no spelling for them)."""
    value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records to ``log_dir/metrics.jsonl`` (and TensorBoard, when installed).

    Args:
      log_dir: the directory; created if missing.
      resume_step: the update a resumed run restarts from: records past it,
        written by the run that was interrupted, are dropped from the JSON
        log, so each step is logged once. ``None`` keeps the file as it is.
    """

    def __init__(self, log_dir: str | Path, resume_step: int | None = None):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / FILE
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a")  # noqa: SIM115  (closed by close())
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self._tb = None
        else:
            self._tb = SummaryWriter(str(self.dir))

    def write(self, step: int, kind: str, scalars: dict[str, Any]) -> None:
        """Logs ``scalars`` (name -> number) at update ``step``."""
        record = {"step": int(step), "kind": kind}
        record.update({name: _number(v) for name, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"{kind}/{name}", float(np.asarray(value)), int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read(log_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``log_dir/metrics.jsonl``, in order."""
    text = (Path(log_dir) / FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
