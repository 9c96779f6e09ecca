"""Checks of what a user passes, raised in Python before anything is traced.

Each message names the argument, what it needs and what it got.
"""

from __future__ import annotations

import functools
import numbers
import operator
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def describe(value: Any) -> str:
    """A short description of ``value`` for an error message: shape and dtype, or its type."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"an array of shape {tuple(shape)} and dtype {dtype}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    text = repr(value)
    if len(text) > 80:  # a model or a train state would fill the screen
        text = text[:60] + " ... " + text[-15:]
    return f"{text} of type {type(value).__name__}"


def pair(out: Any, need: str) -> tuple[Any, Any]:
    """``out`` as a 2-tuple, or a ValueError saying ``need`` and what was returned."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        sequence = isinstance(out, (tuple, list))
        got = f"a {type(out).__name__} of length {len(out)}" if sequence else describe(out)
        raise ValueError(f"{need}, got {got}.")
    return out[0], out[1]


def check_numeric(name: str, value: Any) -> None:
    """Raise TypeError unless ``value`` is a number or a numeric array (bool excluded)."""
    try:
        dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
    except (TypeError, ValueError):  # ragged lists, objects NumPy cannot convert
        dtype = None
    if dtype is None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(
            f"{name} must be a real number or an array of real numbers, got {describe(value)}."
        )


def check_bool(name: str, value: Any) -> None:
    """Raise TypeError unless ``value`` is a bool: ``"no"`` is truthy, so it must not pass."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {describe(value)}.")


def check_learning_rate(name: str, value: Any) -> None:
    """Raise ValueError unless a concrete learning rate is positive and finite.

    A traced value (under jit, vmap or grad) cannot be read; it passes unchecked.
    """
    if isinstance(value, jax.core.Tracer):
        return
    if not 0 < float(np.asarray(value)) < np.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value}.")


def check_scalar(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is 0-d (a Python number, NumPy or JAX scalar)."""
    check_numeric(name, value)
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar (shape ()), got {describe(value)}.")


def _path(path) -> str:
    return jax.tree_util.keystr(path) or "(root)"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# The integer settings of scan_train, fit and sweep (and their step forms).
INTEGER_SETTINGS = (
    "epochs", "accumulate", "unroll", "eval_every", "patience", "log_every", "chunk_steps",
    "checkpoint_every", "keep", "steps_per_epoch", "devices", "steps",
)  # fmt: skip


def as_int(value: Any) -> Any:
    """A NumPy (or any ``__index__``) integer as a Python int; anything else as it is, for
    the checks to name. (A NumPy integer given as a static setting would reach JAX as an
    array: ``Slice entries must be static integers``.)"""
    if value is None or isinstance(value, (bool, int, np.bool_)):
        return value
    try:
        return operator.index(value)
    except TypeError:  # a float, a list, a traced value: not an integer
        return value


def integer_settings(fn: Any) -> Any:
    """Decorator: the keyword settings named in ``INTEGER_SETTINGS`` go through ``as_int``
    before ``fn`` checks or traces anything, so NumPy integers work wherever ints do."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for name in INTEGER_SETTINGS:
            if name in kwargs:
                kwargs[name] = as_int(kwargs[name])
        return fn(*args, **kwargs)

    return wrapper


def _inexact(leaf: Any) -> bool:
    """A floating (or complex) array of any width: bfloat16, float16, float32, float64."""
    dtype = getattr(leaf, "dtype", None)
    try:
        return dtype is not None and bool(jnp.issubdtype(dtype, jnp.inexact))
    except TypeError:  # a dtype JAX does not know
        return False


def check_params(params: Any) -> Any:
    """Params must be a non-empty pytree of floating arrays; Python numbers become arrays."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError(
            f"params must be a pytree with at least one array, got {describe(params)}."
        )
    for path, leaf in leaves:
        if isinstance(leaf, float) or _inexact(leaf):
            continue
        if getattr(leaf, "dtype", None) is not None:
            raise TypeError(
                f"params{_path(path)} must be a floating array (the optimizer trains every "
                f"leaf of params), got {describe(leaf)}. State that is not trained (counters, "
                "RNG keys, batch statistics) goes in model_state= with the extended loss "
                "form loss_fn(params, model_state, batch, rng); a Flax NNX or Equinox module "
                "can be passed as params as it is."
            )
        raise TypeError(
            f"params{_path(path)} must be a floating array, got {describe(leaf)}. Cast it, "
            "e.g. jnp.asarray(x, jnp.float32), or close over it in loss_fn."
        )
    return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, float) else x, params)


