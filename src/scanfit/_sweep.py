"""K training configurations in one compiled program: jax.vmap over hyper-parameters."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from scanfit import _adapters, _checks, _xla_cpu
from scanfit._checks import describe
from scanfit._conv import canonical_convs
from scanfit._loop import PyTree, TrainResult, eval_settings, train


def grid(**axes: Any) -> dict[str, np.ndarray]:
    """The Cartesian product of hyper-parameter values, flattened to K configs.

    Example:
      >>> g = grid(learning_rate=[0.1, 0.01], b1=[0.9, 0.95, 0.99])
      >>> g["learning_rate"].tolist()
      [0.1, 0.1, 0.1, 0.01, 0.01, 0.01]
      >>> g["b1"].tolist()
      [0.9, 0.95, 0.99, 0.9, 0.95, 0.99]
    """
    if not axes:
        raise ValueError("grid needs at least one hyper-parameter, e.g. grid(learning_rate=[...]).")
    names = list(axes)
    values = [np.atleast_1d(np.asarray(axes[n])) for n in names]
    for name, v in zip(names, values):
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"grid axis {name} must be a non-empty 1-D list, got shape {v.shape}.")
    combos = list(itertools.product(*(range(len(v)) for v in values)))
    return {n: v[[c[i] for c in combos]] for i, (n, v) in enumerate(zip(names, values))}


def _check_hparams(hparams: Any, seeds: Any) -> int:
    if not isinstance(hparams, Mapping) or not hparams:
        raise TypeError(
            "hparams must be a non-empty dict of name -> values, one per config, e.g. "
            f"{{'learning_rate': [1e-3, 1e-2]}}, got {describe(hparams)}."
        )
    sizes = {}
    for name, values in hparams.items():
        shape = np.shape(values)
        if len(shape) != 1 or shape[0] == 0:
            raise ValueError(
                f"hparams[{name!r}] must be a non-empty 1-D array (one value per config), "
                f"got shape {shape}."
            )
        _checks.check_numeric(f"hparams[{name!r}]", values)
        sizes[name] = shape[0]
    if seeds is not None:
        sizes["seeds"] = np.shape(seeds)[0] if np.ndim(seeds) == 1 else -1
        if sizes["seeds"] == -1 or not np.issubdtype(np.asarray(seeds).dtype, np.integer):
            raise ValueError(f"seeds must be a 1-D array of integers, got {describe(seeds)}.")
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{n}: {k}" for n, k in sizes.items())
        raise ValueError(f"hparams and seeds must all have the same length K; got {listing}.")
    return next(iter(sizes.values()))


_STATIC = (
    "loss_fn",
    "init",
    "make_optimizer",
    "epochs",
    "accumulate",
    "has_aux",
    "unroll",
    "skip_nonfinite",
    "extended",
    "shuffle_per_seed",
    "evaluation",
    "log_every",
    "reseed",
)


@functools.partial(_xla_cpu.jit, static_argnames=_STATIC)
@canonical_convs  # around the vmap: it sees the batched convs vmap makes
def _sweep_jit(
    loss_fn,
    init,
    params,
    make_optimizer,
    data,
    hparams,
    seeds,
    key,
    opt_state,
    model_state,
    rngs,
    eval_data,
    *,
    shuffle_per_seed,
    reseed,
    **settings,
):
    def one(hp, seed, rng):
        if seed is None:
            init_key = shuffle_key = None
        else:
            init_key, shuffle_key = jax.random.split(jax.random.key(seed))
        p, ms = params, model_state
        if init is not None:  # an InitSplit: a module it returns carries its own state
            p, own = init(init_key)
            ms = model_state if own is None else own
        if reseed is not None:  # an NNX module's RNG streams, fold_in(key, seed)
            ms = reseed(ms, seed)
        k = shuffle_key if shuffle_per_seed else key
        optimizer = make_optimizer(**hp)
        return train(loss_fn, p, optimizer, data, opt_state, k, ms, rng, eval_data, **settings)

    return jax.vmap(one)(hparams, seeds, rngs)


@_checks.integer_settings
def sweep(
    loss_fn: Callable,
    params: PyTree | Callable[[jax.Array], PyTree],
    make_optimizer: Callable[..., Any],
    data: PyTree,
    hparams: Mapping[str, Any],
    *,
    seeds: Any = None,
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
    """Trains K configurations in one compiled program, vmapped over hyper-parameters.

    Config ``i`` is exactly ``scan_train(loss_fn, params_i,
    make_optimizer(**{name: hparams[name][i]}), data, ...)``.

    Args:
      loss_fn, data, opt_state, epochs, accumulate, has_aux, unroll,
        skip_nonfinite: as for ``scan_train``.
      params: the initial params shared by every config (a Flax NNX or
        Equinox module included), or a function ``init(key) -> params`` called
        with each config's init key (needs ``seeds``); it may return an NNX
        or Equinox module, then config ``i`` is the run of ``init(init_key_i)``
        as ``scan_train`` trains that module.
      make_optimizer: builds an optax transformation from one config's
        hyper-parameters, e.g. ``lambda learning_rate: optax.adam(learning_rate)``;
        the values it gets are traced scalars.
      hparams: name -> K values; ``grid(...)`` builds a Cartesian product.
      seeds: K integers. Config ``i`` splits ``jax.random.key(seeds[i])`` into
        an init key (for ``init``) and a shuffle key, with which it reshuffles
        the microbatches every epoch as ``scan_train(key=...)`` does, unless
        ``key`` is given (then every config shares that order).
      key: a shared shuffle key, as for ``scan_train``.
      model_state, rng: the extended loss form, as for ``scan_train``; every
        config starts from ``model_state`` and carries its own. Every config
        uses ``rng``, or with ``seeds`` config ``i`` uses
        ``jax.random.fold_in(rng, seeds[i])``. An NNX module passed as
        ``params`` is left as it is (``res.params`` holds K trained states);
        it carries its own randomness, so with ``seeds`` config ``i`` reseeds
        its RNG streams the same way: every ``nnx.RngKey`` variable's key ``k``
        becomes ``jax.random.fold_in(k, seeds[i])`` (stream counters and other
        state unchanged), so configs draw different dropout masks. Config ``i``
        equals ``scan_train`` of the module reseeded as
        ``nnx.update(model, jax.tree.map(lambda k: jax.random.fold_in(k, seeds[i]),
        nnx.state(model, nnx.RngKey)))``. (A module returned by ``init`` is not
        reseeded: ``init`` gets its key from the seed already.)
      eval_fn, eval_data, eval_every, best, patience, log_every: as for
        ``scan_train``. Every config keeps its own best state and stops on its
        own; under ``vmap`` the skipping ``lax.cond`` is a select, so a stopped
        config's remaining intervals are computed and discarded (the results
        equal single runs; the time is that of the longest config).

    Returns:
      A ``TrainResult`` whose leaves have a leading axis K: ``losses`` has
      shape ``(K, updates)``. ``rank`` orders the configs.

    Raises:
      ValueError, TypeError: bad arguments, as for ``scan_train``; the
        1 GiB bound on stacked per-update outputs counts all K configs.

    Example:
      >>> import jax.numpy as jnp, optax, scanfit
      >>> x = jnp.linspace(-1, 1, 64).reshape(8, 8)
      >>> loss = lambda w, b: jnp.mean((w * b[0] - b[1]) ** 2)
      >>> res = scanfit.sweep(loss, 0.0, lambda lr: optax.sgd(lr), (x, 2 * x),
      ...                     {"lr": [0.01, 0.1, 1.0]}, epochs=20)
      >>> res.losses.shape
      (3, 160)
      >>> [r["lr"] for r in scanfit.rank(res, {"lr": [0.01, 0.1, 1.0]})]
      [1.0, 0.1, 0.01]
    """
    configs = _check_hparams(hparams, seeds)
    if not callable(make_optimizer):
        raise TypeError(
            "make_optimizer must be callable as make_optimizer(**hparams) -> optax optimizer, "
            f"got {describe(make_optimizer)}."
        )
    hp = {n: np.asarray(v) for n, v in hparams.items()}
    seeds = None if seeds is None else np.asarray(seeds)
    init, example_params = _init_of(params, seeds)
    params_in, model_state_in = example_params, model_state
    model = _adapters.adapt(
        loss_fn, example_params, model_state=_checks.check_model_state(model_state), rng=rng,
        has_aux=has_aux, update_module=False,
    )  # fmt: skip
    loss_fn, example_params, model_state = model.loss_fn, model.params, model.model_state
    reseed = None
    if seeds is not None and _adapters._module_of("nnx", params):
        reseed = _adapters.reseed_nnx
    rngs = _config_rngs(rng, seeds, configs)
    # Check one config as scan_train would, on abstract values: errors come before tracing.
    first = {n: v[0] for n, v in hp.items()}
    example_opt = make_optimizer(**first)
    _, _, _, n, _, loss_spec = _checks.check_train_args(
        loss_fn,
        example_params,
        example_opt,
        data,
        opt_state=opt_state,
        epochs=epochs,
        key=key,
        accumulate=accumulate,
        unroll=unroll,
        has_aux=has_aux,
        skip_nonfinite=skip_nonfinite,
        model_state=model_state,
        rng=rng,
        extended=model.extended,
    )
    _checks.check_stacked_outputs(
        epochs * (n // accumulate) // (log_every or 1),
        _checks.output_bytes(*loss_spec),
        configs=configs,
    )
    if _checks.check_optimizer(example_opt)[0] is None:
        raise TypeError(
            "make_optimizer must return an optax.GradientTransformation, got a number; wrap it, "
            "e.g. lambda learning_rate: optax.sgd(learning_rate)."
        )
    evaluation = eval_settings(
        eval_fn, eval_data, eval_every=eval_every, best=best, patience=patience,
        log_every=log_every, params=params_in, model_state=model_state_in,
        model=model, updates=epochs * n // accumulate, data=data,
    )  # fmt: skip
    params = None if init is not None else _checks.check_params(example_params)
    result = _sweep_jit(
        loss_fn,
        init,
        params,
        make_optimizer,
        data,
        hp,
        seeds,
        key,
        opt_state,
        model_state,
        rngs,
        eval_data,
        shuffle_per_seed=seeds is not None and key is None,
        epochs=epochs,
        accumulate=accumulate,
        has_aux=has_aux,
        unroll=unroll,
        skip_nonfinite=skip_nonfinite,
        extended=model.extended,
        evaluation=evaluation,
        log_every=log_every,
        reseed=reseed,
    )
    return model.finish(result)


def _init_of(params, seeds) -> tuple[Callable | None, PyTree]:
    """``(init, example params)``: ``params`` may be an ``init(key)`` function (then seeds
    are required; the example is what it returns, a module adapted) or the params."""
    init = params if callable(params) and not _adapters.is_module(params) else None
    if init is None:
        return None, params
    if seeds is None:
        raise ValueError(
            "params is an init function: pass seeds=[...] (one per config) to give "
            "each config its init key."
        )
    example, init = _adapters.init_example(init, jax.random.key(seeds[0]))
    return init, example


def _config_rngs(rng, seeds, configs: int):
    """Each config's rng: ``rng`` itself, or ``fold_in(rng, seeds[i])``; None without."""
    _checks.check_key(rng, "rng")
    if rng is None:
        return None
    if seeds is None:
        return jax.vmap(lambda _: rng)(np.arange(configs))
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, np.asarray(seeds))


