"""The observers of ``fit`` besides the checkpointer: progress bar, metrics log, ``on_chunk``.

Each sees every chunk's ``ChunkInfo`` (``_driver``) and knows nothing of the
others; returning False from ``on_chunk`` stops the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from scanfit import _metrics_log, _progress


class ProgressBar:
    """The rich progress bar, moved at chunk boundaries. ``loss``: whether the run has a
    loss to show (a ``fit_steps`` step may report none)."""

    def __init__(self, total: int, start: int, progress: bool | None, loss: bool = True):
        self.bar = _progress.ChunkProgress(total, start, _progress.wanted(progress))
        self.loss = loss

    def __enter__(self) -> ProgressBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def on_chunk(self, info, state, history) -> None:
        loss = float(np.mean(info.losses)) if self.loss else None
        self.bar.update(info.step, loss, info.skipped)

    def on_end(self, state, history) -> None:
        pass


class Callback:
    """The user's ``on_chunk(info)``; returning False stops the run."""

    def __init__(self, on_chunk: Callable[[Any], Any]):
        self.fn = on_chunk

    def on_chunk(self, info, state, history) -> bool:
        return self.fn(info) is not False

    def on_end(self, state, history) -> None:
        pass


def _name(path) -> str:
    """``['acc']`` -> ``acc``; ``[0].w`` -> ``0.w``: a readable scalar name."""
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    return ".".join(str(k) for k in keys)


def _run_name(fingerprint: dict | None) -> str | None:
    """A digest of the fingerprint, the same for every call of fit that resumes the run
    (``nan_policy`` left out: ``"raise"`` and ``"ignore"`` may resume each other)."""
    if fingerprint is None:
        return None
    entries = {k: v for k, v in fingerprint.items() if k != "nan_policy"}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


class MetricsLogger:
    """``log_dir/metrics.jsonl`` (and TensorBoard): one record per chunk and per evaluation.

    A chunk record holds the chunk's mean loss, the mean of each aux leaf (scalar
    leaves; others as their mean) and the learning rate where the optimizer state
    exposes it (``optax.inject_hyperparams``); an evaluation record, its metrics.
    Each is on disk before the checkpointer (the last observer) saves the chunk, so
    a resumed run finds every record up to its checkpoint. ``start``: the update
    the run starts from (0: a new run; see ``_metrics_log.MetricsLog``);
    ``fingerprint``: the run's checkpoint fingerprint (None without checkpoints),
    which names the run that wrote the log; ``loss``: whether the run has a loss (a
    ``fit_steps`` step may report none: then the record holds its metrics only).
    """

    def __init__(self, log_dir: str | Path, start: int, fingerprint: dict | None = None,
                 loss: bool = True):  # fmt: skip
        self.log = _metrics_log.MetricsLog(log_dir, start=start, run=_run_name(fingerprint))
        self.loss = loss

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.log.close()

    def on_chunk(self, info, state, history) -> None:
        write_records(self.log.write, info, loss=self.loss)

    def on_end(self, state, history) -> None:
        pass


def write_records(write: Callable[[int, str, dict[str, Any]], Any], info, loss=True) -> None:
    """Calls ``write(step, kind, scalars)`` for each metrics-log record of a chunk: one
    "chunk" record, then one "eval" record per evaluation (the trackers get the same).
    ``loss``: whether the run has a loss (a ``fit_steps`` step may report none)."""
    scalars = {}
    if loss:
        scalars["loss"] = float(np.nanmean(info.losses)) if len(info.losses) else np.nan
    for path, leaf in jax.tree_util.tree_leaves_with_path(info.aux):
        scalars[_name(path) or "aux"] = float(np.mean(leaf))
    rate = _metrics_log.learning_rate(info.opt_state)
    if rate is not None:
        scalars["learning_rate"] = rate
    write(info.step, "chunk", scalars)
    metrics = info.metrics or {}
    for i, step in enumerate(np.asarray(metrics.get("step", []))):
        if step >= 0:  # -1: skipped after an early stop
            values = {k: v[i] for k, v in metrics.items() if k != "step"}
            write(int(step), "eval", values)