def check_optimizer(optimizer: Any) -> tuple[Any, Any]:
    """Returns (transformation, None), or (None, lr) for a learning rate meaning plain SGD."""
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return optimizer, None
    is_number = isinstance(optimizer, numbers.Real) and not isinstance(optimizer, bool)
    is_scalar_array = (
        hasattr(optimizer, "dtype")
        and np.ndim(optimizer) == 0
        and (np.issubdtype(np.dtype(optimizer.dtype), np.floating))
    )
    if not (is_number or is_scalar_array):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-3)) or a "
            f"learning rate for plain SGD (a float), got {describe(optimizer)}."
        )
    check_learning_rate("optimizer as a learning rate", optimizer)
    return None, jax.numpy.asarray(optimizer)


def is_stream(data: Any) -> bool:
    """Whether ``data`` is an iterable of microbatches (a generator, a data loader), not a
    pytree of arrays: a single pytree leaf with no shape that can be iterated."""
    with warnings.catch_warnings():  # JAX warns when it flattens an iterable as a leaf
        warnings.simplefilter("ignore", DeprecationWarning)
        leaves = jax.tree.leaves(data)
    return (
        len(leaves) == 1
        and leaves[0] is data
        and not hasattr(data, "shape")
        and hasattr(data, "__iter__")
        and not isinstance(data, (str, bytes))
    )


def _check_not_microbatches(data: Any) -> None:
    """Iterables and lists of microbatches are not a pytree of stacked arrays."""
    if is_stream(data):
        raise TypeError(
            f"data must be a pytree of arrays with a leading axis of microbatches, got "
            f"{describe(data)}: an iterable of microbatches is streamed by scanfit.fit only. "
            "Pass it to fit, or np.stack the microbatches into arrays (N, ...)."
        )
    if _is_list_of_batches(data):
        raise TypeError(
            f"data is a list of {len(data)} microbatches (each {describe(data[0])}); "
            "data must be a pytree of arrays (N, ...): stack them, e.g. "
            "jax.tree.map(lambda *a: np.stack(a), *batches), or pass iter(batches) "
            "to scanfit.fit, which streams an iterable of microbatches."
        )


def _is_list_of_batches(value: Any) -> bool:
    """A list of pytrees of one structure, each more than a leaf: batches, not a pytree."""
    if not (isinstance(value, list) and value):
        return False
    structures = {jax.tree.structure(x) for x in value}
    return len(structures) == 1 and structures.pop().num_nodes > 1


def check_data(data: Any) -> int:
    """Data leaves must be non-empty arrays sharing a leading axis N >= 1; returns N."""
    _check_not_microbatches(data)
    leaves = jax.tree_util.tree_leaves_with_path(data)
    if not leaves:
        raise ValueError(f"data must be a pytree with at least one array, got {data!r}.")
    for path, leaf in leaves:
        if not hasattr(leaf, "shape") or len(leaf.shape) < 1:
            raise ValueError(
                f"data{_path(path)} must be an array with a leading axis of microbatches "
                f"(N, ...), got {describe(leaf)}."
            )
    sizes = {leaf.shape[0] for _, leaf in leaves}
    if len(sizes) > 1:
        listing = ", ".join(f"data{_path(p)}: {tuple(leaf.shape)}" for p, leaf in leaves)
        raise ValueError(
            f"data leaves must share the leading axis N (microbatches); got shapes {listing}."
        )
    n = sizes.pop()
    if n == 0:
        raise ValueError(
            f"data must hold at least one microbatch, got N=0 (data{_path(leaves[0][0])} has "
            f"shape {tuple(leaves[0][1].shape)})."
        )
    for path, leaf in leaves:
        if 0 in leaf.shape[1:]:
            # An empty batch gives a NaN mean loss: a divergence with nothing to fix in lr.
            raise ValueError(
                f"data{_path(path)} has shape {tuple(leaf.shape)}: every microbatch is empty "
                "(an axis of size 0); each needs at least one example."
            )
    return n


