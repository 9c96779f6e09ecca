"""The general training loop as one XLA program: pure, jittable, vmappable.

Layout of the program: an outer ``lax.scan`` over epochs and an inner one over
updates; an update is one optimizer step on the mean gradient of ``accumulate``
consecutive microbatches, themselves an innermost scan. Per-update outputs are
the scalar loss (and the user's ``aux``), so memory stays small whatever N is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from scanfit import _checks

PyTree = Any


class TrainResult(NamedTuple):
    """What a training run returns (``scan_train``, ``fit``, and per config ``sweep``)."""

    params: PyTree  # same structure, shapes and dtypes as the initial params
    opt_state: PyTree  # optimizer state after the last update; pass it back to continue
    losses: jax.Array  # shape=(updates,), the loss of each update (mean over accumulate)
    aux: PyTree  # has_aux: aux of each update, leaves stacked on axis 0; else None
    skipped: jax.Array  # shape=(), int32: updates skipped as non-finite (skip_nonfinite)
    first_nonfinite: jax.Array  # shape=(), int32: first update with a non-finite loss
    #   (with skip_nonfinite: loss, gradient or new params), counted from 0; -1 if none


class TrainState(NamedTuple):
    """The scan carry."""

    params: PyTree
    opt_state: PyTree
    step: jax.Array  # shape=(), int32: updates done so far in this call
    skipped: jax.Array  # shape=(), int32
    first_nonfinite: jax.Array  # shape=(), int32, -1 if none


def init_state(params: PyTree, opt_state: PyTree) -> TrainState:
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the carry is donated)
    return TrainState(params, opt_state, zero(), zero(), jnp.full((), -1, jnp.int32))


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def make_update(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    accumulate: int,
    has_aux: bool,
    skip_nonfinite: bool,
) -> Callable[[TrainState, PyTree], tuple[TrainState, tuple[jax.Array, PyTree]]]:
    """The scan body: one optimizer update from ``accumulate`` microbatches.

    The returned ``update(state, microbatches)`` takes microbatches whose leaves
    have a leading axis of length ``accumulate`` and returns the new state and
    ``(loss, aux)`` of this update.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def loss_and_grad(params, batch):
        out, grads = grad_fn(params, batch)
        loss, aux = out if has_aux else (out, None)
        return loss, aux, grads

    def mean_over_microbatches(params, microbatches):
        if accumulate == 1:  # microbatches is the batch itself: no extra axis, no copy
            return loss_and_grad(params, microbatches)

        # An inner scan sums the k gradients, so memory holds one gradient, not k.
        def add(total, batch):
            loss, aux, grads = loss_and_grad(params, batch)
            return jax.tree.map(jnp.add, total, (loss, grads)), aux

        first = jax.tree.map(lambda a: a[0], microbatches)
        loss0, aux0, grads0 = loss_and_grad(params, first)
        rest = jax.tree.map(lambda a: a[1:], microbatches)
        (loss, grads), auxs = lax.scan(add, (loss0, grads0), rest)
        inv = 1.0 / accumulate
        aux = jax.tree.map(
            lambda a0, a: (a0 + jnp.sum(a, axis=0)) * jnp.asarray(inv, jnp.result_type(a, float)),
            aux0,
            auxs,
        )
        scale = lambda g: g * jnp.asarray(inv, g.dtype)  # noqa: E731
        return scale(loss), aux, jax.tree.map(scale, grads)

    def update(state: TrainState, microbatches: PyTree):
        loss, aux, grads = mean_over_microbatches(state.params, microbatches)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            # Skipping must not let a non-finite gradient into params or optimizer state.
            ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
            params = optax.tree_utils.tree_where(ok, params, state.params)
            opt_state = optax.tree_utils.tree_where(ok, opt_state, state.opt_state)
        else:
            # The loss alone is nearly free to check, where a pass over grads and params each
            # update cost ~17% for a small MLP. Params that go non-finite make the next
            # loss non-finite; fit pins the exact update down on the host when it matters.
            ok = jnp.isfinite(loss)
        first_bad = jnp.where((state.first_nonfinite < 0) & ~ok, state.step, state.first_nonfinite)
        skipped = state.skipped + (~ok).astype(jnp.int32) if skip_nonfinite else state.skipped
        new_state = TrainState(params, opt_state, state.step + 1, skipped, first_bad)
        return new_state, (loss, aux)

    return update


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


