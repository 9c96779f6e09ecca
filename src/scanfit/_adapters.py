"""Framework models as scanfit's (params, model_state) and back: Flax NNX and Equinox.

The loop trains a pytree of arrays with a loss in the plain form
``loss_fn(params, batch)`` or the extended form
``loss_fn(params, model_state, batch, rng) -> (loss, new_model_state)``. A
module passed as ``params`` is split here into the arrays the optimizer trains
and what the loop carries, and its loss is wrapped in a frozen dataclass: equal
wrappers hash equal, so a second call with the same model reuses the compiled
program. Neither flax nor equinox is imported unless the user already has.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanfit._checks import check_bool, describe, pair

PyTree = Any


class Adapted(NamedTuple):
    """What the loop trains, and how to hand the result back in the user's terms."""

    loss_fn: Callable  # plain or extended form over array pytrees; hashable
    params: PyTree  # the arrays the optimizer trains
    model_state: PyTree  # carried through every update, never differentiated; or None
    extended: bool  # loss_fn takes (params, model_state, batch, rng)
    finish: Callable[[Any], Any]  # TrainResult -> TrainResult, on the host after the run


def _same(result):
    return result


def _module_of(name: str, value: Any) -> bool:
    """isinstance(value, <name>.Module), importing nothing the user has not."""
    if name == "nnx":
        nnx = sys.modules.get("flax.nnx")
        return nnx is not None and isinstance(value, nnx.Module)
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(value, eqx.Module)


def is_module(value: Any) -> bool:
    """A Flax NNX or an Equinox module."""
    return _module_of("nnx", value) or _module_of("equinox", value)


def adapt(
    loss_fn: Callable,
    params: PyTree,
    *,
    model_state: Any,
    rng: Any,
    has_aux: bool,
    update_module: bool = True,
) -> Adapted:
    """Splits a Flax NNX or Equinox module passed as ``params``; other pytrees pass as they are.

    With ``update_module`` an NNX module is updated in place after the run
    (``sweep`` passes False: its result holds one state per config).

    Raises:
      TypeError: ``params`` is a Flax ``TrainState``, or an Equinox module
        holding non-floating arrays.
      ValueError: ``model_state`` or ``rng`` given with an NNX module, which
        carries its own.
    """
    _reject_train_state(params)
    if _module_of("nnx", params):
        return _adapt_nnx(
            loss_fn, params, model_state=model_state, rng=rng, has_aux=has_aux,
            update_module=update_module,
        )  # fmt: skip
    if _module_of("equinox", params) and not _module_of("equinox", model_state):
        return _adapt_equinox(loss_fn, params, model_state=model_state, rng=rng)
    extended = model_state is not None or rng is not None
    return Adapted(loss_fn, params, model_state, extended, _same)


def adapt_eval(eval_fn: Callable | None, params: PyTree, model_state: Any) -> Callable | None:
    """``eval_fn`` over a module passed as ``params``, called as the loop calls it.

    NNX: ``eval_fn(model, batch)`` becomes the extended form over (Params, the rest),
    with the model rebuilt and switched to ``model.eval()``. Equinox:
    ``eval_fn(model, batch)`` or ``(model, state, batch)`` with the combined module.
    Other pytrees, and None, pass as they are.
    """
    if eval_fn is None or not callable(eval_fn):
        return eval_fn
    if _module_of("nnx", params):
        from flax import nnx

        return _NNXEval(eval_fn, nnx.graphdef(params))
    if _module_of("equinox", params) and not _module_of("equinox", model_state):
        import equinox as eqx

        return _EquinoxLoss(eval_fn, eqx.partition(params, eqx.is_inexact_array)[1])
    return eval_fn


def _reject_train_state(params: Any) -> None:
    names = ("apply_fn", "tx", "opt_state", "params", "step")
    if all(hasattr(params, n) for n in names) and not isinstance(params, dict):
        raise TypeError(
            f"params is a {type(params).__name__} (a Flax TrainState bundles params, optimizer "
            "and its state); pass its parts instead: scan_train(loss_fn, state.params, state.tx, "
            "data, opt_state=state.opt_state), with loss_fn(params, batch) calling "
            "state.apply_fn."
        )


@dataclasses.dataclass(frozen=True)
class _NNXLoss:
    """``loss_fn(model, batch)`` as the extended form over (Params, the rest of the state)."""

    loss_fn: Callable
    graphdef: Any
    has_aux: bool

    def __call__(self, params, rest, batch, rng):
        from flax import nnx

        # copy=True: merging the traced state in place raises TraceContextError when
        # BatchNorm writes its statistics (flax 0.12).
        model = nnx.merge(self.graphdef, params, rest, copy=True)
        out = self.loss_fn(model, batch)
        _, _, rest = nnx.split(model, nnx.Param, ...)  # BatchStat, RNG counts as they now are
        if not self.has_aux:
            return out, rest
        loss, aux = pair(out, "with has_aux=True, loss_fn must return a pair (loss, aux)")
        return loss, (rest, aux)


@dataclasses.dataclass(frozen=True)
class _NNXEval:
    """``eval_fn(model, batch)`` over (Params, rest): the model in eval mode, changes dropped."""

    eval_fn: Callable
    graphdef: Any

    def __call__(self, params, rest, batch):
        from flax import nnx

        model = nnx.merge(self.graphdef, params, rest, copy=True)
        model.eval()  # running BatchNorm statistics, no dropout; on this copy only
        return self.eval_fn(model, batch)