# The carry counts updates in int32 (step, first_nonfinite).
MAX_UPDATES = 2**31 - 1


def check_loop_settings(n: int, *, epochs: Any, accumulate: Any, unroll: Any) -> None:
    if not _is_int(epochs) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}.")
    if not _is_int(accumulate) or accumulate < 1:
        raise ValueError(f"accumulate must be an integer >= 1, got {accumulate!r}.")
    if n % accumulate:
        raise ValueError(
            f"accumulate={accumulate} must divide the number of microbatches N={n}; "
            f"drop {n % accumulate} microbatches or pick a divisor of {n}."
        )
    if not (isinstance(unroll, bool) or (_is_int(unroll) and unroll >= 1)):
        raise ValueError(f"unroll must be an integer >= 1 or a bool, got {unroll!r}.")
    updates = epochs * (n // accumulate)
    if updates > MAX_UPDATES:
        raise ValueError(
            f"epochs={epochs} over N={n} microbatches (accumulate={accumulate}) makes "
            f"{updates} updates; at most {MAX_UPDATES} fit the int32 update counter."
        )


def output_bytes(loss_spec: Any, aux_spec: Any) -> int:
    """Bytes of the per-update outputs (loss and aux) that a scan stacks for each update."""
    specs = [loss_spec, *jax.tree.leaves(aux_spec)]
    return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs)


# scan_train stacks every update's loss and aux in one array: past this, use fit's chunks.
MAX_STACKED_BYTES = 2**30


def check_stacked_outputs(
    updates: int,
    per_update: int,
    *,
    configs: int = 1,
    remedy: str = "use scanfit.fit, which runs them in chunks, or fewer epochs",
) -> None:
    """Raise ValueError if one program would stack more per-update outputs than fit memory."""
    total = updates * per_update * configs
    if total > MAX_STACKED_BYTES:
        raise ValueError(
            f"{updates} updates{f' x {configs} configs' if configs > 1 else ''} would stack "
            f"{total / 2**30:.1f} GiB of per-update losses and aux in one program, more than "
            f"the {MAX_STACKED_BYTES / 2**30:.0f} GiB allowed; {remedy}."
        )


def check_key(key: Any, name: str = "key") -> Any:
    """None, a typed key (``jax.random.key``) or a raw uint32[2] key (``jax.random.PRNGKey``)."""
    if key is None:
        return None
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", (None,)))
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = (
        dtype is not None and np.dtype(dtype) == np.uint32 and shape == (2,) if not typed else False
    )
    if not (typed or raw):
        raise TypeError(
            f"{name} must be a PRNG key, e.g. jax.random.key(0), or None, got {describe(key)}."
        )
    return key


def _spec(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def check_loss(
    loss_fn: Any,
    params: Any,
    data: Any,
    *,
    has_aux: bool,
    extended: bool = False,
    model_state: Any = None,
    rng: Any = None,
) -> tuple[Any, Any]:
    """Traces loss_fn abstractly on one microbatch to check what it returns.

    Returns the shapes and dtypes of ``(loss, aux)``; aux is None without has_aux.
    """
    form = "loss_fn(params, model_state, batch, rng)" if extended else "loss_fn(params, batch)"
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as {form}, got {describe(loss_fn)}.")
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), data)
    aux = None
    if extended:
        key = None if rng is None else jax.eval_shape(lambda k: jax.random.fold_in(k, 0), rng)
        out = jax.eval_shape(loss_fn, params, _spec(model_state), batch, key)
        want = "(loss, (new_model_state, aux))" if has_aux else "(loss, new_model_state)"
        out, new_state = pair(out, f"in the extended form loss_fn must return {want}")
        if has_aux:
            new_state, aux = pair(new_state, f"with has_aux=True, loss_fn must return {want}")
        _check_new_state(model_state, new_state)
    else:
        out = jax.eval_shape(loss_fn, params, batch)
        if has_aux:
            out, aux = pair(out, "with has_aux=True, loss_fn must return a pair (loss, aux)")
    if not has_aux and isinstance(out, (tuple, list)):
        raise ValueError(
            f"loss_fn returned a {type(out).__name__}, not a scalar; if it returns "
            "(loss, aux), pass has_aux=True."
        )
    if getattr(out, "shape", None) != ():
        raise ValueError(
            f"loss_fn must return a scalar loss (shape ()), got {describe(out)}; "
            "reduce it over the batch, e.g. with jnp.mean."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"loss_fn must return a floating loss, got dtype {out.dtype}.")
    return out, aux