def run_chunk(
    loss_fn,
    optimizer,
    state: TrainState,
    data: PyTree,
    idx,
    *,
    accumulate: int,
    has_aux: bool,
    unroll: int,
    skip_nonfinite: bool,
):
    """A run of updates, as ``fit`` compiles it per chunk.

    With ``idx`` (int32, shape (C, accumulate), or (C,) without accumulation)
    update i gathers microbatches ``idx[i]`` from ``data`` (leaves (N, ...));
    with ``idx=None``, ``data`` already holds the chunk's microbatches, leaves
    (C, accumulate, ...), or (C, ...) without accumulation.
    Returns ``(state, losses, aux, state_finite)``: the last is a scalar bool,
    all of the params and optimizer state finite, computed in the graph once
    per chunk, so the host reads one flag instead of walking the state. (An
    infinite Adam ``nu`` leaves params finite but frozen: it must count.)
    """
    update = make_update(
        loss_fn, optimizer, accumulate=accumulate, has_aux=has_aux, skip_nonfinite=skip_nonfinite
    )
    if idx is None:
        state, (losses, aux) = lax.scan(update, state, data, unroll=unroll)
    else:
        state, (losses, aux) = lax.scan(gathering(update, data), state, idx, unroll=unroll)
    return state, losses, aux, _all_finite((state.params, state.opt_state))


def finite_per_update(
    loss_fn,
    optimizer,
    state: TrainState,
    data: PyTree,
    idx,
    *,
    accumulate: int,
    has_aux: bool,
    unroll: int,
    skip_nonfinite: bool,
) -> jax.Array:
    """Re-runs a chunk as ``run_chunk`` does, recording which updates stayed finite.

    Returns a bool array of shape (C,): update i's loss, new params and new
    optimizer state all finite. For the host's divergence search only: the
    per-update walk over the state is what ``run_chunk`` avoids.
    """
    update = make_update(
        loss_fn, optimizer, accumulate=accumulate, has_aux=has_aux, skip_nonfinite=skip_nonfinite
    )

    def body(state, microbatches):
        state, (loss, _) = update(state, microbatches)
        return state, jnp.isfinite(loss) & _all_finite((state.params, state.opt_state))

    if idx is None:
        return lax.scan(body, state, data, unroll=unroll)[1]
    return lax.scan(gathering(body, data), state, idx, unroll=unroll)[1]


def train(
    loss_fn,
    params,
    optimizer,
    data,
    opt_state,
    key,
    *,
    epochs,
    accumulate,
    has_aux,
    unroll,
    skip_nonfinite,
) -> TrainResult:
    """The whole run, unjitted: scan_train compiles it, sweep vmaps it."""
    if opt_state is None:
        opt_state = optimizer.init(params)
    update = make_update(
        loss_fn, optimizer, accumulate=accumulate, has_aux=has_aux, skip_nonfinite=skip_nonfinite
    )
    state, (losses, aux) = run_epochs(
        update,
        init_state(params, opt_state),
        data,
        key=key,
        epochs=epochs,
        accumulate=accumulate,
        unroll=unroll,
    )
    return TrainResult(
        state.params,
        state.opt_state,
        losses,
        aux if has_aux else None,
        state.skipped,
        state.first_nonfinite,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "loss_fn",
        "optimizer",
        "epochs",
        "accumulate",
        "has_aux",
        "unroll",
        "skip_nonfinite",
    ),
)
def _scan_train_jit(loss_fn, params, optimizer, lr, data, opt_state, key, **settings):
    if optimizer is None:  # a float learning rate: plain SGD, lr traced so a new value
        optimizer = optax.sgd(lr)  # does not compile again
    return train(loss_fn, params, optimizer, data, opt_state, key, **settings)


