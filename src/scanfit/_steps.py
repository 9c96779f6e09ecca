"""Any training step in one program: the user's whole step scanned over its state.

``scan_steps`` takes ``step_fn(state, batch) -> (state, metrics)`` as it is (a
PureJaxRL ``_update_step``, a GAN's two optimizer steps, an update plus an EMA)
and runs it through the same core as ``scan_train`` (``_scan``): the step's
state rides in the carry's ``params`` slot, its metrics are the per-update
outputs. Pure, jittable, vmappable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from scanfit import _checks, _eval, _nonfinite, _scan, _xla_cpu
from scanfit._checks import describe
from scanfit._conv import canonical_convs
from scanfit._scan import PyTree, TrainState, init_state


class StepsResult(NamedTuple):
    """What ``scan_steps`` and ``fit_steps`` return."""

    state: PyTree  # the state after the last step (same structure, shapes, dtypes)
    metrics: dict[str, jax.Array]  # {name: (steps, ...)}: each step's metrics, stacked;
    #   with log_every, (steps // log_every, ...) means over each group of steps
    evals: dict[str, jax.Array] | None = None  # with eval_fn: {name: (evaluations,)} and
    #   "step" (int32): steps done at each evaluation; after an early stop NaN and step -1
    best_state: PyTree = None  # with best: the state at the best evaluation; else None
    best_step: jax.Array | None = None  # with best: shape=(), int32; -1 if none improved
    stopped_at: jax.Array | None = None  # with eval_fn: shape=(), int32: the step at which
    #   early stopping ended the run; -1 if it ran to the end
    first_nonfinite: jax.Array | None = None  # shape=(), int32: first step whose
    #   metrics["loss"] was non-finite; -1 if none (or no "loss" metric)


def _loss_of(metrics: dict) -> jax.Array:
    """The step's scalar for divergence checks: ``metrics["loss"]`` (mean if not a scalar),
    else 0 (never non-finite)."""
    if "loss" not in metrics:
        return jnp.zeros((), jnp.float32)
    loss = jnp.asarray(metrics["loss"])
    return loss if loss.ndim == 0 else jnp.mean(loss)


@dataclasses.dataclass(frozen=True)
class UserStep:
    """The step factory of ``scan_steps``/``fit_steps``: the user's step as it is.

    Step ``t`` of the run (counted over the whole run, whatever the chunking)
    gets ``jax.random.fold_in(rng, t)`` when ``with_rng``.
    """

    step_fn: Callable
    with_rng: bool = False
    accumulate: int = 1  # a step takes one batch (or None)

    def __call__(self, rng: jax.Array | None = None):
        def body(carry: TrainState, batch):
            args = (carry.params, batch)
            if self.with_rng:
                args = (*args, jax.random.fold_in(rng, carry.step))
            state, metrics = self.step_fn(*args)
            loss = _loss_of(metrics)
            bad = (carry.first_nonfinite < 0) & ~jnp.isfinite(loss)
            carry = carry._replace(
                params=state,
                step=carry.step + 1,
                first_nonfinite=jnp.where(bad, carry.step, carry.first_nonfinite),
            )
            return carry, (loss, metrics)

        return body


def initial_carry(state: PyTree) -> TrainState:
    """The carry of a step loop: the state in the params slot, no optimizer or model state."""
    return init_state(state, (), None)


def result_of(carry: TrainState, metrics, evals, evaluation) -> StepsResult:
    """The StepsResult of a final carry: the evaluation fields only with evaluation."""
    base = StepsResult(carry.params, metrics, first_nonfinite=carry.first_nonfinite)
    if evaluation is None:
        return base
    ev, best = carry.evaluation, evaluation.best is not None
    return base._replace(
        evals=evals,
        best_state=ev.best_params if best else None,
        best_step=ev.best_step if best else None,
        stopped_at=ev.stopped_at,
    )


def check_steps_args(step_fn, state, data, *, steps, epochs, key, rng, unroll,
                     batch_spec) -> tuple[int, Any]:  # fmt: skip
    """Checks ``scan_steps``' arguments before tracing; returns ``(n, metrics_spec)``:
    steps per epoch, and the shapes of one step's metrics.

    ``batch_spec`` is one batch's shapes (None with ``data=None``).
    """
    if not callable(step_fn):
        raise TypeError(
            f"step_fn must be callable as step_fn(state, batch) -> (state, metrics), got "
            f"{describe(step_fn)}."
        )
    if data is None:
        if steps is None:
            raise ValueError(
                "steps is required with data=None: the number of steps to run, each called "
                "with batch=None (a step that makes its own data); got steps=None."
            )
        if not _checks._is_int(steps) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
        if epochs != 1 or key is not None:
            raise ValueError(
                f"epochs and key shuffle data; with data=None pass steps only, got "
                f"epochs={epochs!r}, key={describe(key)}."
            )
        n = int(steps)
    else:
        if steps is not None:
            raise ValueError(
                f"steps is for data=None; with data, the steps are epochs * N (N microbatches "
                f"along axis 0), got steps={steps!r}."
            )
        n = None
    _checks.check_key(rng, "rng")
    leaves = jax.tree_util.tree_leaves_with_path(state)
    for path, leaf in leaves:
        if not hasattr(leaf, "dtype") and not isinstance(leaf, (int, float, bool, complex)):
            raise TypeError(
                f"state{jax.tree_util.keystr(path)} must be an array or a number, got "
                f"{describe(leaf)}; non-array fields belong in step_fn's closure (or a "
                "pytree's static fields, e.g. flax.struct.field(pytree_node=False))."
            )
    return n, _check_step(step_fn, state, batch_spec, rng)


def _check_step(step_fn, state, batch_spec, rng) -> Any:
    """Traces one step abstractly; the new state must match ``state`` leaf for leaf."""
    form = "step_fn(state, batch, rng)" if rng is not None else "step_fn(state, batch)"
    args = (state, batch_spec) if rng is None else (state, batch_spec, rng)
    try:
        out = jax.eval_shape(step_fn, *args)
    except TypeError as err:  # a str or an object among the outputs
        if "not a valid JAX type" not in str(err):
            raise
        raise ValueError(
            f"step_fn must return (state, metrics) of arrays, as {form}; {err}"
        ) from None
    if not isinstance(out, tuple) or len(out) != 2:
        raise ValueError(f"step_fn must return (state, metrics) as {form}, got {describe(out)}.")
    new, metrics = out
    want, got = _checks._spec(state), new
    if jax.tree.structure(want) != jax.tree.structure(got):
        raise ValueError(
            f"step_fn must return a state of the structure it was given, as {form} -> "
            f"(state, metrics); it was given {jax.tree.structure(want)} and returned "
            f"{jax.tree.structure(got)}."
        )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        if a.shape != b.shape or a.dtype != b.dtype:
            where = "state" + jax.tree_util.keystr(path)
            raise ValueError(
                f"step_fn changed {where} from {a.dtype}{list(a.shape)} to "
                f"{b.dtype}{list(b.shape)}; a step must keep every leaf's shape and dtype "
                "(cast it back, e.g. x.astype(old.dtype))."
            )
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        raise ValueError(
            f"step_fn must return metrics as a dict of name -> array (e.g. {{'loss': loss}}, "
            f"or {{}}), as {form} -> (state, metrics); got {describe(metrics)}."
        )
    for name, value in metrics.items():
        if not isinstance(value, jax.ShapeDtypeStruct):
            raise ValueError(
                f"step_fn's metrics[{name!r}] must be an array, got {describe(value)}."
            )
    return metrics


def eval_spec(eval_fn, eval_data, state, *, eval_every, best, patience, log_every, updates,
              train_batch=None):  # fmt: skip
    """Checks the evaluation arguments of the step form; the static spec or None.
    ``train_batch``: one training microbatch's shapes (None without data)."""
    form = "eval_fn(state, batch)" if eval_data is not None else "eval_fn(state, None)"

    def metrics_of(batch):
        return jax.eval_shape(eval_fn, state, batch)

    _checks.check_eval_args(
        eval_fn, eval_data, eval_every=eval_every, best=best, patience=patience, form=form,
        metrics_of=metrics_of, data_optional=True, train_batch=train_batch,
    )  # fmt: skip
    _checks.check_log_every(log_every, updates)
    if eval_fn is None:
        return None
    best = None if best is None else (best[0], best[1])
    return _eval.EvalSpec(eval_fn, False, eval_every or updates, best, patience)


