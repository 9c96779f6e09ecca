"""Flax NNX and Equinox models passed as they are, against each framework's own loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scanfit

nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
eqx = pytest.importorskip("equinox", reason="equinox is in the examples extra")

F, H, C = 6, 16, 3


def digits_like(n, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, batch, F)).astype(np.float32)
    y = (np.argmax(x[..., :C], axis=-1)).astype(np.int32)
    return x, y


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        # No bias before BatchNorm: its gradient is zero up to rounding, which Adam would
        # turn into updates that differ between any two programs (DESIGN.md).
        self.l1 = nnx.Linear(F, H, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(H, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.l2 = nnx.Linear(H, C, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def nnx_loss(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def nnx_tutorial_loop(model, tx, data):
    """The Flax NNX tutorial's training loop: nnx.jit step, nnx.Optimizer over Params."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(nnx_loss)(model, batch)
        optimizer.update(model, grads)
        return loss

    batches = [jax.tree.map(lambda a, i=i: a[i], data) for i in range(len(data[0]))]
    return np.array([step(model, optimizer, batch) for batch in batches])


def assert_states_close(a, b, rtol):
    def check(x, y):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol)

    jax.tree.map(check, a, b)


def test_nnx_module_trains_like_the_nnx_tutorial_loop():
    seed = int(np.random.default_rng().integers(1 << 20))  # fresh weights, masks and data
    data = digits_like(40, seed=seed)
    tx = optax.adamw(3e-3)
    model = NNXNet(nnx.Rngs(seed, dropout=seed + 1))
    reference = nnx.clone(model)
    res = scanfit.scan_train(nnx_loss, model, tx, data)
    want_losses = nnx_tutorial_loop(reference, tx, data)
    np.testing.assert_allclose(res.losses, want_losses, rtol=1e-5)
    # The module passed in now holds the trained state, as nnx.Optimizer leaves it.
    _, params, rest = nnx.split(model, nnx.Param, ...)
    _, want_params, want_rest = nnx.split(reference, nnx.Param, ...)
    assert_states_close(params, want_params, 1e-5)
    assert_states_close(rest, want_rest, 1e-5)  # BatchNorm statistics and RNG counts
    assert isinstance(res.params, nnx.State)
    assert int(reference.drop.rngs.count[...]) == 40  # one mask per update
    assert not np.allclose(reference.bn.mean[...], 0.0)


def test_nnx_dropout_draws_a_new_mask_every_update():
    class Masks(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(()))
            self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
            self.seen = nnx.BatchStat(jnp.zeros(32))

        def __call__(self, x):
            kept = self.drop(jnp.ones(32))
            self.seen[...] = self.seen[...] + (kept > 0)
            return self.w * x

    model = Masks()
    scanfit.scan_train(lambda m, b: jnp.sum(m(b)), model, 0.1, jnp.ones((50, 1)))
    seen = np.asarray(model.seen[...])
    assert 0 < seen.min() and seen.max() < 50


