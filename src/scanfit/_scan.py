"""The core: a step scanned over a carry, as one XLA program. Pure, jittable, vmappable.

A *step* is a static (hashable) factory: ``step(rng)`` returns the scan body
``body(carry, batch) -> (carry, (loss, aux))`` that does one update of the
carry (a ``TrainState``) and counts it. Two factories exist: loss + optax
(``_loop.OptaxStep``, behind ``scan_train``, ``fit`` and ``sweep``) and the
user's own step (``_steps.UserStep``, behind ``scan_steps`` and ``fit_steps``).
Everything here is shared by both: the epochs and shuffling, the pieces that
end at evaluations (``_eval``), per-``log_every`` means, fit's chunks and the
divergence search.

Layout of a whole run: an outer ``lax.scan`` over epochs and an inner one over
updates. Per-update outputs are ``(loss, aux)``: a scalar and whatever the
step reports, so memory stays small whatever N is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from scanfit import _eval

PyTree = Any


class TrainState(NamedTuple):
    """The scan carry."""

    params: PyTree  # the trained params; in the step form, the step's whole state
    opt_state: PyTree
    model_state: PyTree  # carried through every microbatch, never differentiated; or None
    step: jax.Array  # shape=(), int32: updates done so far (over the whole run in fit)
    skipped: jax.Array  # shape=(), int32
    first_nonfinite: jax.Array  # shape=(), int32, -1 if none
    evaluation: _eval.EvalState | None = None  # best state, patience, stop; None without eval_fn


def init_state(
    params: PyTree, opt_state: PyTree, model_state: PyTree = None, evaluation=None
) -> TrainState:
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the carry is donated)
    return TrainState(
        params, opt_state, model_state, zero(), zero(), jnp.full((), -1, jnp.int32), evaluation
    )


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every inexact leaf is finite (integer counters and PRNG keys always are)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


class Step(Protocol):
    """A step factory: static, part of the compiled program (hashable, compared by value)."""

    accumulate: int  # microbatches one update consumes (1 in the step form)

    def __call__(self, rng: jax.Array | None) -> Callable[[TrainState, PyTree], tuple]:
        """The scan body ``(carry, microbatches) -> (carry, (loss, aux))``; it increments
        ``carry.step`` and records ``carry.first_nonfinite``."""


def epoch_order(key: jax.Array, epoch: int | jax.Array, n: int) -> jax.Array:
    """The microbatch order of ``epoch``: ``permutation(fold_in(key, epoch), n)``."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def group(data: PyTree, accumulate: int) -> PyTree:
    """Reshape leaves from (N, ...) to (N // accumulate, accumulate, ...); as is for 1.

    Without accumulation the data is scanned as it is: a reshape to (N, 1, ...)
    made XLA copy the whole dataset before the loop.
    """
    if accumulate == 1:
        return data
    return jax.tree.map(
        lambda a: a.reshape(a.shape[0] // accumulate, accumulate, *a.shape[1:]), data
    )


def gathering(update, data: PyTree):
    """A scan body that takes microbatch indices (accumulate,), or one index, and gathers."""

    def body(state, idx):
        return update(state, jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data))

    return body


def run_epochs(
    update, state: TrainState, data: PyTree, *, key, epochs: int, accumulate: int, unroll: int
):
    """Runs ``epochs`` passes over ``data`` as a nested scan; returns (state, (losses, aux))."""
    n = jax.tree.leaves(data)[0].shape[0]

    if key is None:
        xs = group(data, accumulate)

        def epoch(state, _):
            return lax.scan(update, state, xs, unroll=unroll)
    else:

        def epoch(state, e):
            order = group(epoch_order(key, e, n), accumulate)
            return lax.scan(gathering(update, data), state, order, unroll=unroll)

    state, (losses, aux) = lax.scan(epoch, state, jnp.arange(epochs, dtype=jnp.int32))
    flatten = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    return state, (flatten(losses), jax.tree.map(flatten, aux))