def first_batch(data: PyTree) -> PyTree:
    """The shapes of one microbatch of stacked data (None for None)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), data)


def run(step: UserStep, state, data, key, rng, eval_data, *, epochs, steps, unroll,
        evaluation, log_every) -> StepsResult:  # fmt: skip
    """The whole step loop, unjitted: scan_steps compiles it."""
    carry = initial_carry(state)
    if evaluation is not None:
        carry = carry._replace(evaluation=_eval.init(evaluation, state, None, eval_data))
    carry, _, metrics, evals = _scan.run(
        step, carry, data, key, rng, eval_data, epochs=epochs, unroll=unroll,
        evaluation=evaluation, log_every=log_every, steps=steps,
    )  # fmt: skip
    return result_of(carry, metrics, evals, evaluation)


_STATIC = ("step", "epochs", "steps", "unroll", "evaluation", "log_every")
_run_jit = _xla_cpu.jit(canonical_convs(run), static_argnames=_STATIC)


@_checks.integer_settings
def scan_steps(
    step_fn: Callable,
    state: PyTree,
    data: PyTree = None,
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
) -> StepsResult:
    """Runs the user's whole training step over and over in one XLA program.

    Args:
      step_fn: ``step_fn(state, batch) -> (state, metrics)``; with ``rng``,
        ``step_fn(state, batch, rng)``. ``metrics`` is a dict of arrays of
        fixed shapes (scalars usually; ``{}`` for none); a ``"loss"`` entry is
        what divergence checks read (``fit_steps``, ``res.first_nonfinite``).
        The new state must keep the structure, shapes and dtypes of ``state``.
      state: any pytree of arrays: params, optimizer states, environment
        states, PRNG keys (typed or raw), counters.
      data: a pytree of arrays with a leading axis N of microbatches, scanned
        ``epochs`` times (``batch`` is one microbatch); or ``None`` with
        ``steps``: the step makes its own data (environment rollouts) and is
        called with ``batch=None``.
      steps: the number of steps with ``data=None``.
      epochs, key: passes over ``data``; with ``key``, epoch ``e`` visits the
        microbatches in the order ``permutation(fold_in(key, e), N)``.
      rng: a PRNG key; step ``t`` (from 0 over the whole run) gets
        ``jax.random.fold_in(rng, t)``.
      eval_fn: ``eval_fn(state, batch) -> {name: scalar}``, averaged over the M
        microbatches of ``eval_data``; with ``eval_data=None`` called once as
        ``eval_fn(state, None)`` (e.g. evaluation episodes). Evaluated every
        ``eval_every`` steps and after the last.
      best, patience: as for ``scan_train``: ``best=(name, "min"|"max")`` keeps
        the best state in the carry; ``patience`` evaluations without
        improvement stop the run (the remaining steps are skipped in the
        program).
      log_every: ``res.metrics`` holds means over groups of this many steps
        (summed in the carry, not stacked); it must divide the steps.
      unroll: passed to the inner ``lax.scan``.

    Returns:
      A ``StepsResult``: ``state``, ``metrics`` (``{name: (steps, ...)}``),
      and with ``eval_fn`` ``evals``, ``best_state``, ``best_step``,
      ``stopped_at``.

    Raises:
      ValueError: ``step_fn`` returning something other than ``(state,
        metrics)``, a state of another structure, a leaf of another shape or
        dtype, non-array metrics; ``steps`` missing with ``data=None`` (or
        given with data); bad data, ``epochs``, evaluation arguments or
        ``log_every`` (as for ``scan_train``).
      TypeError: ``step_fn`` not callable, ``rng``/``key`` not PRNG keys, a
        state leaf that is not an array.

    Example:
      >>> import jax, jax.numpy as jnp, optax, scanfit
      >>> opt = optax.sgd(0.1)
      >>> def step(state, batch):  # SGD on the params, and an EMA of them
      ...     params, opt_state, ema = state
      ...     loss, g = jax.value_and_grad(lambda p: jnp.mean((p * batch - 2 * batch) ** 2))(params)
      ...     updates, opt_state = opt.update(g, opt_state)
      ...     params = optax.apply_updates(params, updates)
      ...     return (params, opt_state, 0.9 * ema + 0.1 * params), {"loss": loss}
      >>> w = jnp.float32(0.0)
      >>> res = scanfit.scan_steps(step, (w, opt.init(w), w), jnp.ones((10, 4)), epochs=5)
      >>> res.metrics["loss"].shape, round(float(res.state[0]), 3)
      ((50,), 2.0)
    """
    if data is not None:
        n = _checks.check_data(data)
        _checks.check_loop_settings(n, epochs=epochs, accumulate=1, unroll=unroll)
        key = _checks.check_key(key)
    else:
        _checks.check_loop_settings(1, epochs=1, accumulate=1, unroll=unroll)
    batch = None if data is None else first_batch(data)
    steps_n, _ = check_steps_args(
        step_fn, state, data, steps=steps, epochs=epochs, key=key, rng=rng, unroll=unroll,
        batch_spec=batch,
    )  # fmt: skip
    updates = steps_n if data is None else epochs * n
    evaluation = eval_spec(
        eval_fn, eval_data, state, eval_every=eval_every, best=best, patience=patience,
        log_every=log_every, updates=updates, train_batch=batch,
    )  # fmt: skip
    result = _run_jit(
        UserStep(step_fn, rng is not None), state, data, key, rng, eval_data, epochs=epochs,
        steps=steps_n, unroll=unroll, evaluation=evaluation, log_every=log_every,
    )  # fmt: skip
    _nonfinite.warn_nonfinite_metrics(result, stacklevel=4)
    return result
