"""Loss + optax: the step factory behind ``scan_train``, ``fit`` and ``sweep``.

An update is one optimizer step on the mean gradient of ``accumulate``
consecutive microbatches, themselves an innermost scan (``make_update``,
wrapped as the static ``OptaxStep``). The scan around it, epochs, evaluation
and logging are the core's (``_scan``), shared with the user's own steps
(``scan_steps``). Pure, jittable, vmappable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from scanfit import _adapters, _checks, _eval, _nonfinite, _scan, _xla_cpu
from scanfit._conv import canonical_convs
from scanfit._scan import PyTree, TrainState, all_finite, init_state


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
                & all_finite(grads)
                & all_finite(params)
                & all_finite(model_state)
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


@dataclasses.dataclass(frozen=True)
class OptaxStep:
    """The step factory of ``scan_train``, ``fit`` and ``sweep``: a loss and an optax
    optimizer (see ``make_update``). Static: equal settings, one compiled program."""

    loss_fn: Callable
    optimizer: optax.GradientTransformation
    accumulate: int = 1
    has_aux: bool = False
    skip_nonfinite: bool = False
    extended: bool = False

    def __call__(self, rng: jax.Array | None = None):
        return make_update(
            self.loss_fn, self.optimizer, accumulate=self.accumulate, has_aux=self.has_aux,
            skip_nonfinite=self.skip_nonfinite, extended=self.extended, rng=rng,
        )  # fmt: skip


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
    step = OptaxStep(loss_fn, optimizer, accumulate, has_aux, skip_nonfinite, extended)
    state = init_state(params, opt_state, model_state)
    if evaluation is not None:
        state = state._replace(evaluation=_eval.init(evaluation, params, model_state, eval_data))
    state, losses, aux, metrics = _scan.run(
        step, state, data, key, rng, eval_data, epochs=epochs, unroll=unroll,
        evaluation=evaluation, log_every=log_every,
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
    updates, data=None,
) -> _eval.EvalSpec | None:  # fmt: skip
    """Adapts and checks the evaluation and logging arguments before tracing.

    ``params`` and ``model_state`` are what the user passed, ``model`` their
    ``_adapters.Adapted`` form; ``data`` the training data (N, ...), if known, to tell
    one eval batch without its M axis. Returns the static spec, or None without eval_fn.
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
        metrics_of=metrics_of, train_batch=None if data is None else _checks._first(data),
    )  # fmt: skip
    _checks.check_log_every(log_every, updates)
    if eval_fn is None:
        return None
    best = None if best is None else (best[0], best[1])
    return _eval.EvalSpec(fn, model.extended, eval_every or updates, best, patience)


@_checks.integer_settings
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
    restore_best: bool = False,
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
      restore_best: with ``best``, end at the best evaluation (Keras's
        ``restore_best_weights``): ``res.params`` and ``res.model_state`` are
        ``res.best_params`` and ``res.best_model_state`` (the initial ones if no
        evaluation improved), an NNX module passed as ``params`` is left at
        that state, an Equinox module's ``res.params`` is the best module.
        ``res.opt_state`` stays that of the last update.

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
        or ``restore_best=True`` without ``best``, ``log_every`` not dividing
        the updates.
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
    _adapters.check_restore_best(restore_best, best)
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
        updates=epochs * n // accumulate, data=data,
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
    _nonfinite.warn_nonfinite_metrics(result, stacklevel=4)
    return model.finish(_adapters.at_best(result) if restore_best else result)