def run_laid_out(body, state: TrainState, lay, xs, expand, example, *, evaluation, eval_data,
                 log_every, unroll):  # fmt: skip
    """Runs updates laid out in pieces that end at evaluations (see ``_eval``).

    ``body(state, x)`` is one update; ``xs`` the pieces' inputs, which
    ``expand(piece_xs, length)`` turns into the ``length`` per-update inputs of a
    piece; ``example`` one per-update input (for shapes). Returns
    ``(state, losses, aux, metrics)``; with ``log_every`` losses and aux are
    means over groups of ``log_every`` updates.
    """
    log = None
    if log_every is not None:
        count = lay.head + lay.n_full * lay.every + lay.tail
        loss_spec, aux_spec = jax.eval_shape(body, state, example)[1]
        log = _eval.init_log(state, -(-count // log_every), loss_spec, aux_spec)
    step = _eval.logging(body, log_every)

    def run_piece(carry, piece_xs, length):
        return lax.scan(step, carry, expand(piece_xs, length), unroll=unroll)

    (state, log), outs, metrics = _eval.run_pieces(
        (state, log), lay, xs, run_piece, evaluation, eval_data
    )
    losses, aux = outs if log is None else _eval.log_means(log)
    return state, losses, aux, metrics


def _split(xs: PyTree, lay) -> tuple[PyTree, PyTree, PyTree]:
    """Per-update inputs (leading axis: the updates) as (head, whole intervals, tail)."""
    h, full = lay.head, lay.n_full * lay.every
    return (
        jax.tree.map(lambda a: a[:h], xs),
        jax.tree.map(lambda a: a[h : h + full].reshape(lay.n_full, lay.every, *a.shape[1:]), xs),
        jax.tree.map(lambda a: a[h + full :], xs),
    )


def _chunk_scan(update, data: PyTree, idx):
    """``(body, xs)`` to scan a chunk: over its own microbatches, or gathering by index."""
    return (update, data) if idx is None else (gathering(update, data), idx)


def run_chunk(
    step: Step,
    state: TrainState,
    data: PyTree,
    idx,
    rng=None,
    eval_data=None,
    *,
    unroll: int,
    evaluation: _eval.EvalSpec | None = None,
    layout: _eval.Layout | None = None,
    log_every: int | None = None,
):
    """A run of updates, as ``fit`` compiles it per chunk.

    With ``idx`` (int32, shape (C, accumulate), or (C,) without accumulation)
    update i gathers microbatches ``idx[i]`` from ``data`` (leaves (N, ...); with
    ``data=None`` each update gets ``batch=None``, ``idx`` only counting them);
    with ``idx=None``, ``data`` already holds the chunk's microbatches, leaves
    (C, accumulate, ...), or (C, ...) without accumulation.
    With ``evaluation``, ``layout`` (``_eval.layout`` of the chunk's updates in the
    run) says where evaluations fall, so a chunk boundary never moves one.
    Returns ``(state, losses, aux, state_finite, metrics)``: ``state_finite`` is a
    scalar bool, all of the params, optimizer state and model state finite,
    computed in the graph once per chunk, so the host reads one flag instead of
    walking the state (an infinite Adam ``nu`` leaves params finite but frozen:
    it must count); ``metrics`` are the chunk's evaluations (None without), as
    ``TrainResult.metrics``.
    """
    body, xs = _chunk_scan(step(rng), data, idx)
    if evaluation is None and log_every is None:
        state, (losses, aux) = lax.scan(body, state, xs, unroll=unroll)
        metrics = None
    else:
        count = jax.tree.leaves(xs)[0].shape[0]
        lay = layout if evaluation is not None else _eval.layout(0, count, None, count)
        state, losses, aux, metrics = run_laid_out(
            body, state, lay, _split(xs, lay), lambda x, _: x,
            jax.tree.map(lambda a: a[0], xs), evaluation=evaluation, eval_data=eval_data,
            log_every=log_every, unroll=unroll,
        )  # fmt: skip
    finite = all_finite((state.params, state.opt_state, state.model_state))
    return state, losses, aux, finite, metrics


def finite_per_update(
    step: Step, state: TrainState, data: PyTree, idx, rng=None, *, unroll: int
) -> jax.Array:
    """Re-runs a chunk as ``run_chunk`` does, recording which updates stayed finite.

    Returns a bool array of shape (C,): update i's loss, new params and new
    optimizer state all finite. For the host's divergence search only: the
    per-update walk over the state is what ``run_chunk`` avoids.
    """
    update = step(rng)

    def flagged(state, microbatches):
        state, (loss, _) = update(state, microbatches)
        finite = all_finite((state.params, state.opt_state, state.model_state))
        return state, jnp.isfinite(loss) & finite

    body, xs = _chunk_scan(flagged, data, idx)
    return lax.scan(body, state, xs, unroll=unroll)[1]


def update_rows(u: jax.Array, key_orders: jax.Array | None, n: int, accumulate: int):
    """The microbatch rows of update ``u`` of a run, as ``run_epochs`` visits them.

    Microbatch ``m`` of the run (over all epochs) is row ``m % n``, or with a shuffle
    key row ``key_orders[m]``, the epochs' orders concatenated.
    """
    m = u * accumulate + (jnp.arange(accumulate, dtype=jnp.int32) if accumulate > 1 else 0)
    return m % n if key_orders is None else key_orders[m]


def run(step: Step, state: TrainState, data: PyTree, key, rng=None, eval_data=None, *,
        epochs: int, unroll: int, evaluation=None, log_every=None, steps=None):  # fmt: skip
    """The whole run of ``step`` over ``epochs`` passes of ``data`` (leaves (N, ...)).

    ``data=None``: ``steps`` updates, each given ``batch=None`` (a step that makes
    its own data). Returns ``(state, losses, aux, metrics)``: losses and aux
    stacked per update (or per ``log_every`` group), metrics the evaluations
    (None without ``evaluation``).
    """
    accumulate = step.accumulate
    update = step(rng)
    if data is None and evaluation is None and log_every is None:
        state, (losses, aux) = lax.scan(lambda s, _: update(s, None), state, None, length=steps)
        return state, losses, aux, None
    if evaluation is None and log_every is None:  # the plain nested scan over epochs
        state, (losses, aux) = run_epochs(
            update, state, data, key=key, epochs=epochs, accumulate=accumulate, unroll=unroll
        )
        return state, losses, aux, None
    # Updates are addressed by their number in the run, so pieces may cross epochs.
    n = steps if data is None else jax.tree.leaves(data)[0].shape[0]
    total = epochs * n // accumulate
    orders = None
    if key is not None:  # 4 bytes per microbatch of the run, as run_epochs computes them
        epochs_ = jnp.arange(epochs, dtype=jnp.int32)
        orders = jax.vmap(lambda e: epoch_order(key, e, n))(epochs_).reshape(-1)

    def body(state, u):
        rows = update_rows(u, orders, n, accumulate)
        return update(state, jax.tree.map(lambda a: jnp.take(a, rows, axis=0), data))

    lay = _eval.layout(0, total, evaluation.every if evaluation else None, total)
    firsts = (
        jnp.int32(0),
        lay.head + lay.every * jnp.arange(lay.n_full, dtype=jnp.int32),
        jnp.int32(lay.head + lay.n_full * lay.every),
    )
    expand = lambda first, length: first + jnp.arange(length, dtype=jnp.int32)  # noqa: E731
    return run_laid_out(
        body, state, lay, firsts, expand, jnp.int32(0), evaluation=evaluation,
        eval_data=eval_data, log_every=log_every, unroll=unroll,
    )  # fmt: skip