def _check_new_state(model_state: Any, new_state: Any) -> None:
    """The state loss_fn returns must be carried again: same structure, shapes and dtypes."""
    want, got = jax.tree.structure(model_state), jax.tree.structure(new_state)
    if want != got:
        raise ValueError(
            "loss_fn must return the new model_state with the structure of model_state: "
            f"expected {want}, got {got}."
        )
    pairs = zip(jax.tree_util.tree_leaves_with_path(model_state), jax.tree.leaves(new_state))
    for (path, old), new in pairs:
        old_spec = (tuple(np.shape(old)), jnp.result_type(old))
        if old_spec != (tuple(new.shape), new.dtype):
            where = jax.tree_util.keystr(path)
            raise ValueError(
                f"loss_fn returned model_state{where} with shape {tuple(new.shape)} and "
                f"dtype {new.dtype}, but it came in with shape {old_spec[0]} and dtype "
                f"{old_spec[1]}: the state is carried from update to update, so both must match."
            )


def check_model_state(model_state: Any) -> Any:
    """Model state: any pytree of arrays (Python numbers become arrays), or None."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(model_state):
        if not (hasattr(leaf, "dtype") or isinstance(leaf, (int, float, bool))):
            raise TypeError(
                f"model_state{_path(path)} must be an array, got {describe(leaf)}; close over "
                "values that are not arrays in loss_fn."
            )
    return jax.tree.map(lambda x: x if hasattr(x, "dtype") else jnp.asarray(x), model_state)


def check_opt_state(opt_state: Any, optimizer: Any, params: Any) -> None:
    """opt_state must have the structure, shapes and dtypes of optimizer.init(params)."""
    want = jax.eval_shape(optimizer.init, params)
    got_def, want_def = jax.tree.structure(opt_state), jax.tree.structure(want)
    if got_def != want_def:
        raise ValueError(
            "opt_state does not match optimizer.init(params): expected structure "
            f"{want_def}, got {got_def}. Pass the opt_state of a run with the same "
            "optimizer and params, or None to start afresh."
        )
    for (path, got), w in zip(
        jax.tree_util.tree_leaves_with_path(opt_state), jax.tree.leaves(want)
    ):
        if tuple(np.shape(got)) != w.shape:
            raise ValueError(
                f"opt_state{_path(path)} has shape {tuple(np.shape(got))}, but "
                f"optimizer.init(params) gives {w.shape}."
            )
        # As jit will see it: float64 NumPy leaves become float32 without x64.
        dtype = got.dtype if hasattr(got, "dtype") else np.result_type(got)
        dtype = jax.dtypes.canonicalize_dtype(dtype)
        if dtype != w.dtype:
            raise TypeError(
                f"opt_state{_path(path)} has dtype {dtype}, but optimizer.init(params) gives "
                f"{w.dtype}; the scan carry must keep its dtypes. Cast it, or pass None."
            )


def check_train_args(
    loss_fn,
    params,
    optimizer,
    data,
    *,
    opt_state,
    epochs,
    key,
    accumulate,
    unroll,
    has_aux,
    model_state=None,
    rng=None,
    extended=False,
    skip_nonfinite=False,
):
    """The checks shared by scan_train, fit and sweep.

    Returns ``(params, optimizer, lr, n, key, loss_spec)``: ``optimizer`` is the
    optax transformation, or None with ``lr`` the learning rate of plain SGD;
    ``loss_spec`` is check_loss's ``(loss, aux)`` shapes and dtypes.
    """
    check_bool("has_aux", has_aux)
    check_bool("skip_nonfinite", skip_nonfinite)
    params = check_params(params)
    optimizer, lr = check_optimizer(optimizer)
    n = check_data(data)
    check_loop_settings(n, epochs=epochs, accumulate=accumulate, unroll=unroll)
    key = check_key(key)
    check_key(rng, "rng")
    loss_spec = check_loss(
        loss_fn,
        params,
        data,
        has_aux=has_aux,
        extended=extended,
        model_state=model_state,
        rng=rng,
    )
    if opt_state is not None:
        check_opt_state(opt_state, optimizer or optax.sgd(lr), params)
    return params, optimizer, lr, n, key, loss_spec


def check_eval_data(eval_data: Any, train_batch: Any = None) -> int:
    """Eval data: a pytree of arrays sharing a leading axis M >= 1; returns M.

    ``train_batch``: one training microbatch's shapes, if known: eval data of the same
    structure and ranks is one batch without the M axis, an error (not B microbatches).
    """
    if _is_list_of_batches(eval_data):
        raise TypeError(
            f"eval_data is a list of {len(eval_data)} eval batches (each "
            f"{describe(eval_data[0])}); eval_data must be a pytree of arrays with a leading "
            "axis M of eval microbatches: stack them, e.g. "
            "jax.tree.map(lambda *a: np.stack(a), *batches)."
        )
    leaves = jax.tree_util.tree_leaves_with_path(eval_data)
    if not leaves:
        raise ValueError(
            "eval_data must be a pytree of arrays with a leading axis M of eval microbatches, "
            f"got {describe(eval_data)}."
        )
    for path, leaf in leaves:
        if not hasattr(leaf, "shape") or len(leaf.shape) < 1 or leaf.shape[0] < 1:
            raise ValueError(
                f"eval_data{_path(path)} must be an array with a leading axis of M >= 1 eval "
                f"microbatches (M, ...), got {describe(leaf)}."
            )
    sizes = {leaf.shape[0] for _, leaf in leaves}
    if len(sizes) > 1:
        listing = ", ".join(f"eval_data{_path(p)}: {tuple(leaf.shape)}" for p, leaf in leaves)
        raise ValueError(f"eval_data leaves must share the leading axis M; got shapes {listing}.")
    _check_eval_batch_axis(eval_data, train_batch)
    return sizes.pop()


def _first(tree: Any) -> Any:
    """The shapes and dtypes of one element along the leading axis of every leaf."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), tree)


