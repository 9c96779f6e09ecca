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

from scanfit import _adapters, _checks, _eval, _xla_cpu
from scanfit._conv import canonical_convs

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
    model_state: PyTree = None  # the model state after the last update; None without one
    # With eval_fn (None without): shape=(evaluations,) per metric, and "step" (int32):
    # the updates done at each evaluation. Evaluations skipped after an early stop hold
    # NaN, and step -1.
    metrics: dict[str, jax.Array] | None = None
    best_params: PyTree = None  # with best: params at the best evaluation (the initial
    #   params if no evaluation improved on +-inf, e.g. all NaN); else None
    best_model_state: PyTree = None  # with best: the model state at the best evaluation
    best_step: jax.Array | None = None  # with best: shape=(), int32, updates done at the
    #   best evaluation; -1 if none improved
    stopped_at: jax.Array | None = None  # with eval_fn: shape=(), int32, the update count
    #   at which early stopping (patience) ended the run; -1 if it ran to the end


class TrainState(NamedTuple):
    """The scan carry."""

    params: PyTree
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


def _all_finite(tree: PyTree) -> jax.Array:
    """Whether every inexact leaf is finite (integer counters and PRNG keys always are)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def _loss_and_grad(loss_fn: Callable, *, has_aux: bool, extended: bool) -> Callable:
    """``(params, model_state, batch, rng) -> (loss, model_state, aux, grads)`` for either form.

    Plain: ``loss_fn(params, batch)``, the model state passed through untouched.
    Extended: ``loss_fn(params, model_state, batch, rng) -> (loss, new_model_state)``,
    or ``-> (loss, (new_model_state, aux))`` with ``has_aux``.
    """
    if not extended:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

        def plain(params, model_state, batch, rng):
            out, grads = grad_fn(params, batch)
            loss, aux = out if has_aux else (out, None)
            return loss, model_state, aux, grads

        return plain

    def split_aux(params, model_state, batch, rng):
        loss, rest = loss_fn(params, model_state, batch, rng)
        return loss, (rest if has_aux else (rest, None))

    grad_fn = jax.value_and_grad(split_aux, has_aux=True)  # w.r.t. params only

    def extended_form(params, model_state, batch, rng):
        (loss, (model_state, aux)), grads = grad_fn(params, model_state, batch, rng)
        return loss, model_state, aux, grads

    return extended_form


def make_update(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    accumulate: int,
    has_aux: bool,
    skip_nonfinite: bool,
    extended: bool = False,
    rng: jax.Array | None = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, tuple[jax.Array, PyTree]]]:
    """The scan body: one optimizer update from ``accumulate`` microbatches.

    The returned ``update(state, microbatches)`` takes microbatches whose leaves
    have a leading axis of length ``accumulate`` and returns the new state and
    ``(loss, aux)`` of this update. In the extended form the model state threads
    through the microbatches in order, and microbatch ``m`` of the run (update
    ``u`` uses ``u * accumulate .. u * accumulate + accumulate - 1``) gets
    ``jax.random.fold_in(rng, m)``, whatever the chunking.
    """
    loss_and_grad = _loss_and_grad(loss_fn, has_aux=has_aux, extended=extended)

    def key_of(m):
        return None if rng is None else jax.random.fold_in(rng, m)

    def mean_over_microbatches(params, model_state, microbatches, first):
        if accumulate == 1:  # microbatches is the batch itself: no extra axis, no copy
            return loss_and_grad(params, model_state, microbatches, key_of(first))

        # An inner scan sums the k gradients, so memory holds one gradient, not k.
        def add(carry, xs):
            total, model_state = carry
            batch, m = xs
            loss, model_state, aux, grads = loss_and_grad(params, model_state, batch, key_of(m))
            return (jax.tree.map(jnp.add, total, (loss, grads)), model_state), aux

        head = jax.tree.map(lambda a: a[0], microbatches)
        loss0, model_state, aux0, grads0 = loss_and_grad(params, model_state, head, key_of(first))
        rest = jax.tree.map(lambda a: a[1:], microbatches)
        ms = first + jnp.arange(1, accumulate, dtype=jnp.int32)
        ((loss, grads), model_state), auxs = lax.scan(
            add, ((loss0, grads0), model_state), (rest, ms)
        )
        inv = 1.0 / accumulate
        aux = jax.tree.map(
            lambda a0, a: (a0 + jnp.sum(a, axis=0)) * jnp.asarray(inv, jnp.result_type(a, float)),
            aux0,
            auxs,
        )
        scale = lambda g: g * jnp.asarray(inv, g.dtype)  # noqa: E731
        return scale(loss), model_state, aux, jax.tree.map(scale, grads)

    def update(state: TrainState, microbatches: PyTree):
        loss, model_state, aux, grads = mean_over_microbatches(
            state.params, state.model_state, microbatches, state.step * accumulate
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            # Skipping must not let a non-finite gradient into params or optimizer state.
            ok = (
                jnp.isfinite(loss)
                & _all_finite(grads)
                & _all_finite(params)
                & _all_finite(model_state)
            )
            params = optax.tree_utils.tree_where(ok, params, state.params)
            opt_state = optax.tree_utils.tree_where(ok, opt_state, state.opt_state)
            model_state = optax.tree_utils.tree_where(ok, model_state, state.model_state)
        else:
            # The loss alone is nearly free to check, where a pass over grads and params each
            # update cost ~17% for a small MLP. Params that go non-finite make the next
            # loss non-finite; fit pins the exact update down on the host when it matters.
            ok = jnp.isfinite(loss)
        first_bad = jnp.where((state.first_nonfinite < 0) & ~ok, state.step, state.first_nonfinite)
        skipped = state.skipped + (~ok).astype(jnp.int32) if skip_nonfinite else state.skipped
        new_state = state._replace(
            params=params,
            opt_state=opt_state,
            model_state=model_state,
            step=state.step + 1,
            skipped=skipped,
            first_nonfinite=first_bad,
        )
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
    loss_fn,
    optimizer,
    state: TrainState,
    data: PyTree,
    idx,
    rng=None,
    eval_data=None,
    *,
    accumulate: int,
    has_aux: bool,
    unroll: int,
    skip_nonfinite: bool,
    extended: bool = False,
    evaluation: _eval.EvalSpec | None = None,
    layout: _eval.Layout | None = None,
    log_every: int | None = None,
):
    """A run of updates, as ``fit`` compiles it per chunk.

    With ``idx`` (int32, shape (C, accumulate), or (C,) without accumulation)
    update i gathers microbatches ``idx[i]`` from ``data`` (leaves (N, ...));
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
    body, xs = _chunk_scan(
        make_update(loss_fn, optimizer, accumulate=accumulate, has_aux=has_aux,
                    skip_nonfinite=skip_nonfinite, extended=extended, rng=rng),
        data, idx,
    )  # fmt: skip
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
    finite = _all_finite((state.params, state.opt_state, state.model_state))
    return state, losses, aux, finite, metrics