def scan_train(
    loss_fn: Callable,
    params: PyTree,
    optimizer: optax.GradientTransformation | float,
    data: PyTree,
    *,
    opt_state: PyTree = None,
    epochs: int = 1,
    key: jax.Array | None = None,
    accumulate: int = 1,
    has_aux: bool = False,
    unroll: int = 1,
    skip_nonfinite: bool = False,
) -> TrainResult:
    """Trains ``params`` on every microbatch of ``data`` in one XLA program.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss``, a scalar; with ``has_aux``,
        ``-> (loss, aux)``. ``batch`` has the structure of ``data`` with the
        leading axis removed: ``data=(xb, yb)`` gives ``batch=(x, y)``.
      params: the initial parameters, any pytree of floating arrays.
      optimizer: an ``optax.GradientTransformation``, or a float: plain SGD
        with that learning rate.
      data: pytree of arrays sharing a leading axis N: N microbatches.
      opt_state: optimizer state to continue from (``TrainResult.opt_state``
        of a previous run); ``None`` calls ``optimizer.init(params)``.
      epochs: passes over the data; E passes make ``E * N // accumulate`` updates.
      key: a PRNG key. When given, the microbatch order of epoch ``e`` is
        ``jax.random.permutation(jax.random.fold_in(key, e), N)``, computed in
        the graph, so a run is reproduced from (key, epoch) alone. ``None``
        keeps the stored order.
      accumulate: each update uses the mean gradient (and reports the mean
        loss) of ``accumulate`` consecutive microbatches; N must divide by it.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is stacked per
        update (averaged over the ``accumulate`` microbatches of an update).
      unroll: passed to the inner ``lax.scan``.
      skip_nonfinite: an update whose loss, gradient or new params are
        non-finite leaves params and optimizer state unchanged, and is counted.

    Calls with the same ``loss_fn`` and ``optimizer`` objects and the same
    shapes reuse the compiled program. Build the optimizer once: writing
    ``optax.adam(1e-3)`` again makes a new object, hence a new compilation
    (a float learning rate is an argument, not part of the program).

    Returns:
      A ``TrainResult``: ``losses`` has shape ``(epochs * N // accumulate,)``.

    Raises:
      ValueError: data leaves with different leading axes, no microbatch
        (N=0) or empty ones (an axis of size 0), ``accumulate`` not dividing
        N, ``epochs < 1``, a loss that is not a scalar, an ``opt_state`` that
        does not match the optimizer and params, more than 2**31 - 1 updates,
        or stacked per-update losses and aux over 1 GiB (``fit`` runs such
        a run in chunks).
      TypeError: ``optimizer`` neither an optax transformation nor a number,
        ``key`` not a PRNG key, params not floating, ``loss_fn`` not callable,
        ``has_aux`` or ``skip_nonfinite`` not a bool, ``opt_state`` leaves
        of other dtypes than ``optimizer.init(params)`` gives.

    Example:
      >>> import jax.numpy as jnp, optax, scanfit
      >>> x = jnp.linspace(-1, 1, 64).reshape(8, 8)
      >>> loss = lambda p, b: jnp.mean((p["w"] * b[0] + p["b"] - b[1]) ** 2)
      >>> res = scanfit.scan_train(loss, {"w": 0.0, "b": 0.0}, optax.adam(0.1),
      ...                          (x, 2 * x + 1), epochs=50)
      >>> res.losses.shape
      (400,)
      >>> round(float(res.params["w"]), 2), round(float(res.params["b"]), 2)
      (2.0, 1.0)
    """
    params, optimizer, lr, n, key, loss_spec = _checks.check_train_args(
        loss_fn,
        params,
        optimizer,
        data,
        opt_state=opt_state,
        epochs=epochs,
        key=key,
        accumulate=accumulate,
        unroll=unroll,
        has_aux=has_aux,
        skip_nonfinite=skip_nonfinite,
    )
    _checks.check_stacked_outputs(epochs * (n // accumulate), _checks.output_bytes(*loss_spec))
    return _scan_train_jit(
        loss_fn,
        params,
        optimizer,
        lr,
        data,
        opt_state,
        key,
        epochs=epochs,
        accumulate=accumulate,
        has_aux=has_aux,
        unroll=unroll,
        skip_nonfinite=skip_nonfinite,
    )