def test_nnx_module_with_has_aux_and_accumulate():
    data = digits_like(12, seed=3)

    def loss(model, batch):
        logits = model(batch[0])
        acc = jnp.mean(jnp.argmax(logits, -1) == batch[1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), acc

    model = NNXNet(nnx.Rngs(0, dropout=1))
    res = scanfit.scan_train(loss, model, optax.adam(1e-2), data, has_aux=True, accumulate=3)
    assert res.aux.shape == (4,) and res.losses.shape == (4,)
    assert int(model.drop.rngs.count[...]) == 12  # every microbatch drew a mask


def test_a_second_call_with_an_equal_module_does_not_compile_again(compilations):
    data = digits_like(6)
    tx = optax.adam(1e-3)
    scanfit.scan_train(nnx_loss, NNXNet(nnx.Rngs(0, dropout=1)), tx, data)
    before = compilations()
    scanfit.scan_train(nnx_loss, NNXNet(nnx.Rngs(5, dropout=6)), tx, data)
    assert compilations() == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model_state=jnp.zeros(2)), r"params is an nnx.Module, which carries its own state"),
        (dict(rng=jax.random.key(0)), r"pass rng=None, got"),
    ],
)
def test_nnx_module_rejects_an_outside_state_or_rng(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scanfit.scan_train(nnx_loss, NNXNet(nnx.Rngs(0)), 0.1, digits_like(2), **kwargs)


class EqxNet(eqx.Module):
    l1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(F, H, use_bias=False, key=k1)
        self.bn = eqx.nn.BatchNorm(H, axis_name="batch", mode="ema")
        self.drop = eqx.nn.Dropout(0.3)
        self.l2 = eqx.nn.Linear(H, C, key=k2)

    def __call__(self, x, state, key):
        h, state = self.bn(self.l1(x), state)
        return self.l2(self.drop(jax.nn.relu(h), key=key)), state


def eqx_loss(model, state, batch, key):
    x, y = batch
    keys = jax.random.split(key, x.shape[0])
    logits, state = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))(
        x, state, keys
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


def test_equinox_module_with_state_trains_like_a_filter_jit_loop():
    seed = int(np.random.default_rng().integers(1 << 20))
    data = digits_like(30, seed=seed)
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(seed))
    rng, tx = jax.random.key(seed + 1), optax.adam(3e-3)
    res = scanfit.scan_train(eqx_loss, model, tx, data, model_state=state, rng=rng)
    assert isinstance(res.params, EqxNet) and isinstance(res.model_state, eqx.nn.State)

    @eqx.filter_jit
    def step(model, state, opt_state, batch, key):
        (loss, state), grads = eqx.filter_value_and_grad(eqx_loss, has_aux=True)(
            model, state, batch, key
        )
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, opt_state, loss

    opt_state, losses = tx.init(eqx.filter(model, eqx.is_array)), []
    for m in range(30):  # microbatch m gets fold_in(rng, m), as documented
        batch = jax.tree.map(lambda a, m=m: a[m], data)
        model, state, opt_state, loss = step(
            model, state, opt_state, batch, jax.random.fold_in(rng, m)
        )
        losses.append(loss)
    np.testing.assert_allclose(res.losses, np.array(losses), rtol=1e-5)
    assert_states_close(eqx.filter(res.params, eqx.is_array), eqx.filter(model, eqx.is_array), 1e-5)
    assert_states_close(res.model_state, state, 1e-5)