def _shapes(tree: Any) -> str:
    """``(float32[8, 3], float32[8])``: a pytree's leaves as dtype[shape], for messages."""
    spec = jax.tree.map(lambda a: f"{jnp.result_type(a)}{list(np.shape(a))}", tree)
    return str(spec).replace("'", "")


def _check_eval_batch_axis(eval_data: Any, train_batch: Any) -> None:
    """One eval batch shaped as a training microbatch has no M axis: it would silently be
    taken as B eval microbatches of one example each."""
    if train_batch is None or jax.tree.structure(eval_data) != jax.tree.structure(train_batch):
        return
    ranks = zip(jax.tree.leaves(eval_data), jax.tree.leaves(train_batch))
    if all(np.ndim(e) == len(t.shape) for e, t in ranks):
        raise ValueError(
            f"eval_data has the shapes of one batch, {_shapes(eval_data)}, like a training "
            f"microbatch {_shapes(train_batch)}, without the leading axis M of eval "
            f"microbatches: it would be taken as {len(jax.tree.leaves(eval_data)[0])} eval "
            "microbatches of one example each. "
            "Give eval_data leaves (M, B, ...): one eval batch is "
            "jax.tree.map(lambda a: a[None], eval_data)."
        )


def _check_positive(name: str, value: Any, meaning: str) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 ({meaning}) or None, got {value!r}.")