def finite_per_update(
    loss_fn,
    optimizer,
    state: TrainState,
    data: PyTree,
    idx,
    rng=None,
    *,
    accumulate: int,
    has_aux: bool,
    unroll: int,
    skip_nonfinite: bool,
    extended: bool = False,
) -> jax.Array:
    """Re-runs a chunk as ``run_chunk`` does, recording which updates stayed finite.

    Returns a bool array of shape (C,): update i's loss, new params and new
    optimizer state all finite. For the host's divergence search only: the
    per-update walk over the state is what ``run_chunk`` avoids.
    """
    update = make_update(
        loss_fn, optimizer, accumulate=accumulate, has_aux=has_aux,
        skip_nonfinite=skip_nonfinite, extended=extended, rng=rng,
    )  # fmt: skip

    def flagged(state, microbatches):
        state, (loss, _) = update(state, microbatches)
        finite = _all_finite((state.params, state.opt_state, state.model_state))
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


def result_of(state: TrainState, losses, aux, metrics, evaluation) -> TrainResult:
    """The TrainResult of a final carry: the evaluation fields only with evaluation."""
    base = TrainResult(
        state.params,
        state.opt_state,
        losses,
        aux,
        state.skipped,
        state.first_nonfinite,
        state.model_state,
    )
    if evaluation is None:
        return base
    ev, best = state.evaluation, evaluation.best is not None
    return base._replace(
        metrics=metrics,
        best_params=ev.best_params,
        best_model_state=ev.best_model_state,
        best_step=ev.best_step if best else None,
        stopped_at=ev.stopped_at,
    )