def test_equinox_module_without_state_uses_the_plain_form():
    model = eqx.nn.MLP(F, C, 8, 1, key=jax.random.key(0))

    def loss(model, batch):
        logits = jax.vmap(model)(batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    res = scanfit.scan_train(loss, model, optax.adam(1e-2), digits_like(60), epochs=3)
    assert isinstance(res.params, eqx.nn.MLP)
    assert float(res.losses[-20:].mean()) < 0.6 * float(res.losses[:20].mean())


def test_equinox_module_with_integer_arrays_is_a_clear_error():
    class Counter(eqx.Module):
        w: jax.Array
        n: jax.Array

    with pytest.raises(TypeError, match=r"whose leaves \.n are non-floating arrays"):
        scanfit.scan_train(
            lambda m, b: jnp.sum(m.w * b), Counter(jnp.ones(()), jnp.zeros((), jnp.int32)),
            0.1, jnp.ones((2, 1)),
        )  # fmt: skip


def test_a_flax_train_state_gets_a_short_error_saying_what_to_pass():
    train_state = pytest.importorskip("flax.training.train_state")
    state = train_state.TrainState.create(
        apply_fn=lambda p, x: p["w"] * x, params={"w": jnp.ones(())}, tx=optax.sgd(0.1)
    )
    with pytest.raises(
        TypeError,
        match=r"pass its parts instead: scan_train\(loss_fn, "
        r"state.params, state.tx, data, opt_state=state.opt_state\)",
    ) as err:
        scanfit.scan_train(lambda p, b: jnp.sum(b), state, 0.1, jnp.ones((2, 1)))
    assert len(str(err.value)) < 400  # not the whole repr of the state


def test_an_nnx_state_with_rng_counters_as_params_points_to_model_state():
    _, state = nnx.split(NNXNet(nnx.Rngs(0, dropout=1)))
    with pytest.raises(
        TypeError,
        match=r"dtype uint32. State that is not trained .* goes in "
        r"model_state= .* a Flax NNX or Equinox module can be passed as params",
    ):
        scanfit.scan_train(lambda p, b: jnp.sum(b), state, 0.1, jnp.ones((2, 1)))


def _nnx_state_equal(a, b):
    """Bitwise equality of two NNX states (PRNG keys compared as their data)."""

    def same(x, y):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    jax.tree.map(same, a, b)


# The eval loss falls as training goes on, so its maximum is an early evaluation: the best
# state differs from the last one, which is what restore_best must tell apart.
_EVAL = dict(eval_every=4, best=("loss", "max"), progress=False)


def test_fit_called_again_with_the_nnx_module_it_trained_continues_its_run(tmp_path):
    data, tx = digits_like(12), optax.adam(1e-2)
    kwargs = dict(epochs=2, chunk_steps=4, progress=False)
    full_model = NNXNet(nnx.Rngs(0, dropout=1))
    full = scanfit.fit(nnx_loss, full_model, tx, data, **kwargs)
    model = NNXNet(nnx.Rngs(0, dropout=1))
    stopped = scanfit.fit(nnx_loss, model, tx, data, checkpoint_dir=tmp_path,
                          on_chunk=lambda info: info.step < 8, **kwargs)  # fmt: skip
    assert np.isnan(stopped.losses[8:]).all()  # trained in place up to update 8
    resumed = scanfit.fit(nnx_loss, model, tx, data, checkpoint_dir=tmp_path, **kwargs)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    _nnx_state_equal(nnx.state(model), nnx.state(full_model))
    again = scanfit.fit(nnx_loss, model, tx, data, checkpoint_dir=tmp_path, **kwargs)
    np.testing.assert_array_equal(again.losses, full.losses)  # finished: nothing more to do
    _nnx_state_equal(nnx.state(model), nnx.state(full_model))
    # A module in a state no checkpoint holds is another run's start: still refused.
    other = NNXNet(nnx.Rngs(0, dropout=1))
    scanfit.scan_train(nnx_loss, other, tx, digits_like(1))
    with pytest.raises(scanfit.CheckpointMismatchError, match="the initial params: same shapes"):
        scanfit.fit(nnx_loss, other, tx, data, checkpoint_dir=tmp_path, **kwargs)


@pytest.mark.parametrize("driver", ["scan_train", "fit"])
def test_restore_best_leaves_an_nnx_module_at_the_best_evaluation(driver, tmp_path):
    data, tx, train = digits_like(12), optax.adam(1e-2), getattr(scanfit, driver)
    ev = dict(eval_fn=lambda m, b: {"loss": nnx_loss(m, b)}, eval_data=digits_like(2, seed=1))
    kwargs = (
        dict(**ev, **_EVAL) if driver == "fit" else dict(**ev, eval_every=4, best=_EVAL["best"])
    )
    plain = train(nnx_loss, NNXNet(nnx.Rngs(0, dropout=1)), tx, data, **kwargs)
    assert 0 < int(plain.best_step) < 12
    if driver == "fit":
        kwargs["checkpoint_dir"] = tmp_path
    model = NNXNet(nnx.Rngs(0, dropout=1))
    res = train(nnx_loss, model, tx, data, restore_best=True, **kwargs)
    _nnx_state_equal(res.params, plain.best_params)
    _nnx_state_equal(res.model_state, plain.best_model_state)
    _nnx_state_equal(nnx.state(model, nnx.Param), plain.best_params)
    _nnx_state_equal(nnx.state(model, nnx.Not(nnx.Param)), plain.best_model_state)
    jax.tree.map(np.testing.assert_array_equal, res.opt_state, plain.opt_state)  # the last
    if driver == "fit":  # the module left at the best state still continues its run
        again = train(nnx_loss, model, tx, data, restore_best=True, **kwargs)
        np.testing.assert_array_equal(again.losses, plain.losses)
        _nnx_state_equal(nnx.state(model, nnx.Param), plain.best_params)


def test_restore_best_gives_the_best_equinox_module():
    model = eqx.nn.MLP(F, C, 8, 1, key=jax.random.key(0))

    def loss(model, batch):
        logits = jax.vmap(model)(batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    kwargs = dict(eval_fn=lambda m, b: {"loss": loss(m, b)}, eval_data=digits_like(2, seed=1),
                  eval_every=4, best=("loss", "max"))  # fmt: skip
    plain = scanfit.scan_train(loss, model, optax.adam(1e-2), digits_like(12), **kwargs)
    assert 0 < int(plain.best_step) < 12
    for train in (scanfit.scan_train, functools.partial(scanfit.fit, progress=False)):
        res = train(loss, model, optax.adam(1e-2), digits_like(12), restore_best=True, **kwargs)
        assert isinstance(res.params, eqx.nn.MLP)
        jax.tree.map(np.testing.assert_array_equal, eqx.filter(res.params, eqx.is_array),
                     eqx.filter(plain.best_params, eqx.is_array))  # fmt: skip
