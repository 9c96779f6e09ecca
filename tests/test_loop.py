"""scan_train against the slow obvious version: a Python loop of the same optax updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scanfit
from scanfit._loop import _scan_train_jit
from scanfit._scan import epoch_order

# ---------------------------------------------------------------------------
# A small model with nested dict / list / tuple params, and its reference loop.


def init_params(rng, dtype=np.float64):
    return {
        "layers": [
            (rng.normal(size=(3, 4)).astype(dtype), np.zeros(4, dtype)),
            (rng.normal(size=(4, 2)).astype(dtype), np.zeros(2, dtype)),
        ],
        "scale": np.asarray(1.0, dtype),
    }


def mlp_loss(params, batch):
    x, y = batch
    h = x
    for i, (w, b) in enumerate(params["layers"]):
        h = h @ w + b
        if i == 0:
            h = jnp.tanh(h)
    return jnp.mean((params["scale"] * h - y) ** 2)


def make_data(rng, n, b=5, dtype=np.float64):
    x = rng.normal(size=(n, b, 3)).astype(dtype)
    y = rng.normal(size=(n, b, 2)).astype(dtype)
    return x, y


def reference(loss_fn, params, opt, batches, *, opt_state=None, has_aux=False):
    """The obvious Python loop, one optax update per batch, eagerly."""
    opt_state = opt.init(params) if opt_state is None else opt_state
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
    losses, auxs = [], []
    for batch in batches:
        out, grads = grad_fn(params, batch)
        loss, aux = out if has_aux else (out, None)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(loss)
        auxs.append(aux)
    return params, opt_state, np.asarray(losses), auxs


def batches_of(data, order=None):
    n = jax.tree.leaves(data)[0].shape[0]
    order = range(n) if order is None else order
    return [jax.tree.map(lambda a, i=i: a[i], data) for i in order]


def assert_trees_close(a, b, rtol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol), a, b)


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(0.01),
    # optax's built-in schedules compute in float32, which would cap the agreement at
    # ~1e-7; a float64 cosine decay keeps the comparison at float64 precision.
    "adamw_schedule": lambda: optax.adamw(
        lambda count: 0.01 * (1 + jnp.cos(jnp.pi * jnp.asarray(count, jnp.float64) / 30)),
        weight_decay=0.1,
    ),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matches_python_loop_of_optax_updates(name, x64):
    rng = np.random.default_rng(hash(name) % 2**32)
    params, data = init_params(rng), make_data(rng, 30)
    opt = OPTIMIZERS[name]()
    res = scanfit.scan_train(mlp_loss, params, opt, data)
    want_params, want_state, want_losses, _ = reference(mlp_loss, params, opt, batches_of(data))
    assert res.losses.shape == (30,)
    np.testing.assert_allclose(res.losses, want_losses, rtol=1e-12)
    assert_trees_close(res.params, want_params, 1e-12)
    assert_trees_close(res.opt_state, want_state, 1e-12)
    assert int(res.skipped) == 0 and int(res.first_nonfinite) == -1


def test_float_optimizer_is_plain_sgd(x64):
    rng = np.random.default_rng(1)
    params, data = init_params(rng), make_data(rng, 10)
    res = scanfit.scan_train(mlp_loss, params, 0.03, data)
    want, *_ = reference(mlp_loss, params, optax.sgd(0.03), batches_of(data))
    assert_trees_close(res.params, want, 1e-12)


def test_float32_matches_float64_reference():
    rng = np.random.default_rng(2)
    params, data = init_params(rng, np.float32), make_data(rng, 40, dtype=np.float32)
    res = scanfit.scan_train(mlp_loss, params, optax.adam(0.01), data)
    assert res.losses.dtype == jnp.float32
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        d64 = jax.tree.map(lambda a: np.asarray(a, np.float64), data)
        want, *_ = reference(mlp_loss, p64, optax.adam(0.01), batches_of(d64))
    # float32 rounding over 40 updates of a 3-4-2 model: 1e-4 is ~1000 ulps.
    assert_trees_close(res.params, want, 1e-4)


@pytest.mark.parametrize("epochs", [1, 3])
def test_epochs_with_key_follow_the_documented_permutations(epochs, x64):
    rng = np.random.default_rng(3)
    params, data = init_params(rng), make_data(rng, 12)
    key = jax.random.key(42)
    opt = optax.sgd(0.05, momentum=0.5)
    res = scanfit.scan_train(mlp_loss, params, opt, data, epochs=epochs, key=key)
    order = np.concatenate(
        [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), 12)) for e in range(epochs)]
    )
    want, _, want_losses, _ = reference(mlp_loss, params, opt, batches_of(data, order))
    np.testing.assert_allclose(res.losses, want_losses, rtol=1e-12)
    assert_trees_close(res.params, want, 1e-12)
    np.testing.assert_array_equal(
        epoch_order(key, 1, 12),
        order[12:24]
        if epochs > 1
        else np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), 12)),
    )


def test_epochs_without_key_repeat_the_stored_order(x64):
    rng = np.random.default_rng(4)
    params, data = init_params(rng), make_data(rng, 6)
    res = scanfit.scan_train(mlp_loss, params, optax.adam(0.01), data, epochs=3)
    want, _, want_losses, _ = reference(
        mlp_loss, params, optax.adam(0.01), batches_of(data, list(range(6)) * 3)
    )
    np.testing.assert_allclose(res.losses, want_losses, rtol=1e-12)
    assert_trees_close(res.params, want, 1e-12)


def test_raw_uint32_key_gives_the_same_order_as_its_typed_key(x64):
    rng = np.random.default_rng(5)
    params, data = init_params(rng), make_data(rng, 8)
    raw = jax.random.PRNGKey(7)
    typed = jax.random.wrap_key_data(raw)
    a = scanfit.scan_train(mlp_loss, params, 0.01, data, epochs=2, key=raw)
    b = scanfit.scan_train(mlp_loss, params, 0.01, data, epochs=2, key=typed)
    np.testing.assert_array_equal(a.losses, b.losses)


@pytest.mark.parametrize("k", [2, 3])
def test_accumulate_matches_optax_multisteps(k, x64):
    rng = np.random.default_rng(6 + k)
    params, data = init_params(rng), make_data(rng, 12)
    res = scanfit.scan_train(mlp_loss, params, optax.adam(0.02), data, accumulate=k)
    # MultiSteps accumulates in float32 unless told otherwise.
    multi = optax.MultiSteps(optax.adam(0.02), every_k_schedule=k, accumulator_dtype=jnp.float64)
    want, _, want_losses, _ = reference(mlp_loss, params, multi, batches_of(data))
    assert res.losses.shape == (12 // k,)
    np.testing.assert_allclose(res.losses, want_losses.reshape(-1, k).mean(1), rtol=1e-12)
    assert_trees_close(res.params, want, 1e-12)


def test_accumulate_equals_one_update_on_the_concatenated_batch(x64):
    # With a mean-reduced loss and equal microbatch sizes, the mean of k gradients
    # is the gradient on the k microbatches concatenated.
    rng = np.random.default_rng(9)
    params, (x, y) = init_params(rng), make_data(rng, 8)
    res = scanfit.scan_train(mlp_loss, params, optax.sgd(0.1), (x, y), accumulate=4)
    big = (x.reshape(2, 20, 3), y.reshape(2, 20, 2))
    want = scanfit.scan_train(mlp_loss, params, optax.sgd(0.1), big)
    np.testing.assert_allclose(res.losses, want.losses, rtol=1e-12)
    assert_trees_close(res.params, want.params, 1e-12)


def test_has_aux_is_stacked_per_update(x64):
    rng = np.random.default_rng(10)
    params, data = init_params(rng), make_data(rng, 9)

    def loss_with_aux(p, batch):
        loss = mlp_loss(p, batch)
        return loss, {"twice": 2 * loss, "x_mean": jnp.mean(batch[0], axis=0)}

    res = scanfit.scan_train(loss_with_aux, params, optax.sgd(0.05), data, has_aux=True)
    _, _, want_losses, auxs = reference(
        loss_with_aux, params, optax.sgd(0.05), batches_of(data), has_aux=True
    )
    assert res.aux["x_mean"].shape == (9, 3)
    np.testing.assert_allclose(res.aux["twice"], 2 * want_losses, rtol=1e-12)
    np.testing.assert_allclose(res.aux["x_mean"], np.stack([a["x_mean"] for a in auxs]), rtol=1e-12)
    acc = scanfit.scan_train(loss_with_aux, params, 0.05, data, has_aux=True, accumulate=3)
    assert acc.aux["x_mean"].shape == (3, 3)
    np.testing.assert_allclose(acc.aux["x_mean"][0], data[0][:3].mean(axis=(0, 1)), rtol=1e-12)


def test_no_aux_gives_none():
    rng = np.random.default_rng(11)
    res = scanfit.scan_train(
        mlp_loss, init_params(rng, np.float32), 0.01, make_data(rng, 3, dtype=np.float32)
    )
    assert res.aux is None


def test_opt_state_continuation_equals_one_long_run(x64):
    rng = np.random.default_rng(12)
    params, data = init_params(rng), make_data(rng, 10)
    opt = optax.adamw(optax.linear_schedule(0.05, 0.0, 40), weight_decay=0.01)
    key = jax.random.key(3)
    long = scanfit.scan_train(mlp_loss, params, opt, data, epochs=4)
    first = scanfit.scan_train(mlp_loss, params, opt, data, epochs=2)
    second = scanfit.scan_train(
        mlp_loss, first.params, opt, data, epochs=2, opt_state=first.opt_state
    )
    np.testing.assert_array_equal(np.concatenate([first.losses, second.losses]), long.losses)
    jax.tree.map(np.testing.assert_array_equal, second.params, long.params)
    del key


def test_vmap_over_initial_params(x64):
    rng = np.random.default_rng(13)
    data = make_data(rng, 8)
    inits = [init_params(rng) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: np.stack(a), *inits)
    res = jax.vmap(lambda p: scanfit.scan_train(mlp_loss, p, optax.adam(0.01), data))(stacked)
    for i, p in enumerate(inits):
        want, _, want_losses, _ = reference(mlp_loss, p, optax.adam(0.01), batches_of(data))
        np.testing.assert_allclose(res.losses[i], want_losses, rtol=1e-12)
        assert_trees_close(jax.tree.map(lambda a, i=i: a[i], res.params), want, 1e-12)


def test_jittable_with_traced_learning_rate():
    rng = np.random.default_rng(14)
    params, data = init_params(rng, np.float32), make_data(rng, 5, dtype=np.float32)
    run = jax.jit(lambda lr: scanfit.scan_train(mlp_loss, params, lr, data).losses)
    np.testing.assert_allclose(
        run(0.01), scanfit.scan_train(mlp_loss, params, 0.01, data).losses, rtol=1e-6
    )


def test_second_call_with_same_shapes_does_not_compile_again():
    rng = np.random.default_rng(15)
    params, data = init_params(rng, np.float32), make_data(rng, 6, dtype=np.float32)
    opt = optax.adam(1e-3)
    scanfit.scan_train(mlp_loss, params, opt, data, epochs=2)
    scanfit.scan_train(mlp_loss, params, 0.1, data)
    before = _scan_train_jit._cache_size()
    other_params, other_data = init_params(rng, np.float32), make_data(rng, 6, dtype=np.float32)
    scanfit.scan_train(mlp_loss, other_params, opt, other_data, epochs=2)
    scanfit.scan_train(mlp_loss, params, 0.3, data)  # a new learning rate is an argument
    assert _scan_train_jit._cache_size() == before


@pytest.mark.parametrize("skip", [False, True])
def test_program_size_does_not_grow_with_n_or_epochs(skip):
    rng = np.random.default_rng(16)
    params = init_params(rng, np.float32)

    def hlo_size(n, epochs):
        data = make_data(rng, n, dtype=np.float32)
        lowered = jax.jit(
            lambda p, d: scanfit.scan_train(
                mlp_loss,
                p,
                optax.adam(1e-3),
                d,
                epochs=epochs,
                key=jax.random.key(0),
                skip_nonfinite=skip,
            )
        ).lower(params, data)
        return lowered.as_text().count("\n")  # number of ops, not their constants

    assert hlo_size(10, 1) == hlo_size(1000, 1)
    assert hlo_size(10, 2) == hlo_size(10, 50)


def poisoned_data(rng, n, bad):
    x, y = make_data(rng, n)
    for i in bad:
        y[i, 0, 0] = np.nan if i % 2 else np.inf
    return x, y


def test_skip_nonfinite_skips_exactly_the_poisoned_updates(x64):
    rng = np.random.default_rng(17)
    params = init_params(rng)
    bad = [3, 4, 9]
    data = poisoned_data(rng, 12, bad)
    opt = optax.adam(0.01)
    res = scanfit.scan_train(mlp_loss, params, opt, data, skip_nonfinite=True)
    good = [i for i in range(12) if i not in bad]
    want, want_state, want_losses, _ = reference(mlp_loss, params, opt, batches_of(data, good))
    assert int(res.skipped) == 3 and int(res.first_nonfinite) == 3
    np.testing.assert_allclose(np.asarray(res.losses)[good], want_losses, rtol=1e-12)
    assert not np.isfinite(np.asarray(res.losses)[bad]).any()  # reported, not hidden
    assert_trees_close(res.params, want, 1e-12)
    assert_trees_close(res.opt_state, want_state, 1e-12)


def test_without_skip_the_first_nonfinite_update_is_reported(x64):
    rng = np.random.default_rng(18)
    params = init_params(rng)
    res = scanfit.scan_train(mlp_loss, params, 0.01, poisoned_data(rng, 10, [6, 8]))
    assert int(res.first_nonfinite) == 6 and int(res.skipped) == 0
    assert not np.isfinite(res.params["scale"])


def test_first_nonfinite_counts_updates_not_microbatches(x64):
    rng = np.random.default_rng(19)
    params = init_params(rng)
    res = scanfit.scan_train(
        mlp_loss, params, 0.01, poisoned_data(rng, 12, [7]), accumulate=2, skip_nonfinite=True
    )
    assert int(res.first_nonfinite) == 3 and int(res.skipped) == 1


def test_divergence_from_a_too_large_learning_rate_is_flagged(x64):
    rng = np.random.default_rng(20)
    params, data = init_params(rng), make_data(rng, 200)
    res = scanfit.scan_train(mlp_loss, params, 1e3, data)
    first = int(res.first_nonfinite)
    assert first >= 0
    assert np.isfinite(res.losses[:first]).all() or not np.isfinite(res.losses[first])


# ---------------------------------------------------------------------------
# Bad input: a clear Python error before tracing.


def _ok():
    rng = np.random.default_rng(0)
    return init_params(rng, np.float32), make_data(rng, 6, dtype=np.float32)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (
            dict(data=(np.ones((6, 5, 3)), np.ones((7, 5, 2)))),
            ValueError,
            r"data leaves must share the leading axis N \(microbatches\); got shapes "
            r"data\[0\]: \(6, 5, 3\), data\[1\]: \(7, 5, 2\)",
        ),
        (
            dict(data={"x": np.ones(3), "y": 2.0}),
            ValueError,
            r"data\['y'\] must be an array with a leading axis of microbatches \(N, \.\.\.\), "
            r"got 2.0 of type float",
        ),
        (dict(data=()), ValueError, r"data must be a pytree with at least one array, got \(\)"),
        (
            dict(accumulate=4),
            ValueError,
            r"accumulate=4 must divide the number of microbatches N=6; drop 2 microbatches",
        ),
        (dict(accumulate=0), ValueError, r"accumulate must be an integer >= 1, got 0"),
        (dict(epochs=0), ValueError, r"epochs must be an integer >= 1, got 0"),
        (dict(epochs=1.5), ValueError, r"epochs must be an integer >= 1, got 1.5"),
        (dict(unroll=0), ValueError, r"unroll must be an integer >= 1 or a bool, got 0"),
        (
            dict(optimizer="adam"),
            TypeError,
            r"optimizer must be an optax.GradientTransformation \(e.g. optax.adam\(1e-3\)\) or a "
            r"learning rate for plain SGD \(a float\), got 'adam' of type str",
        ),
        (
            dict(optimizer=optax.adam),
            TypeError,
            r"optimizer must be an optax.GradientTransformation",
        ),
        (
            dict(optimizer=-0.1),
            ValueError,
            r"optimizer as a learning rate must be a positive finite number, got -0.1",
        ),
        (
            dict(key=0),
            TypeError,
            r"key must be a PRNG key, e.g. jax.random.key\(0\), or None, got 0 of type int",
        ),
        (
            dict(key=np.ones(3, np.uint32)),
            TypeError,
            r"key must be a PRNG key.*got an array of shape \(3,\) and dtype uint32",
        ),
        (
            dict(loss_fn=lambda p, b: b[0].sum(-1)),
            ValueError,
            r"loss_fn must return a scalar loss \(shape \(\)\), got an array of shape \(5,\) "
            r"and dtype float32; reduce it over the batch",
        ),
        (
            dict(loss_fn=lambda p, b: (mlp_loss(p, b), 1.0)),
            ValueError,
            r"loss_fn returned a tuple, not a scalar; if it returns \(loss, aux\), "
            r"pass has_aux=True",
        ),
        (
            dict(has_aux=True),
            ValueError,
            r"with has_aux=True, loss_fn must return a pair \(loss, aux\), got an array of "
            r"shape \(\) and dtype float32",
        ),
        (dict(loss_fn="mse"), TypeError, r"loss_fn must be callable as loss_fn\(params, batch\)"),
        (
            dict(params={"w": np.ones(3, np.int32)}),
            TypeError,
            r"params\['w'\] must be a floating array \(the optimizer trains every leaf of "
            r"params\), got an array of shape \(3,\) and dtype int32. State that is not trained "
            r"\(counters, RNG keys, batch statistics\) goes in model_state=",
        ),
        (dict(params={}), ValueError, r"params must be a pytree with at least one array"),
        (
            dict(opt_state=optax.sgd(0.1).init({"w": np.ones(3)})),
            ValueError,
            r"opt_state does not match optimizer.init\(params\): expected structure",
        ),
        (dict(has_aux="yes"), TypeError, r"has_aux must be True or False, got 'yes' of type str"),
        (dict(has_aux=1), TypeError, r"has_aux must be True or False, got 1 of type int"),
        (
            dict(skip_nonfinite="no"),
            TypeError,
            r"skip_nonfinite must be True or False, got 'no' of type str",
        ),
        (
            dict(data=(np.ones((0, 5, 3)), np.ones((0, 5, 2)))),
            ValueError,
            r"data must hold at least one microbatch, got N=0 \(data\[0\] has shape \(0, 5, 3\)\)",
        ),
        (
            dict(data=(np.ones((0, 5, 3)), np.ones((0, 5, 2))), key=jax.random.key(0)),
            ValueError,
            r"data must hold at least one microbatch, got N=0",
        ),
        (
            dict(data=(np.ones((6, 0, 3)), np.ones((6, 0, 2)))),
            ValueError,
            r"data\[0\] has shape \(6, 0, 3\): every microbatch is empty \(an axis of size 0\)",
        ),
        (
            dict(epochs=10**9),
            ValueError,
            r"epochs=1000000000 over N=6 microbatches \(accumulate=1\) makes 6000000000 "
            r"updates; at most 2147483647 fit the int32 update counter",
        ),
        (
            dict(epochs=10**8),
            ValueError,
            r"600000000 updates would stack 2.2 GiB of per-update losses and aux in one program, "
            r"more than the 1 GiB allowed; use scanfit.fit, which runs them in chunks",
        ),
        (
            dict(epochs=10**7, loss_fn=lambda p, b: (mlp_loss(p, b), jnp.zeros(8)), has_aux=True),
            ValueError,
            r"60000000 updates would stack 2.0 GiB of per-update losses and aux",
        ),
    ],
)
def test_bad_input_is_a_clear_python_error(change, error, match):
    params, data = _ok()
    kwargs = dict(loss_fn=mlp_loss, params=params, optimizer=optax.adam(1e-3), data=data)
    kwargs.update(change)
    args = [kwargs.pop(k) for k in ("loss_fn", "params", "optimizer", "data")]
    with pytest.raises(error, match=match):
        scanfit.scan_train(*args, **kwargs)


def test_opt_state_with_wrong_dtypes_names_the_leaf():
    # An int32 state used to reach lax.scan and fail there with a carry-type error.
    params, data = _ok()
    opt = optax.adam(1e-3)
    wrong = jax.tree.map(lambda a: np.zeros(np.shape(a), np.int32), opt.init(params))
    with pytest.raises(
        TypeError,
        match=r"opt_state\[0\]\.mu\['layers'\]\[0\]\[0\] has dtype int32, but "
        r"optimizer.init\(params\) gives float32; the scan carry must keep its dtypes",
    ):
        scanfit.scan_train(mlp_loss, params, opt, data, opt_state=wrong)


def test_opt_state_of_float64_numpy_leaves_is_accepted_as_jit_sees_it():
    params, data = _ok()
    opt = optax.sgd(0.1, momentum=0.9)
    state = jax.tree.map(lambda a: np.asarray(a, np.float64), opt.init(params))
    res = scanfit.scan_train(mlp_loss, params, opt, data, opt_state=state)
    assert res.losses.shape == (6,)


def test_opt_state_with_wrong_shapes_names_the_leaf():
    params, data = _ok()
    opt = optax.sgd(0.1, momentum=0.9)
    wrong = opt.init(jax.tree.map(lambda a: np.ones(np.shape(a) + (1,), np.float32), params))
    with pytest.raises(
        ValueError,
        match=r"opt_state\[0\]\.trace\['layers'\]\[0\]\[0\] has shape "
        r"\(3, 4, 1\), but optimizer.init\(params\) gives \(3, 4\)",
    ):
        scanfit.scan_train(mlp_loss, params, opt, data, opt_state=wrong)


# --- The extended form: model state and per-microbatch randomness --------------------------

from _stateful_problem import loss as stateful_loss  # noqa: E402
from _stateful_problem import loss_with_aux as stateful_loss_aux  # noqa: E402
from _stateful_problem import problem as stateful_problem  # noqa: E402


def extended_reference(loss_fn, params, opt, data, model_state, rng, *, epochs, key, k, has_aux):
    """The documented rules as a Python loop of jitted steps: microbatch m of the run gets
    fold_in(rng, m); the state threads through every microbatch in order; an update is the
    mean gradient of k consecutive microbatches (in the epoch's order when shuffled)."""
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    opt_state, n, m, losses = opt.init(params), len(jax.tree.leaves(data)[0]), 0, []
    for e in range(epochs):
        order = np.arange(n) if key is None else np.asarray(scanfit._scan.epoch_order(key, e, n))
        for u in range(n // k):
            total = None
            for j in range(k):
                batch = jax.tree.map(lambda a, i=order[u * k + j]: a[i], data)
                sub = None if rng is None else jax.random.fold_in(rng, m)
                (loss, rest), g = grad(params, model_state, batch, sub)
                model_state = rest[0] if has_aux else rest
                m += 1
                total = (loss, g) if total is None else jax.tree.map(jnp.add, total, (loss, g))
            loss, g = jax.tree.map(lambda a: a / k, total)
            updates, opt_state = opt.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(loss)
    return params, model_state, np.asarray(losses)


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("has_aux", [False, True])
def test_extended_form_equals_a_loop_of_the_documented_rules(x64, accumulate, shuffle, has_aux):
    _, params, model_state, data = stateful_problem(n=12, dtype=np.float64, seed=11)
    fn = stateful_loss_aux if has_aux else stateful_loss
    key = jax.random.key(3) if shuffle else None
    rng = jax.random.key(int(np.random.default_rng().integers(1 << 30)))  # fresh masks
    opt = optax.adam(0.05)
    res = scanfit.scan_train(
        fn, params, opt, data, model_state=model_state, rng=rng, epochs=2, key=key,
        accumulate=accumulate, has_aux=has_aux,
    )  # fmt: skip
    want_params, want_state, want_losses = extended_reference(
        fn, params, opt, data, model_state, rng, epochs=2, key=key, k=accumulate,
        has_aux=has_aux,
    )  # fmt: skip
    np.testing.assert_allclose(res.losses, want_losses, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), res.params, want_params)
    np.testing.assert_allclose(res.model_state["mean"], want_state["mean"], rtol=1e-12)
    assert int(res.model_state["count"]) == 2 * 12 == int(want_state["count"])
    if has_aux:  # aux is averaged over an update's microbatches, as for the plain form
        np.testing.assert_allclose(res.aux["sqrt_loss"].shape, (24 // accumulate,))


def test_every_update_draws_a_new_mask_and_the_state_advances():
    def loss(params, state, batch, rng):
        mask = jax.random.bernoulli(rng, 0.5, (64,))
        return jnp.sum(params * batch), {"masks": state["masks"] + mask, "n": state["n"] + 1}

    state = {"masks": jnp.zeros(64), "n": jnp.zeros((), jnp.int32)}
    res = scanfit.scan_train(
        loss, jnp.zeros(()), 0.1, jnp.ones((40, 1)), model_state=state, rng=jax.random.key(0)
    )
    counts = np.asarray(res.model_state["masks"])
    assert int(res.model_state["n"]) == 40
    assert 0 < counts.min() and counts.max() < 40  # no element kept or dropped every time


def test_rng_alone_passes_none_as_state_and_state_alone_passes_none_as_rng():
    seen = {}

    def loss(params, state, batch, rng):
        seen["state"], seen["rng"] = state, rng
        return jnp.sum(params * batch), state

    scanfit.scan_train(loss, jnp.zeros(()), 0.1, jnp.ones((3, 1)), rng=jax.random.key(0))
    assert seen["state"] is None and seen["rng"] is not None
    scanfit.scan_train(loss, jnp.zeros(()), 0.1, jnp.ones((3, 1)), model_state=jnp.zeros(2))
    assert seen["rng"] is None and seen["state"].shape == (2,)


def test_skipped_updates_leave_the_model_state_unchanged():
    def loss(params, state, batch, rng):
        return jnp.sum(params * batch) / batch[0], state + 1.0  # batch[0] == 0: inf

    data = jnp.array([[1.0], [0.0], [1.0]])
    res = scanfit.scan_train(
        loss, jnp.ones(()), 0.1, data, model_state=jnp.zeros(()), skip_nonfinite=True
    )
    assert int(res.skipped) == 1 and float(res.model_state) == 2.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_params_train_like_a_jitted_loop(dtype):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(30, 8, 3)), dtype)
    y = x @ jnp.asarray([1.0, -2.0, 0.5], dtype)
    params = {"w": jnp.zeros(3, dtype)}

    def loss(p, b):
        return jnp.mean((b[0] @ p["w"] - b[1]) ** 2)

    opt = optax.adam(0.05, mu_dtype=dtype)
    res = scanfit.scan_train(loss, params, opt, (x, y))
    assert res.params["w"].dtype == dtype and res.opt_state[0].mu["w"].dtype == dtype
    p, s = params, opt.init(params)
    step = jax.jit(lambda p, s, b: (lambda g: opt.update(g, s, p))(jax.grad(loss)(p, b)))
    for i in range(30):
        u, s = step(p, s, (x[i], y[i]))
        p = optax.apply_updates(p, u)
    # The two programs fuse differently, so a rounding may differ by an ulp of the dtype,
    # which Adam then carries: 8 ulps of relative slack.
    np.testing.assert_allclose(
        np.asarray(res.params["w"], np.float32),
        np.asarray(p["w"], np.float32),
        rtol=8 * float(jnp.finfo(dtype).eps),
    )
    assert float(res.losses[-1]) < 0.2 * float(res.losses[0])


def _state_loss(params, state, batch, rng):
    return jnp.sum(params * batch), state


@pytest.mark.parametrize(
    "loss_fn, kwargs, error, match",
    [
        (
            lambda p, s, b, r: jnp.sum(p * b),
            dict(model_state=jnp.zeros(2)),
            ValueError,
            r"in the extended form loss_fn must return \(loss, new_model_state\), got an array",
        ),
        (
            lambda p, s, b, r: (jnp.sum(p * b), (s, 1.0, 2.0)),
            dict(model_state=jnp.zeros(2), has_aux=True),
            ValueError,
            r"with has_aux=True, loss_fn must return \(loss, \(new_model_state, aux\)\), got a "
            r"tuple of length 3",
        ),
        (
            lambda p, s, b, r: (jnp.sum(p * b), {"s": s}),
            dict(model_state=jnp.zeros(2)),
            ValueError,
            r"loss_fn must return the new model_state with the structure of model_state",
        ),
        (
            lambda p, s, b, r: (jnp.sum(p * b), s.astype(jnp.int32)),
            dict(model_state=jnp.zeros(2)),
            ValueError,
            r"loss_fn returned model_state with shape \(2,\) and dtype int32, but it came in "
            r"with shape \(2,\) and dtype float32",
        ),
        (
            _state_loss,
            dict(rng=3),
            TypeError,
            r"rng must be a PRNG key, e.g. jax.random.key\(0\), or None, got 3",
        ),
        (
            _state_loss,
            dict(model_state={"f": "relu"}),
            TypeError,
            r"model_state\['f'\] must be an array, got 'relu' of type str",
        ),
        (
            lambda p, b: jnp.sum(p * b),
            dict(rng=jax.random.key(0)),
            TypeError,
            r"takes 2 positional arguments but 4 were given",
        ),
    ],
)
def test_extended_form_errors_are_clear(loss_fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        scanfit.scan_train(loss_fn, jnp.zeros(()), 0.1, jnp.ones((3, 1)), **kwargs)