def train(
    loss_fn,
    params,
    optimizer,
    data,
    opt_state,
    key,
    model_state=None,
    rng=None,
    eval_data=None,
    *,
    epochs,
    accumulate,
    has_aux,
    unroll,
    skip_nonfinite,
    extended=False,
    evaluation=None,
    log_every=None,
) -> TrainResult:
    """The whole run, unjitted: scan_train compiles it, sweep vmaps it."""
    if opt_state is None:
        opt_state = optimizer.init(params)
    update = make_update(
        loss_fn,
        optimizer,
        accumulate=accumulate,
        has_aux=has_aux,
        skip_nonfinite=skip_nonfinite,
        extended=extended,
        rng=rng,
    )
    state = init_state(params, opt_state, model_state)
    if evaluation is None and log_every is None:  # the plain nested scan over epochs
        state, (losses, aux) = run_epochs(
            update, state, data, key=key, epochs=epochs, accumulate=accumulate, unroll=unroll
        )
        return result_of(state, losses, aux if has_aux else None, None, None)
    if evaluation is not None:
        state = state._replace(evaluation=_eval.init(evaluation, params, model_state, eval_data))
    # Updates are addressed by their number in the run, so pieces may cross epochs.
    n = jax.tree.leaves(data)[0].shape[0]
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
    state, losses, aux, metrics = run_laid_out(
        body, state, lay, firsts, expand, jnp.int32(0), evaluation=evaluation,
        eval_data=eval_data, log_every=log_every, unroll=unroll,
    )  # fmt: skip
    return result_of(state, losses, aux if has_aux else None, metrics, evaluation)


_STATIC = (
    "loss_fn",
    "optimizer",
    "epochs",
    "accumulate",
    "has_aux",
    "unroll",
    "skip_nonfinite",
    "extended",
    "evaluation",
    "log_every",
)


@functools.partial(_xla_cpu.jit, static_argnames=_STATIC)
@canonical_convs  # the jit's body, so that convs inside the scan run Eigen's kernel on CPU
def _scan_train_jit(
    loss_fn, params, optimizer, lr, data, opt_state, key, model_state, rng, eval_data=None, **kw
):
    if optimizer is None:  # a float learning rate: plain SGD, lr traced so a new value
        optimizer = optax.sgd(lr)  # does not compile again
    return train(
        loss_fn, params, optimizer, data, opt_state, key, model_state, rng, eval_data, **kw
    )


