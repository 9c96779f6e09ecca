"""sweep against a loop of single scan_train runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_loop import init_params, make_data, mlp_loss

import scanfit


def test_grid_is_the_cartesian_product():
    g = scanfit.grid(lr=[0.1, 0.01], b1=[0.9, 0.99], wd=[0.0])
    assert g["lr"].tolist() == [0.1, 0.1, 0.01, 0.01]
    assert g["b1"].tolist() == [0.9, 0.99, 0.9, 0.99]
    assert g["wd"].tolist() == [0.0] * 4


def make_adam(learning_rate, b1):
    return optax.adam(learning_rate, b1=b1)


def test_sweep_equals_separate_scan_train_runs(x64):
    rng = np.random.default_rng(0)
    params, data = init_params(rng), make_data(rng, 12)
    hp = scanfit.grid(learning_rate=[0.003, 0.03], b1=[0.5, 0.9])
    res = scanfit.sweep(
        mlp_loss, params, make_adam, data, hp, epochs=2, accumulate=2, key=jax.random.key(1)
    )
    assert res.losses.shape == (4, 12)
    for i in range(4):
        one = scanfit.scan_train(
            mlp_loss,
            params,
            make_adam(hp["learning_rate"][i], hp["b1"][i]),
            data,
            epochs=2,
            accumulate=2,
            key=jax.random.key(1),
        )
        np.testing.assert_allclose(res.losses[i], one.losses, rtol=1e-12)
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-12),
            res.params,
            one.params,
        )


def test_seeds_give_each_config_its_init_and_shuffle_keys(x64):
    rng = np.random.default_rng(1)
    data = make_data(rng, 8)

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "layers": [
                (jax.random.normal(k1, (3, 4)), jnp.zeros(4)),
                (jax.random.normal(k2, (4, 2)), jnp.zeros(2)),
            ],
            "scale": jnp.ones(()),
        }

    seeds = [3, 4, 5]
    res = scanfit.sweep(
        mlp_loss, init, lambda lr: optax.sgd(lr), data, {"lr": [0.01] * 3}, seeds=seeds, epochs=2
    )
    for i, seed in enumerate(seeds):
        init_key, shuffle_key = jax.random.split(jax.random.key(seed))
        one = scanfit.scan_train(
            mlp_loss, init(init_key), optax.sgd(0.01), data, epochs=2, key=shuffle_key
        )
        np.testing.assert_allclose(res.losses[i], one.losses, rtol=1e-12)
    assert not np.allclose(res.losses[0], res.losses[1])


def test_rank_orders_by_final_loss_and_puts_diverged_last():
    rng = np.random.default_rng(2)
    params, data = init_params(rng, np.float32), make_data(rng, 30, dtype=np.float32)
    hp = {"lr": [1e-4, 1e-2, 1e6]}
    res = scanfit.sweep(mlp_loss, params, lambda lr: optax.sgd(lr), data, hp, epochs=3)
    ranked = scanfit.rank(res, hp, window=5)
    assert [r["lr"] for r in ranked] == [1e-2, 1e-4, 1e6]
    assert ranked[0]["index"] == 1 and not np.isfinite(ranked[-1]["score"])
    by_scores = scanfit.rank(res, hp, scores=[3.0, 1.0, 2.0])
    assert [r["index"] for r in by_scores] == [1, 2, 0]


def test_sweep_compiles_once_for_all_configs(compilations):
    rng = np.random.default_rng(3)
    params, data = init_params(rng, np.float32), make_data(rng, 6, dtype=np.float32)
    loss = lambda p, b: mlp_loss(p, b)  # noqa: E731
    scanfit.sweep(
        loss, params, make_adam, data, scanfit.grid(learning_rate=[1e-3, 1e-2], b1=[0.8, 0.9])
    )
    before = compilations()
    scanfit.sweep(
        loss, params, make_adam, data, scanfit.grid(learning_rate=[5e-3, 5e-2], b1=[0.7, 0.95])
    )
    assert compilations() == before


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(hparams=[0.1]), TypeError, r"hparams must be a non-empty dict of name -> values"),
        (
            dict(hparams={"learning_rate": [[0.1]]}),
            ValueError,
            r"hparams\['learning_rate'\] must be a non-empty 1-D array \(one value per config\), "
            r"got shape \(1, 1\)",
        ),
        (
            dict(hparams={"learning_rate": [0.1, 0.2], "b1": [0.9]}),
            ValueError,
            r"hparams and seeds must all have the same length K; got learning_rate: 2, b1: 1",
        ),
        (
            dict(seeds=[1, 2, 3]),
            ValueError,
            r"same length K; got learning_rate: 2, b1: 2, seeds: 3",
        ),
        (dict(make_optimizer=optax.adam(0.1)), TypeError, r"make_optimizer must be callable"),
        (
            dict(make_optimizer=lambda learning_rate, b1: learning_rate),
            TypeError,
            r"make_optimizer must return an optax.GradientTransformation, got a number",
        ),
        (
            dict(params=lambda key: {"w": jnp.zeros(3)}),
            ValueError,
            r"params is an init function: pass seeds=\[\.\.\.\]",
        ),
        (dict(accumulate=4), ValueError, r"accumulate=4 must divide the number of microbatches"),
        (dict(has_aux="yes"), TypeError, r"has_aux must be True or False, got 'yes' of type str"),
        (
            dict(skip_nonfinite="no"),
            TypeError,
            r"skip_nonfinite must be True or False, got 'no' of type str",
        ),
        (
            dict(data=(np.ones((0, 5, 3), np.float32), np.ones((0, 5, 2), np.float32))),
            ValueError,
            r"data must hold at least one microbatch, got N=0 \(data\[0\] has shape \(0, 5, 3\)\)",
        ),
        (
            dict(data=(np.ones((6, 0, 3), np.float32), np.ones((6, 0, 2), np.float32))),
            ValueError,
            r"data\[0\] has shape \(6, 0, 3\): every microbatch is empty",
        ),
        (
            # 1.5e8 updates x 4 bytes: 0.56 GiB for one config, over 1 GiB for both.
            dict(epochs=25 * 10**6),
            ValueError,
            r"150000000 updates x 2 configs would stack 1.1 GiB of per-update losses and aux",
        ),
    ],
)
def test_bad_sweep_input_is_a_clear_error(kwargs, error, match):
    rng = np.random.default_rng(4)
    args = dict(
        loss_fn=mlp_loss,
        params=init_params(rng, np.float32),
        make_optimizer=make_adam,
        data=make_data(rng, 6, dtype=np.float32),
        hparams={"learning_rate": [0.1, 0.2], "b1": [0.9, 0.8]},
    )
    args.update(kwargs)
    positional = [args.pop(k) for k in ("loss_fn", "params", "make_optimizer", "data", "hparams")]
    with pytest.raises(error, match=match):
        scanfit.sweep(*positional, **args)


def test_sweep_with_seeds_and_model_state_equals_single_runs(x64):
    from _stateful_problem import problem

    loss, params, state, data = problem(n=10, dtype=np.float64)
    hp, seeds, rng = {"learning_rate": np.array([0.01, 0.05, 0.2])}, [3, 9, 4], jax.random.key(8)
    res = scanfit.sweep(
        loss, params, lambda learning_rate: optax.adam(learning_rate), data, hp, seeds=seeds,
        model_state=state, rng=rng, epochs=2,
    )  # fmt: skip
    assert res.model_state["mean"].shape == (3, 6)
    for i, seed in enumerate(seeds):
        one = scanfit.scan_train(
            loss, params, optax.adam(hp["learning_rate"][i]), data, model_state=state,
            rng=jax.random.fold_in(rng, seed), key=jax.random.split(jax.random.key(seed))[1],
            epochs=2,
        )  # fmt: skip
        np.testing.assert_allclose(res.losses[i], one.losses, rtol=1e-12)
        np.testing.assert_allclose(res.params["w"][i], one.params["w"], rtol=1e-12)
        np.testing.assert_allclose(res.model_state["mean"][i], one.model_state["mean"], rtol=1e-12)
        assert int(res.model_state["count"][i]) == 20


def test_sweep_of_an_nnx_module_keeps_one_state_per_config():
    nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
    from test_adapters import NNXNet, digits_like, nnx_loss

    model = NNXNet(nnx.Rngs(0, dropout=1))
    lrs = [1e-3, 1e-2]
    res = scanfit.sweep(nnx_loss, model, lambda lr: optax.adam(lr), digits_like(8), {"lr": lrs})
    for i, lr in enumerate(lrs):
        one = scanfit.scan_train(nnx_loss, NNXNet(nnx.Rngs(0, dropout=1)), optax.adam(lr),
                                 digits_like(8))  # fmt: skip
        np.testing.assert_allclose(res.losses[i], one.losses, rtol=1e-5)
        np.testing.assert_allclose(
            res.model_state["bn"]["mean"][...][i],
            one.model_state["bn"]["mean"][...],
            rtol=1e-5,
            atol=1e-6,
        )
    assert int(model.drop.rngs.count[...]) == 0  # the module passed in is left as it was


def _reseeded(model, seed):
    """The module with every RNG stream reseeded as sweep(seeds=) documents."""
    nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
    keys = nnx.state(model, nnx.RngKey)
    nnx.update(model, jax.tree.map(lambda k: jax.random.fold_in(k, seed), keys))
    return model


def test_sweep_seeds_reseed_an_nnx_modules_rng_streams():
    nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
    from test_adapters import NNXNet, digits_like, nnx_loss

    model, seeds, order = NNXNet(nnx.Rngs(0, dropout=1)), [3, 7], jax.random.key(5)
    before = jax.random.key_data(model.drop.rngs.key[...])
    res = scanfit.sweep(nnx_loss, model, lambda lr: optax.adam(lr), digits_like(8),
                        {"lr": [1e-2, 1e-2]}, seeds=seeds, key=order)  # fmt: skip
    # Same learning rate, data and order: only the dropout masks tell the configs apart.
    assert not np.allclose(res.losses[0], res.losses[1], rtol=1e-3)
    for i, seed in enumerate(seeds):
        one = scanfit.scan_train(nnx_loss, _reseeded(NNXNet(nnx.Rngs(0, dropout=1)), seed),
                                 optax.adam(1e-2), digits_like(8), key=order)  # fmt: skip
        # float32, 8 updates: a vmapped program rounds differently in the last bits.
        np.testing.assert_allclose(res.losses[i], one.losses, rtol=1e-5)
        np.testing.assert_array_equal(
            jax.random.key_data(res.model_state["drop"]["rngs"]["key"][...][i]),
            jax.random.key_data(one.model_state["drop"]["rngs"]["key"][...]),
        )
    np.testing.assert_array_equal(jax.random.key_data(model.drop.rngs.key[...]), before)


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_sweep_of_an_init_function_returning_a_module_equals_single_runs(framework):
    nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
    eqx = pytest.importorskip("equinox", reason="equinox is in the examples extra")
    from test_adapters import NNXNet, digits_like, nnx_loss

    def eqx_loss(model, batch):
        logits = jax.vmap(model)(batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    loss, init = {
        "nnx": (nnx_loss, lambda k: NNXNet(nnx.Rngs(params=k, dropout=jax.random.fold_in(k, 1)))),
        "equinox": (eqx_loss, lambda k: eqx.nn.MLP(6, 3, 8, 1, key=k)),
    }[framework]
    seeds, data = [3, 7], digits_like(8)
    res = scanfit.sweep(loss, init, lambda lr: optax.adam(lr), data, {"lr": [1e-2, 1e-2]},
                        seeds=seeds)  # fmt: skip
    for i, seed in enumerate(seeds):
        init_key, shuffle_key = jax.random.split(jax.random.key(seed))
        one = scanfit.scan_train(loss, init(init_key), optax.adam(1e-2), data, key=shuffle_key)
        np.testing.assert_allclose(res.losses[i], one.losses, rtol=1e-5)  # as above
    assert not np.allclose(res.losses[0], res.losses[1], rtol=1e-3)
