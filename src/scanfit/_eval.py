"""Evaluation inside the compiled program: metric means, the best state, early stopping.

Pure: everything here runs under ``jit`` and ``vmap``. A run (or one of fit's
chunks) is laid out in *pieces* that end where an evaluation falls, i.e. where
the number of updates done crosses a multiple of ``every`` (counted over the
whole run, wherever a chunk starts) or reaches the end of the run: a head up
to the first such boundary, ``n_full`` whole intervals scanned by one
``lax.scan`` (so the body is traced once whatever the run's length), and a
tail. With ``patience``, each piece sits inside one ``lax.cond`` that skips it
once the run has stopped: a cond per interval costs nothing, where a cond per
update costs ~70% of an update on CPU (DESIGN.md). Under ``vmap`` (``sweep``)
the cond becomes a select: stopped configs compute the piece and discard it.

With ``log_every=K`` per-update losses and aux are not stacked: the carry
holds per-K sums and counts, written by a dynamic index (in place in XLA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

PyTree = Any
MODES = ("min", "max")


class EvalSpec(NamedTuple):
    """How a run evaluates. Static: hashable, part of the compiled program."""

    fn: Callable  # fn(params, batch) -> {name: scalar}; (params, model_state, batch) if extended
    extended: bool
    every: int  # updates between evaluations, counted over the whole run
    best: tuple[str, str] | None  # (metric name, "min" | "max"), or None: no best tracked
    patience: int | None  # stop after this many evaluations without improvement


class EvalState(NamedTuple):
    """The evaluation bookkeeping, carried through the run and between fit's chunks."""

    best_params: PyTree  # params at the best evaluation (the initial ones before); None w/o best
    best_model_state: PyTree  # model state at the best evaluation; None without best or state
    best_score: jax.Array  # shape=(), the best metric, negated for "max" (lower is better); +inf
    best_step: jax.Array  # shape=(), int32: updates done at the best evaluation; -1 before one
    since_best: jax.Array  # shape=(), int32: evaluations since the best
    stopped_at: jax.Array  # shape=(), int32: update at which early stopping ended the run; -1


class Log(NamedTuple):
    """Per-``log_every`` sums of the losses and aux of one program (scan_train or a chunk)."""

    base: jax.Array  # shape=(), int32: updates done when the program started
    loss: jax.Array  # shape=(slots,): sum of the losses of the updates in each slot
    aux: PyTree  # leaves (slots, ...): sums of aux, in at least float32
    count: jax.Array  # shape=(slots,), int32: updates done in each slot


class Layout(NamedTuple):
    """Updates ``[start, start + count)`` of a run as pieces ending at evaluations; static."""

    head: int  # updates before the first whole interval
    head_eval: bool  # an evaluation follows the head
    n_full: int  # whole intervals of ``every`` updates, each followed by an evaluation
    every: int
    tail: int  # updates after the last whole interval
    tail_eval: bool  # an evaluation follows the tail (it ends the run)

    @property
    def evaluations(self) -> int:
        return int(self.head_eval) + self.n_full + int(self.tail_eval)