def check_eval_args(
    eval_fn: Any,
    eval_data: Any,
    *,
    eval_every: Any,
    best: Any,
    patience: Any,
    form: str,
    metrics_of: Any,
    data_optional: bool = False,
    train_batch: Any = None,
) -> None:
    """The evaluation arguments; ``metrics_of(batch_spec)`` traces eval_fn abstractly
    (``jax.eval_shape``) on one eval microbatch, any error it raises named as eval_fn's.

    ``form`` is how eval_fn is called, for the messages. ``data_optional``: eval_fn
    may make its own data (the step form), called once with ``batch=None``;
    ``train_batch`` one training microbatch's shapes, if known (see ``check_eval_data``).
    """
    if eval_fn is None:
        named = {"eval_data": eval_data, "eval_every": eval_every, "best": best}
        given = [(n, v) for n, v in {**named, "patience": patience}.items() if v is not None]
        if given:
            name, value = given[0]
            raise ValueError(
                f"{name} needs eval_fn, as {form} -> {{name: scalar}}; got eval_fn=None and "
                f"{name}={describe(value)}."
            )
        return
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable as {form} -> {{name: scalar}}, got "
                        f"{describe(eval_fn)}.")  # fmt: skip
    if eval_data is None and not data_optional:
        raise ValueError(
            "eval_fn needs eval_data: a pytree of arrays with a leading axis M of eval "
            "microbatches (each metric is averaged over the M), got eval_data=None."
        )
    if eval_data is not None:
        check_eval_data(eval_data, train_batch)
    _check_positive("eval_every", eval_every, "updates between evaluations")
    _check_positive("patience", patience, "evaluations without improvement before stopping")
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), eval_data)
    try:
        out = metrics_of(batch)
    except Exception as err:  # the user's function: any error, named as theirs
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(
            f"eval_fn failed when called as {form} on one eval microbatch of eval_data "
            f"{_shapes(batch)}: {type(err).__name__}: {str(err).rstrip('.')}. Check eval_fn's "
            "arguments and "
            "that eval_data holds what it reads, with a leading axis M of eval microbatches."
        ) from err
    names = _check_metrics(out, form)
    if best is not None:
        _check_best(best, names)
    elif patience is not None:
        raise ValueError(
            f"patience={patience!r} needs best=(metric, 'min' or 'max') to know what counts as "
            "an improvement, got best=None."
        )


def _check_metrics(out: Any, form: str) -> list[str]:
    if not isinstance(out, dict) or not out:
        raise ValueError(
            f"eval_fn must return a non-empty dict of metric name -> scalar, e.g. "
            f"{{'val_loss': loss}}, as {form}; got {describe(out)}."
        )
    for name, value in out.items():
        if not isinstance(name, str) or name == "step":
            raise ValueError(
                f"eval_fn must name its metrics with strings other than 'step' (res.metrics"
                f"['step'] holds the update count of each evaluation), got {name!r}."
            )
        dtype = getattr(value, "dtype", None)
        if getattr(value, "shape", None) != () or not (
            jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)
        ):
            raise ValueError(
                f"eval_fn must return scalars (shape ()), each metric of one eval microbatch; "
                f"metric {name!r} is {describe(value)}. Reduce it over the batch, e.g. jnp.mean."
            )
    return list(out)


def _check_best(best: Any, names: list[str]) -> None:
    if not (isinstance(best, (tuple, list)) and len(best) == 2 and isinstance(best[0], str)):
        raise ValueError(
            "best must be a pair (metric name, 'min' or 'max'), e.g. ('val_loss', 'min'), "
            f"got {best!r}."
        )
    name, mode = best
    if mode not in ("min", "max"):
        raise ValueError(f"best={tuple(best)!r}: the mode must be 'min' or 'max', got {mode!r}.")
    if name not in names:
        raise ValueError(
            f"best={tuple(best)!r} names metric {name!r}, but eval_fn returns {sorted(names)}."
        )


def check_log_every(log_every: Any, updates: int, chunk: int | None = None) -> None:
    """log_every must divide the run's updates (and fit's chunk_steps, when given)."""
    _check_positive("log_every", log_every, "updates averaged into each logged loss")
    if log_every is None:
        return
    if updates % log_every:
        raise ValueError(
            f"log_every={log_every} must divide the number of updates of the run ({updates}), "
            f"so every logged value is a mean over log_every updates; pick a divisor of "
            f"{updates}."
        )
    if chunk is not None and chunk % log_every:
        raise ValueError(
            f"chunk_steps={chunk} must be a multiple of log_every={log_every}, so no logged "
            "mean spans two chunks."
        )
