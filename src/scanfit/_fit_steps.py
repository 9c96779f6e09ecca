"""fit_steps: the user's own step run as compiled chunks, with every driver feature.

The same driver as ``fit`` (``_fit.execute``): chunks, checkpoints of the whole
state with bitwise resume, progress, ``log_dir``, ``on_chunk``, divergence
detection, iterables and memmaps, data parallelism. Only the step differs: the
user's (``_steps.UserStep``) instead of loss + optax.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

from scanfit import (
    _checkpointer,
    _checks,
    _compile_cache,
    _nonfinite,
    _sources,
    _steps,
    _trackers,
)
from scanfit._driver import ChunkInfo
from scanfit._fit import Run, check_fit_settings, execute, initial_state, on_mesh
from scanfit._loop import TrainResult
from scanfit._scan import PyTree
from scanfit._steps import StepsResult


def _finish(evaluation) -> Callable[[TrainResult], StepsResult]:
    """The run's carry in the step form's terms."""

    def finish(res: TrainResult) -> StepsResult:
        base = StepsResult(res.params, res.aux, first_nonfinite=res.first_nonfinite)
        if evaluation is None:
            return base
        best = evaluation.best is not None
        return base._replace(
            evals=res.metrics,
            best_state=res.best_params if best else None,
            best_step=res.best_step,
            stopped_at=res.stopped_at,
        )

    return finish


def _checked_data(data, *, steps, epochs, key, unroll, steps_per_epoch):
    """``(checked, stream, n, key, batch_spec)``: the data as fit checks it, or none."""
    if data is None:
        _checks.check_loop_settings(1, epochs=1, accumulate=1, unroll=unroll)
        if steps_per_epoch is not None:
            raise ValueError(
                f"steps_per_epoch={steps_per_epoch!r} is for an iterable data; with "
                "data=None pass steps."
            )
        return None, None, steps, None, None
    checked, stream = _sources.open_data(
        data, key=key, accumulate=1, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    n = _checks.check_data(checked)
    _checks.check_loop_settings(n, epochs=epochs, accumulate=1, unroll=unroll)
    return checked, stream, n, _checks.check_key(key), _steps.first_batch(checked)


@_checks.integer_settings
def fit_steps(
    step_fn: Callable,
    state: PyTree,
    data: Any = None,
    *,
    steps: int | None = None,
    epochs: int = 1,
    key: jax.Array | None = None,
    rng: jax.Array | None = None,
    eval_fn: Callable | None = None,
    eval_data: PyTree = None,
    eval_every: int | None = None,
    best: tuple[str, str] | None = None,
    patience: int | None = None,
    log_every: int | None = None,
    unroll: int = 1,
    chunk_steps: int | None = None,
    progress: bool | None = None,
    on_chunk: Callable[[ChunkInfo], Any] | None = None,
    log_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    resume: bool = True,
    nan_policy: str | None = None,
    mesh: Any = None,
    devices: Any = None,
    steps_per_epoch: int | None = None,
    compile_cache: str | os.PathLike | None = None,
    loggers: Any = None,
    param_sharding: Any = None,
) -> StepsResult:
    """Runs ``scan_steps``' loop in compiled chunks, with checkpoints and resume.

    The result is bitwise equal (on CPU) to ``scan_steps`` with the same
    arguments, whatever ``chunk_steps`` is.

    Args:
      step_fn, state, data, steps, epochs, key, rng, eval_fn, eval_data,
        eval_every, best, patience, log_every, unroll: as for ``scan_steps``.
        ``data`` may also be NumPy arrays and memmaps (streamed a chunk at a
        time) or an iterable of microbatches, as for ``fit``.
      chunk_steps, progress, log_dir, checkpoint_dir, checkpoint_every, keep,
        resume, mesh, devices, steps_per_epoch, compile_cache, loggers: as for ``fit``
        (SIGTERM too: the chunk in flight completes and is checkpointed, then
        ``scanfit.Preempted``). Checkpoints
        hold the whole state (typed and raw PRNG keys, environment states,
        several optimizer states) and the metrics so far; a resumed run
        continues bitwise. The fingerprint covers the step as compiled (what
        it closes over: learning rates, network definitions), the initial
        state, the data and the settings. With ``mesh``/``devices`` the state
        is replicated and each batch's axis 1 sharded over ``"data"``.
      param_sharding: as for ``fit``, over the whole state: ``"fsdp"`` splits
        every leaf of at least 1024 elements (params, optimizer moments alike)
        along its largest dimension the mesh's ``"fsdp"`` (else ``"data"``)
        axis divides; a pytree of ``PartitionSpec`` matches ``state``; a
        function gets ``(path, leaf)``. A state placed on the mesh as given
        keeps its shardings.
      on_chunk: called as ``on_chunk(info)`` after each chunk: ``info.state``
        is the state after it, ``info.aux`` the mean of each metric over the
        chunk; returning ``False`` stops the run cleanly.
      nan_policy: ``"raise"`` (what ``None`` means): a step whose
        ``metrics["loss"]`` is non-finite, or a state with any non-finite
        leaf after a chunk, raises ``DivergenceError`` with the first bad step
        as ``.step`` and the state before it as ``.state`` (a
        ``StepsResult``); ``"ignore"``: go on. (``"skip"`` is for ``fit``:
        a step decides itself what skipping means.)

    Returns:
      A ``StepsResult`` covering every step of the run, resumed ones included.

    Raises:
      DivergenceError, DataExhaustedError, scanfit.CheckpointMismatchError,
      scanfit.CheckpointLockedError, scanfit.CheckpointWriteError,
      KeyboardInterrupt, scanfit.Preempted: as for ``fit``.
      ValueError, TypeError: bad arguments, as for ``scan_steps`` and ``fit``.

    Example:
      >>> import jax, jax.numpy as jnp, scanfit
      >>> def step(state, batch, rng):  # a random walk that makes its own data
      ...     return state + jax.random.normal(rng), {"position": state}
      >>> res = scanfit.fit_steps(step, jnp.float32(0), steps=100, rng=jax.random.key(0),
      ...                         chunk_steps=25)
      >>> ref = scanfit.scan_steps(step, jnp.float32(0), steps=100, rng=jax.random.key(0))
      >>> bool(res.state == ref.state), res.metrics["position"].shape
      (True, (100,))
    """
    cache_dir = _compile_cache.check_dir(compile_cache)
    checked, stream, n, key, batch = _checked_data(
        data, steps=steps, epochs=epochs, key=key, unroll=unroll, steps_per_epoch=steps_per_epoch
    )
    n_steps, metrics_spec = _steps.check_steps_args(
        step_fn, state, data, steps=steps, epochs=epochs, key=key, rng=rng, unroll=unroll,
        batch_spec=batch,
    )  # fmt: skip
    n = n_steps if data is None else n
    policy = check_fit_settings(
        chunk_steps=chunk_steps, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        keep=keep, nan_policy=nan_policy, skip_nonfinite=False, on_chunk=on_chunk,
        progress=progress, resume=resume, log_dir=log_dir,
    )  # fmt: skip
    if policy == "skip":
        raise ValueError(
            "nan_policy='skip' is for fit's loss + optax step; in fit_steps a step decides "
            "what skipping means (e.g. optax.apply_if_finite). Pass 'raise' or 'ignore'."
        )
    loggers = _trackers.check(loggers, log_dir)
    mesh, eval_data = on_mesh(mesh, devices, checked, eval_data)
    evaluation = _steps.eval_spec(
        eval_fn, eval_data, state, eval_every=eval_every, best=best, patience=patience,
        log_every=log_every, updates=epochs * n, train_batch=batch,
    )  # fmt: skip
    loss_spec = jax.eval_shape(_steps._loss_of, metrics_spec)
    init = functools.partial(
        initial_state, state, (), None, None, evaluation, eval_data, mesh, param_sharding
    )
    run = Run(
        step=_steps.UserStep(step_fn, rng is not None), init=init, params=state,
        model_state=None, data=data, checked=checked, stream=stream, n=n, epochs=epochs,
        key=key, rng=rng,
        evaluation=evaluation, eval_data=eval_data, log_every=log_every, mesh=mesh,
        policy=policy, output_spec=(loss_spec, metrics_spec), finish=_finish(evaluation),
        unroll=unroll, fingerprint=_checkpointer.eval_entries(evaluation, state, None, eval_data),
        has_loss="loss" in metrics_spec,
    )  # fmt: skip
    carry, history = execute(
        run, chunk_steps=chunk_steps, progress=progress, on_chunk=on_chunk, log_dir=log_dir,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep=keep,
        resume=resume, compile_cache=cache_dir, loggers=loggers,
    )  # fmt: skip
    result = run.finish(history.result(carry))
    _nonfinite.warn_nonfinite_metrics(result, stacklevel=4)
    return result