def layout(start: int, count: int, every: int | None, total: int) -> Layout:
    """The pieces of updates ``[start, start + count)`` of a run of ``total`` updates.

    Evaluations fall after update counts that are multiples of ``every`` and
    after the last update of the run; ``every=None``: no evaluation.

    Example:
      >>> layout(7, 10, 5, 20)  # evaluations after 10 and 15 updates
      Layout(head=3, head_eval=True, n_full=1, every=5, tail=2, tail_eval=False)
      >>> layout(0, 12, 5, 12).evaluations  # after 5, 10 and the last (12)
      3
    """
    end = start + count
    if every is None:
        return Layout(0, False, 0, 1, count, False)
    head = min(end, -(-start // every) * every) - start
    head_eval = head > 0 and ((start + head) % every == 0 or start + head == total)
    n_full = (end - start - head) // every
    tail = count - head - n_full * every
    return Layout(head, head_eval, n_full, every, tail, tail > 0 and end == total)


def as_float(x: jax.Array) -> jax.Array:
    """``x`` in a floating dtype of at least float32 precision, to sum without overflow."""
    return jnp.asarray(x, jnp.result_type(x, jnp.float32))


def call(spec: EvalSpec, params: PyTree, model_state: PyTree, batch: PyTree) -> dict:
    """The user's metrics on one eval microbatch, each a float scalar."""
    out = spec.fn(params, model_state, batch) if spec.extended else spec.fn(params, batch)
    return {name: as_float(value) for name, value in out.items()}


def evaluate(spec: EvalSpec, params: PyTree, model_state: PyTree, eval_data: PyTree) -> dict:
    """The mean of each metric over the M eval microbatches (leaves of eval_data: (M, ...)).

    An inner scan, not a vmap: memory holds one microbatch's activations. With
    ``eval_data=None`` (the step form: an evaluation that makes its own data, e.g.
    episodes), the metrics of one call with ``batch=None``.
    """
    if eval_data is None:
        return call(spec, params, model_state, None)
    m = jax.tree.leaves(eval_data)[0].shape[0]
    shapes = jax.eval_shape(lambda b: call(spec, params, model_state, b), _first(eval_data))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def add(total, batch):
        return jax.tree.map(jnp.add, total, call(spec, params, model_state, batch)), None

    total, _ = lax.scan(add, zeros, eval_data)
    return jax.tree.map(lambda t: t / jnp.asarray(m, t.dtype), total)


def _first(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)


def init(spec: EvalSpec, params: PyTree, model_state: PyTree, eval_data: PyTree) -> EvalState:
    """The bookkeeping before any evaluation; best state = a copy of the initial one."""
    shapes = jax.eval_shape(lambda b: call(spec, params, model_state, b), _first(eval_data))
    dtype = shapes[spec.best[0]].dtype if spec.best else jnp.float32
    keep = spec.best is not None
    int32 = lambda v: jnp.full((), v, jnp.int32)  # noqa: E731  (distinct buffers: fit donates)
    return EvalState(
        jax.tree.map(jnp.copy, params) if keep else None,
        jax.tree.map(jnp.copy, model_state) if keep else None,
        jnp.full((), jnp.inf, dtype),
        int32(-1),
        int32(0),
        int32(-1),
    )


def record(spec: EvalSpec, ev: EvalState, state: Any, metrics: dict) -> EvalState:
    """Updates the best state and the patience count after an evaluation of ``state``.

    An evaluation improves on the best when its metric is strictly better (a NaN
    never does). ``patience`` evaluations in a row without improvement stop the run.
    """
    if spec.best is None:
        return ev
    name, mode = spec.best
    score = metrics[name] if mode == "min" else -metrics[name]
    better = score < ev.best_score
    since = jnp.where(better, 0, ev.since_best + 1)
    stopped = ev.stopped_at
    if spec.patience is not None:
        stopped = jnp.where((stopped < 0) & (since >= spec.patience), state.step, stopped)
    return EvalState(
        optax.tree_utils.tree_where(better, state.params, ev.best_params),
        optax.tree_utils.tree_where(better, state.model_state, ev.best_model_state),
        jnp.where(better, score, ev.best_score),
        jnp.where(better, state.step, ev.best_step),
        since,
        stopped,
    )


def init_log(state: Any, slots: int, loss_spec: Any, aux_spec: PyTree) -> Log:
    """Empty sums for ``slots`` groups of ``log_every`` updates, starting at ``state.step``."""

    def zeros(s):
        return jnp.zeros((slots, *s.shape), jnp.result_type(s.dtype, jnp.float32))

    count = jnp.zeros(slots, jnp.int32)
    return Log(state.step, zeros(loss_spec), jax.tree.map(zeros, aux_spec), count)


def logging(update: Callable, log_every: int | None) -> Callable:
    """The update as a scan body over ``(state, log)``; with a log, nothing is stacked."""

    def body(carry, x):
        state, log = carry
        new, (loss, aux) = update(state, x)
        if log is None:
            return (new, None), (loss, aux)
        slot = (state.step - log.base) // log_every
        add = lambda total, v: total.at[slot].add(v.astype(total.dtype))  # noqa: E731
        log = Log(
            log.base,
            add(log.loss, loss),
            jax.tree.map(add, log.aux, aux),
            log.count.at[slot].add(1),
        )
        return (new, log), None

    return body


def log_means(log: Log) -> tuple[jax.Array, PyTree]:
    """Mean loss and aux of each slot: NaN for a slot where no update ran (after a stop)."""

    def mean(total):
        count = log.count.reshape(-1, *(1,) * (total.ndim - 1)).astype(total.dtype)
        return total / count

    return mean(log.loss), jax.tree.map(mean, log.aux)


def _missing(s: jax.ShapeDtypeStruct) -> jax.Array:
    """What a skipped piece reports: NaN, or -1 for integers (False for bools)."""
    if jnp.issubdtype(s.dtype, jnp.inexact):
        return jnp.full(s.shape, jnp.nan, s.dtype)
    return jnp.full(s.shape, -1 if jnp.issubdtype(s.dtype, jnp.integer) else 0, s.dtype)


def _piece(run_piece, length: int, with_eval: bool, spec: EvalSpec | None, eval_data):
    """Runs ``length`` updates then, if ``with_eval``, evaluates; skipped once stopped."""

    def go(carry, xs):
        carry, outs = run_piece(carry, xs, length)
        if not with_eval:
            return carry, (outs, None)
        state, log = carry
        metrics = evaluate(spec, state.params, state.model_state, eval_data)
        state = state._replace(evaluation=record(spec, state.evaluation, state, metrics))
        return (state, log), (outs, {**metrics, "step": state.step})

    if spec is None or spec.patience is None:
        return go

    def skip(carry, xs):
        return carry, jax.tree.map(_missing, jax.eval_shape(go, carry, xs)[1])

    def piece(carry, xs):
        return lax.cond(carry[0].evaluation.stopped_at >= 0, skip, go, carry, xs)

    return piece


def run_pieces(carry, lay: Layout, xs, run_piece, spec: EvalSpec | None, eval_data, unroll=1):
    """Runs the pieces of ``lay`` from ``carry = (state, log)``.

    Args:
      lay: the layout of the updates.
      xs: ``(head_xs, full_xs, tail_xs)``, what ``run_piece`` takes for each piece;
        ``full_xs`` leaves have a leading axis ``lay.n_full``.
      run_piece: ``run_piece(carry, xs, length) -> (carry, per-update outputs)``.

    Returns:
      ``(carry, outs, metrics)``: per-update outputs concatenated, leading axis the
      updates (None with a log); metrics ``{name: (evaluations,)}`` with ``"step"``,
      or None without evaluations.
    """
    head_xs, full_xs, tail_xs = xs
    parts = []
    if lay.head:
        carry, out = _piece(run_piece, lay.head, lay.head_eval, spec, eval_data)(carry, head_xs)
        parts.append(jax.tree.map(lambda a: a[None], out))
    if lay.n_full:
        interval = _piece(run_piece, lay.every, True, spec, eval_data)
        carry, out = lax.scan(interval, carry, full_xs)
        parts.append(out)
    if lay.tail:
        carry, out = _piece(run_piece, lay.tail, lay.tail_eval, spec, eval_data)(carry, tail_xs)
        parts.append(jax.tree.map(lambda a: a[None], out))
    outs = _concat([p[0] for p in parts], per_update=True)
    metrics = _concat([p[1] for p in parts if p[1] is not None], per_update=False)
    return carry, outs, metrics


def _concat(parts: list, *, per_update: bool):
    """Joins pieces' outputs, each with a leading pieces axis (and an updates axis after)."""
    if not parts:
        return None
    flat = (lambda a: a.reshape(-1, *a.shape[2:])) if per_update else (lambda a: a)  # noqa: E731
    return jax.tree.map(lambda *a: jnp.concatenate([flat(x) for x in a]), *parts)


def pad(values: np.ndarray, length: int) -> np.ndarray:
    """Host side: ``values`` (n, ...) extended to ``length`` as a skipped piece reports them."""
    kind = values.dtype.kind
    inexact = kind in "fc" or values.dtype.name == "bfloat16"
    fill = np.nan if inexact else (-1 if kind in "iu" else 0)
    extra = np.full((length - len(values), *values.shape[1:]), fill, values.dtype)
    return np.concatenate([values, extra])