def rank(
    result: TrainResult, hparams: Mapping[str, Any], *, scores: Any = None, window: int = 1
) -> list[dict[str, Any]]:
    """Configs of a sweep, best first.

    Args:
      result: what ``sweep`` returned.
      hparams: the hyper-parameters passed to ``sweep``.
      scores: K numbers to rank by, lower is better (e.g. a validation loss
        per config); default: the mean of the last ``window`` training losses.
      window: how many final losses to average.

    Returns:
      One dict per config: ``index``, each hyper-parameter, ``score``;
      non-finite scores (diverged configs) last.
    """
    losses = np.asarray(result.losses)
    if scores is None:
        if not (_checks._is_int(window) and window >= 1):
            raise ValueError(f"window must be an integer >= 1, got {window!r}.")
        scores = (
            losses[:, -window:].mean(axis=1) if losses.shape[1] else np.full(len(losses), np.nan)
        )
    scores = np.asarray(scores, np.float64)
    if scores.shape != (losses.shape[0],):
        raise ValueError(
            f"scores must have one value per config, shape ({losses.shape[0]},), "
            f"got {scores.shape}."
        )
    order = sorted(range(len(scores)), key=lambda i: (not np.isfinite(scores[i]), scores[i]))
    return [
        {
            "index": i,
            **{n: np.asarray(v)[i].item() for n, v in hparams.items()},
            "score": float(scores[i]),
        }
        for i in order
    ]
