"""``scanfit.load``: the newest verified checkpoint of a directory, without the loss or data.

A checkpoint stores each pytree leaf under its tree path (``params['w']``,
``opt_state[0].mu['w']``; ``_checkpoint``), not the tree's Python types. Without
``like`` the trees are rebuilt from those paths as dicts (keys and attribute
names) and lists (indices); ``like`` gives the types back: an NNX module is
updated in place, an Equinox module rebuilt, a pytree filled (and placed on its
leaves' shardings). Every file is verified before anything is read from it.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from scanfit import _checkpoint, _checkpoint_dir
from scanfit._checkpointer import _keys_as_data, _keys_from_data

PyTree = Any

_PREFIX = re.compile(r"^([A-Za-z_]\w*)(.*)$", re.S)
_KEY = re.compile(r"""\.(\w+)|\[(-?\d+|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\]""")


class Checkpoint(NamedTuple):
    """What ``load`` returns: the state a run had saved at ``step`` (host arrays on the
    default device, or on ``like``'s shardings). Fields as in ``TrainResult``."""

    params: PyTree  # the params (with like=: its structure; an NNX module is updated too)
    opt_state: PyTree  # the optimizer state, as nested dicts and lists
    model_state: PyTree  # the model state, or None
    step: int  # updates done when it was saved
    losses: jax.Array  # shape=(updates or log groups,), the losses up to step
    aux: PyTree  # has_aux: aux of each update up to step; else None
    metrics: dict | None  # with eval_fn: {name: (evaluations,), "step": ...} up to step
    best_params: PyTree  # with best: params at the best evaluation so far; else None
    best_model_state: PyTree  # with best: the model state there; else None
    best_step: int | None  # with best: updates done at the best evaluation; -1 if none
    trees: dict[str, PyTree]  # every tree the file holds, by name (e.g. a fit_steps "state")
    path: Path  # the file it came from


def load(checkpoint_dir: str | Path, like: Any = None) -> Checkpoint:
    """The newest verified checkpoint in ``checkpoint_dir``, for inference or analysis.

    No loss, optimizer or data is needed. A newest file that fails verification
    is skipped with a ``CheckpointWarning`` and the one before it is loaded;
    nothing unverified is ever loaded.

    Args:
      checkpoint_dir: a directory ``fit`` saved checkpoints in.
      like: the structure to restore the params into (for a checkpoint without
        params, its ``state``): a Flax NNX module (updated in place with the
        saved params and model state, as ``fit`` leaves it), an Equinox module
        (rebuilt with the saved arrays), or a pytree of arrays (whose leaves'
        shardings, where they have them, place the loaded arrays). ``None``:
        dicts and lists rebuilt from the saved tree paths.

    Returns:
      A ``Checkpoint``.

    Raises:
      FileNotFoundError: no checkpoint in ``checkpoint_dir`` verifies.
      ValueError: ``checkpoint_dir`` is not a directory, or ``like`` does not match
        the saved arrays (the message names the first that differs).

    Example:
      >>> ckpt = scanfit.load("runs/ckpt")  # doctest: +SKIP
      >>> predictions = model_fn(ckpt.params, x)  # doctest: +SKIP
    """
    path = _checkpoint_dir.check_path(checkpoint_dir)
    if not path.is_dir():
        raise ValueError(f"checkpoint_dir {str(path)!r} is not a directory.")
    with _checkpoint_dir.CheckpointDir(path, keep=1, writer=False) as directory:
        found = next(directory.verified(), None)
    if found is None:
        names = len(_checkpoint.list_checkpoints(path))
        raise FileNotFoundError(
            f"no checkpoint in {str(path)!r} verifies ({names} named like checkpoints); "
            "nothing was loaded."
        )
    trees = jax.device_put(_rebuild(found.arrays))
    evaluation = trees.get("evaluation") or {}
    params_name = "params" if "params" in trees else "state"
    record = Checkpoint(
        params=trees.get("params"),
        opt_state=trees.get("opt_state"),
        model_state=trees.get("model_state"),
        step=found.step,
        losses=trees.get("losses"),
        aux=trees.get("aux"),
        metrics=trees.get("metrics"),
        best_params=evaluation.get("best_params"),
        best_model_state=evaluation.get("best_model_state"),
        best_step=None if "best_step" not in evaluation else int(evaluation["best_step"]),
        trees=trees,
        path=found.path,
    )
    if like is not None:
        record = _restore_into(like, record, found.arrays, params_name)
    return record


def _split_key(key: str) -> tuple[str, tuple] | None:
    """``"opt_state[0].mu['w']"`` -> ``("opt_state", (0, "mu", "w"))``; None if unparsable."""
    match = _PREFIX.match(key)
    if match is None:
        return None
    name, rest, keys, pos = match.group(1), match.group(2), [], 0
    while pos < len(rest):
        step = _KEY.match(rest, pos)
        if step is None:
            return None
        keys.append(step.group(1) if step.group(1) is not None else ast.literal_eval(step.group(2)))
        pos = step.end()
    return name, tuple(keys)


def _nest(items: list[tuple[tuple, Any]]) -> Any:
    """Leaves by key path as nested dicts; a dict keyed 0..n-1 becomes a list."""
    if len(items) == 1 and items[0][0] == ():
        return items[0][1]
    groups: dict[Any, list] = {}
    for keys, value in items:
        groups.setdefault(keys[0], []).append((keys[1:], value))
    node = {k: _nest(group) for k, group in groups.items()}
    if all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
        return [node[i] for i in range(len(node))]
    return node


def _rebuild(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every saved tree, by name, rebuilt from its leaves' paths (in the saved order)."""
    by_name: dict[str, list] = {}
    for key, value in arrays.items():
        split = _split_key(key)
        name, keys = split if split is not None else ("unparsed", (key,))
        by_name.setdefault(name, []).append((keys, value))
    return {name: _nest(items) for name, items in by_name.items()}


def _fill(like: PyTree, prefix: str, arrays: dict[str, np.ndarray]) -> PyTree:
    """The arrays saved under ``prefix`` in ``like``'s structure, on its leaves' shardings."""
    try:
        saved = _checkpoint.unflatten(prefix, _keys_as_data(like), arrays)
    except _checkpoint.Unusable as err:
        raise ValueError(f"like does not match the checkpoint: {err}") from None

    def place(want, got):
        sharding = getattr(want, "sharding", None)
        return jax.device_put(got, sharding) if isinstance(want, jax.Array) else jax.device_put(got)

    return _keys_from_data(like, jax.tree.map(place, like, saved))


def _restore_into(like: Any, record: Checkpoint, arrays, params_name: str) -> Checkpoint:
    """``record`` with its params (and best params, model state) in ``like``'s types."""
    best = "evaluation.best_params"
    has_best = any(k.startswith(best) for k in arrays)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(like, nnx.Module):
        _, params_like, rest_like = nnx.split(like, nnx.Param, ...)
        params = _fill(params_like, "params", arrays)
        rest = _fill(rest_like, "model_state", arrays)
        nnx.update(like, params, rest)  # the module holds the trained state, as after fit
        return record._replace(
            params=params,
            model_state=rest,
            best_params=_fill(params_like, best, arrays) if has_best else None,
        )
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(like, eqx.Module):
        params_like, static = eqx.partition(like, eqx.is_inexact_array)
        as_module = lambda prefix: eqx.combine(_fill(params_like, prefix, arrays), static)  # noqa: E731
        return record._replace(
            params=as_module("params"), best_params=as_module(best) if has_best else None
        )
    filled = _fill(like, params_name, arrays)
    if params_name == "state":
        return record._replace(trees={**record.trees, "state": filled})
    best_params = _fill(like, best, arrays) if has_best else None
    return record._replace(params=filled, best_params=best_params)