def _adapt_nnx(loss_fn, module, *, model_state, rng, has_aux, update_module) -> Adapted:
    from flax import nnx

    for name, value in (("model_state", model_state), ("rng", rng)):
        if value is not None:
            raise ValueError(
                f"params is an nnx.Module, which carries its own state (BatchStat, RNG streams "
                f"of its nnx.Rngs) as model state: pass {name}=None, got {describe(value)}. "
                "Dropout draws from the module's own Rngs stream, a new mask every update."
            )
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def finish(result):
        # The module passed in holds the trained state, as nnx.Optimizer.update leaves it.
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(result.params))
        if update_module and not traced:
            nnx.update(module, result.params, result.model_state)
        return result

    return Adapted(_NNXLoss(loss_fn, graphdef, has_aux), params, rest, True, finish)


@dataclasses.dataclass(frozen=True)
class _EquinoxLoss:
    """The user's loss (or eval_fn) over an Equinox module, called with its trainable arrays."""

    loss_fn: Callable
    static: Any  # the module's non-array leaves: hashable, part of the compiled program

    def __call__(self, params, *rest):
        import equinox as eqx

        return self.loss_fn(eqx.combine(params, self.static), *rest)


def _adapt_equinox(loss_fn, module, *, model_state, rng) -> Adapted:
    import equinox as eqx

    params, static = eqx.partition(module, eqx.is_inexact_array)
    arrays = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(static)
        if eqx.is_array(leaf)
    ]
    if arrays:
        raise TypeError(
            f"params is an Equinox module whose leaves {', '.join(arrays)} are non-floating "
            "arrays: scanfit trains the floating arrays and compiles every other leaf into "
            "the program. Mark them eqx.field(static=True) (Python values), or move them "
            "into model_state= (an eqx.nn.State) with the extended loss form."
        )

    def finish(result):
        best = result.best_params
        return result._replace(
            params=eqx.combine(result.params, static),
            best_params=None if best is None else eqx.combine(best, static),
        )

    extended = model_state is not None or rng is not None
    return Adapted(_EquinoxLoss(loss_fn, static), params, model_state, extended, finish)


def check_restore_best(restore_best: Any, best: Any) -> None:
    """``restore_best`` is a bool, and True only with ``best`` (there is no best state without)."""
    check_bool("restore_best", restore_best)
    if restore_best and best is None:
        raise ValueError(
            "restore_best=True needs best=(metric, 'min' | 'max'): without best= no best "
            "evaluation is tracked to restore. Pass best=, or restore_best=False."
        )


def at_best(result):
    """A ``TrainResult`` whose params and model state are those of the best evaluation.

    Keras's ``restore_best_weights``: ``params`` and ``model_state`` become
    ``best_params`` and ``best_model_state`` (the initial ones if no evaluation
    improved); ``opt_state`` and everything else stay those of the last update.
    Apply it before ``Adapted.finish``, so that an NNX module is updated to it.
    """
    state = result.model_state if result.best_model_state is None else result.best_model_state
    return result._replace(params=result.best_params, model_state=state)


def reseed_nnx(state: PyTree, seed: jax.Array) -> PyTree:
    """An NNX module's non-Param state with every RNG stream reseeded by ``seed``.

    Each ``nnx.RngKey`` variable's key ``k`` becomes ``jax.random.fold_in(k, seed)``;
    stream counters (``nnx.RngCount``) and all other variables stay as they are.
    On a module, the same is ``nnx.update(model, jax.tree.map(lambda k:
    jax.random.fold_in(k, seed), nnx.state(model, nnx.RngKey)))``. Pure: works
    under ``jit`` and ``vmap``.
    """
    from flax import nnx

    def one(v):
        return (
            v.replace(jax.random.fold_in(v.get_value(), seed)) if isinstance(v, nnx.RngKey) else v
        )

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class InitSplit:
    """``init(key)`` as ``(params, model_state or None)``: a module it returns is split as
    ``adapt`` splits one (NNX: its Params and the rest; Equinox: its floating arrays).
    Hashable, so that ``sweep`` compiles once per init function."""

    init: Callable
    kind: str  # "nnx", "equinox" or "pytree": what ``init`` returns

    def __call__(self, key):
        out = self.init(key)
        if self.kind == "nnx":
            from flax import nnx

            _, params, rest = nnx.split(out, nnx.Param, ...)
            return params, rest
        if self.kind == "equinox":
            import equinox as eqx

            return eqx.partition(out, eqx.is_inexact_array)[0], None
        return out, None


def init_example(init: Callable, key: jax.Array) -> tuple[Any, InitSplit]:
    """What ``init(key)`` returns, as zeros of its shapes (nothing computed), and ``init`` as
    an ``InitSplit``. PRNG keys in it (an NNX module's RNG streams) are zero keys."""
    eqx = sys.modules.get("equinox")
    shapes = eqx.filter_eval_shape(init, key) if eqx is not None else jax.eval_shape(init, key)

    def zeros(s):
        if not isinstance(s, jax.ShapeDtypeStruct):
            return s
        # NumPy has no PRNG key dtype; jnp.zeros makes zero keys of the right impl.
        key_typed = jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key)
        return jnp.zeros(s.shape, s.dtype) if key_typed else np.zeros(s.shape, s.dtype)

    example = jax.tree.map(zeros, shapes)
    kind = "nnx" if _module_of("nnx", example) else "pytree"
    kind = "equinox" if _module_of("equinox", example) else kind
    return example, InitSplit(init, kind)
