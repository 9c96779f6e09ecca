"""Host side, after a run: a warning when evaluation metrics are NaN or infinite.

Value-dependent problems cannot raise inside the compiled program; a NaN
metric also never counts as an improvement for ``best`` (``_eval.record``
compares strictly), so a run whose evaluations are all NaN keeps the initial
params as its best and, with ``patience``, stops early. Both are silent
unless said here.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np


def warn_nonfinite_metrics(result: Any, *, stacklevel: int = 3) -> None:
    """Warns (``RuntimeWarning``) naming the first evaluation with a non-finite metric.

    Args:
      result: a ``TrainResult`` (or a ``StepsResult``, whose ``evals`` are read); its
        ``metrics`` (``{name: (..., evaluations)}`` with ``"step"``) and ``best_step``.
        Evaluations a stopped run skipped (step -1, NaN by design) do not count.
        Traced values (under jit) are left alone.
      stacklevel: as for ``warnings.warn``: the user's call.
    """
    metrics = result.evals if hasattr(result, "evals") else result.metrics
    if not metrics or any(isinstance(v, jax.core.Tracer) for v in metrics.values()):
        return
    host = jax.device_get(metrics)
    steps = np.asarray(host["step"])
    for name, values in host.items():
        values = np.asarray(values)
        if name == "step" or not np.issubdtype(values.dtype, np.inexact):
            continue
        bad = ~np.isfinite(values) & (steps >= 0)
        if not bad.any():
            continue
        first = tuple(np.argwhere(bad)[0])
        warnings.warn(
            f"eval metric {name!r} is {values[first]} at the evaluation after update "
            f"{steps[first]} ({int(bad.sum())} of {int((steps >= 0).sum())} evaluations "
            f"non-finite): check eval_data and the params for NaN or inf. "
            f"{_best_note(result)}",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        return


def _best_note(result: Any) -> str:
    """What the non-finite metric did to ``best``, if one was tracked."""
    best_step = getattr(result, "best_step", None)
    if best_step is None:
        return ""
    note = "best= never picks a non-finite evaluation"
    if np.all(np.asarray(best_step) < 0):
        note += "; no evaluation improved on the initial params, so best_params are those"
    stopped = np.asarray(getattr(result, "stopped_at", -1))
    if stopped.ndim == 0 and stopped >= 0:
        note += f"; patience stopped the run at update {int(stopped)}"
    return note + "."