def eval_settings(
    eval_fn, eval_data, *, eval_every, best, patience, log_every, params, model_state, model,
    updates,
) -> _eval.EvalSpec | None:  # fmt: skip
    """Adapts and checks the evaluation and logging arguments before tracing.

    ``params`` and ``model_state`` are what the user passed, ``model`` their
    ``_adapters.Adapted`` form. Returns the static spec, or None without eval_fn.
    """
    fn = _adapters.adapt_eval(eval_fn, params, model_state)
    module = _adapters.is_module(params)
    if module and model.extended and not isinstance(fn, _adapters._NNXEval):
        form = "eval_fn(model, state, batch)"
    elif module:
        form = "eval_fn(model, batch)"
    else:
        form = "eval_fn(params, model_state, batch)" if model.extended else "eval_fn(params, batch)"
    arrays = _checks.check_params(model.params)

    def metrics_of(batch):
        if model.extended:
            return jax.eval_shape(lambda b: fn(arrays, model.model_state, b), batch)
        return jax.eval_shape(lambda b: fn(arrays, b), batch)

    _checks.check_eval_args(
        eval_fn, eval_data, eval_every=eval_every, best=best, patience=patience, form=form,
        metrics_of=metrics_of,
    )  # fmt: skip
    _checks.check_log_every(log_every, updates)
    if eval_fn is None:
        return None
    best = None if best is None else (best[0], best[1])
    return _eval.EvalSpec(fn, model.extended, eval_every or updates, best, patience)


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
    model_state: PyTree = None,
    rng: jax.Array | None = None,
    eval_fn: Callable | None = None,
    eval_data: PyTree = None,
    eval_every: int | None = None,
    best: tuple[str, str] | None = None,
    patience: int | None = None,
    log_every: int | None = None,
) -> TrainResult:
    """Trains ``params`` on every microbatch of ``data`` in one XLA program.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss``, a scalar; with ``has_aux``,
        ``-> (loss, aux)``. ``batch`` has the structure of ``data`` with the
        leading axis removed: ``data=(xb, yb)`` gives ``batch=(x, y)``. With
        ``model_state`` or ``rng`` given, the extended form
        ``loss_fn(params, model_state, batch, rng) -> (loss, new_model_state)``
        (with ``has_aux``: ``-> (loss, (new_model_state, aux))``).
      params: the initial parameters, any pytree of floating arrays (bfloat16,
        float16, float32, float64). Or a Flax ``nnx.Module``, with
        ``loss_fn(model, batch)``: its ``nnx.Param``s are trained, every other
        variable (BatchNorm statistics, RNG stream counters) is carried as
        model state, the module holds the trained state afterwards and
        ``res.params`` is its ``nnx.State`` of Params. Or an Equinox module:
        its floating arrays are trained, every other leaf is static, and
        ``res.params`` is the trained module.
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
      model_state: any pytree (BatchNorm statistics, EMA weights, counters;
        an ``eqx.nn.State``), carried through every update and every
        accumulated microbatch in order, never differentiated. ``None`` is
        passed to the extended form when only ``rng`` is given.
      rng: a PRNG key. Microbatch ``m`` of the run (counted from 0 over all
        epochs; update ``u`` uses microbatches ``u * accumulate`` to
        ``u * accumulate + accumulate - 1``) gets ``jax.random.fold_in(rng, m)``.
        ``None`` is passed when only ``model_state`` is given.
      eval_fn: ``eval_fn(params, batch) -> {name: scalar}`` (extended form:
        ``eval_fn(params, model_state, batch)``), run inside the program on each
        microbatch of ``eval_data``; ``res.metrics[name]`` holds the means over
        them. An NNX module gets ``eval_fn(model, batch)`` with the model rebuilt
        from the current state in ``model.eval()`` mode (running BatchNorm
        statistics, no dropout; its state changes dropped). An Equinox module
        gets ``eval_fn(model, batch)`` (or ``(model, state, batch)``); switch it
        to inference yourself, e.g. ``eqx.nn.inference_mode(model)``.
      eval_data: pytree of arrays with a leading axis M of eval microbatches,
        scanned one at a time (memory holds one).
      eval_every: evaluate when the number of updates done is a multiple of it,
        and after the last update; ``None``: after the last update only.
      best: ``(metric, "min" | "max")``: keep the params (and model state) of the
        best evaluation so far in the carry (a select, no host round trip).
      patience: with ``best``, stop after this many evaluations in a row without
        a strict improvement; the remaining updates are skipped inside the
        program (one ``lax.cond`` per evaluation interval), not computed.
      log_every: ``losses`` and ``aux`` hold means over groups of this many
        updates, summed in the carry instead of stacked per update; it must
        divide the number of updates. After an early stop, a group's mean is over
        the updates done in it, NaN for a group with none.

    Calls with the same ``loss_fn`` and ``optimizer`` objects and the same
    shapes reuse the compiled program. Build the optimizer once: writing
    ``optax.adam(1e-3)`` again makes a new object, hence a new compilation
    (a float learning rate is an argument, not part of the program).

    Returns:
      A ``TrainResult``: ``losses`` has shape ``(epochs * N // accumulate,)``,
      or ``(updates // log_every,)``. With ``eval_fn``: ``metrics`` (each of
      shape (evaluations,), ``"step"`` the updates done at each; evaluations
      skipped after an early stop hold NaN and step -1, as do the skipped
      updates' losses), ``stopped_at`` (-1 if the run went to the end); with
      ``best``: ``best_params``, ``best_model_state``, ``best_step`` (-1 and the
      initial state if no evaluation improved on +-inf, e.g. all NaN).

    Raises:
      ValueError: data leaves with different leading axes, ``accumulate`` not
        dividing N, ``epochs < 1``, a loss that is not a scalar, an
        ``opt_state`` that does not match the optimizer and params, a new
        model state that differs from ``model_state`` in structure, shape or
        dtype, ``model_state``/``rng`` given with an NNX module; an
        evaluation argument without ``eval_fn`` (or ``eval_fn`` without
        ``eval_data``), ``eval_fn`` not returning a dict of scalars, ``best``
        not naming one of its metrics with ``"min"`` or ``"max"``, ``patience``
        without ``best``, ``log_every`` not dividing the updates.
      TypeError: ``optimizer`` neither an optax transformation nor a number,
        ``key`` or ``rng`` not a PRNG key, params not floating, ``loss_fn``
        not callable, a Flax ``TrainState`` as params.

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

      Evaluated every 40 updates inside the program, stopping 2 evaluations
      after the best (the validation targets here favour w = 1):

      >>> res = scanfit.scan_train(loss, {"w": 0.0, "b": 0.0}, optax.adam(0.1),
      ...                          (x, 2 * x + 1), epochs=50, log_every=8,
      ...                          eval_fn=lambda p, b: {"val": loss(p, b)},
      ...                          eval_data=(x[:2], x[:2] + 1), eval_every=40,
      ...                          best=("val", "min"), patience=2)
      >>> int(res.best_step), int(res.stopped_at), res.losses.shape
      (40, 120, (50,))
      >>> res.metrics["step"][:4].tolist()
      [40, 80, 120, -1]
    """
    params_in = params
    model = _adapters.adapt(
        loss_fn, params, model_state=_checks.check_model_state(model_state), rng=rng,
        has_aux=has_aux,
    )  # fmt: skip
    params, optimizer, lr, n, key, loss_spec = _checks.check_train_args(
        model.loss_fn,
        model.params,
        optimizer,
        data,
        opt_state=opt_state,
        epochs=epochs,
        key=key,
        accumulate=accumulate,
        unroll=unroll,
        has_aux=has_aux,
        skip_nonfinite=skip_nonfinite,
        model_state=model.model_state,
        rng=rng,
        extended=model.extended,
    )
    evaluation = eval_settings(
        eval_fn, eval_data, eval_every=eval_every, best=best, patience=patience,
        log_every=log_every, params=params_in, model_state=model_state, model=model,
        updates=epochs * n // accumulate,
    )  # fmt: skip
    _checks.check_stacked_outputs(
        epochs * (n // accumulate) // (log_every or 1), _checks.output_bytes(*loss_spec)
    )
    result = _scan_train_jit(
        model.loss_fn,
        params,
        optimizer,
        lr,
        data,
        opt_state,
        key,
        model.model_state,
        rng,
        eval_data,
        epochs=epochs,
        accumulate=accumulate,
        has_aux=has_aux,
        unroll=unroll,
        skip_nonfinite=skip_nonfinite,
        extended=model.extended,
        evaluation=evaluation,
        log_every=log_every,
    )
    return model.finish(result)
