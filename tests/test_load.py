"""scanfit.load: the newest verified checkpoint, bitwise what fit returned, into any structure."""

import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scanfit
from scanfit import _checkpoint, _load

sys.path.insert(0, str(Path(__file__).parent))
import _linear_problem  # noqa: E402
from _linear_problem import D, mse  # noqa: E402

N = 8  # microbatches: checkpoints at updates 4 and 8


def problem(seed):
    return _linear_problem.problem(seed, N)


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A run with evaluation and best params, checkpointed at updates 4 and 8."""
    params, data = problem(1)
    ckpt = tmp_path_factory.mktemp("evaluated")
    res = scanfit.fit(
        mse, params, optax.adam(0.05), data, chunk_steps=4, progress=False, checkpoint_dir=ckpt,
        eval_fn=lambda p, b: {"val": mse(p, b)}, eval_data=jax.tree.map(lambda a: a[:2], data),
        eval_every=2, best=("val", "min"),
    )  # fmt: skip
    return ckpt, params, res


def test_load_without_like_equals_the_fit_result_bitwise(evaluated):
    ckpt, params, res = evaluated
    got = scanfit.load(ckpt)
    assert got.step == N and got.path == _checkpoint.path_for(ckpt, N)
    assert_tree_equal(got.params, res.params)
    np.testing.assert_array_equal(got.losses, res.losses)
    # Without like, adam's state comes back as lists and dicts of the same leaves.
    for a, b in zip(jax.tree.leaves(got.opt_state), jax.tree.leaves(res.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert got.opt_state[0]["count"] == N and set(got.opt_state[0]) == {"count", "mu", "nu"}
    assert_tree_equal(got.best_params, res.best_params)
    assert got.best_step == int(res.best_step)
    assert_tree_equal(got.metrics, jax.tree.map(np.asarray, res.metrics))
    assert got.model_state is None and got.aux is None


def test_like_a_pytree_with_shardings_places_the_arrays(evaluated):
    ckpt, params, res = evaluated
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    like = jax.device_put(params, rep)
    got = scanfit.load(ckpt, like=like)
    assert_tree_equal(got.params, res.params)
    assert all(leaf.sharding == rep for leaf in jax.tree.leaves(got.params))
    assert_tree_equal(got.best_params, res.best_params)


def test_like_that_does_not_match_is_a_clear_error(evaluated):
    ckpt, _, _ = evaluated
    with pytest.raises(ValueError, match=r"like does not match the checkpoint: array \"params"):
        scanfit.load(ckpt, like={"w": np.zeros(D + 1, np.float32), "b": np.zeros(())})


def test_a_damaged_newest_file_falls_back_to_the_previous_with_a_warning(evaluated, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(evaluated[0], ckpt)
    newest = _checkpoint.path_for(ckpt, N)
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    newest.write_bytes(bytes(raw))
    with pytest.warns(scanfit.CheckpointWarning, match=r"skipping checkpoint .*ckpt-0000000008"):
        got = scanfit.load(ckpt)
    assert got.step == 4
    first_four = jax.tree.map(lambda a: a[:4], problem(1)[1])
    want = scanfit.fit(mse, evaluated[1], optax.adam(0.05), first_four, progress=False)
    assert_tree_equal(got.params, want.params)


def test_nothing_verified_is_file_not_found_and_a_file_is_a_value_error(tmp_path):
    (tmp_path / "ckpt-0000000004.npz").write_bytes(b"PK\x03\x04 not a checkpoint")
    with (
        pytest.warns(scanfit.CheckpointWarning),
        pytest.raises(FileNotFoundError, match=r"no checkpoint in .* verifies \(1 named"),
    ):
        scanfit.load(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint_dir .* is not a directory"):
        scanfit.load(tmp_path / "ckpt-0000000004.npz")
    with pytest.raises(ValueError, match=r"is not a directory"):
        scanfit.load(tmp_path / "missing")


def test_nnx_like_gives_the_trained_module(tmp_path):
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.out = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.bn(self.lin(x))))[..., 0]

    def loss(model, batch):
        x, y = batch
        return jnp.mean((model(x) - y) ** 2)

    _, data = problem(2)
    trained = Net(nnx.Rngs(0))
    scanfit.fit(loss, trained, optax.adam(0.01), data, chunk_steps=4, progress=False,
                checkpoint_dir=tmp_path)  # fmt: skip
    fresh = Net(nnx.Rngs(1))  # other initial values: all must be overwritten
    got = scanfit.load(tmp_path, like=fresh)
    want_state, got_state = nnx.state(trained), nnx.state(fresh)
    assert_tree_equal(jax.tree.map(np.asarray, got_state), jax.tree.map(np.asarray, want_state))
    x = jnp.asarray(data[0][0])
    np.testing.assert_array_equal(fresh(x), trained(x))
    assert isinstance(got.params, nnx.State)


def test_equinox_like_rebuilds_the_module(tmp_path):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(D, 1, 4, 1, key=jax.random.key(0))

    def loss(m, batch):
        x, y = batch
        return jnp.mean((jax.vmap(m)(x)[..., 0] - y) ** 2)

    _, data = problem(3)
    res = scanfit.fit(loss, model, optax.adam(0.01), data, chunk_steps=4, progress=False,
                      checkpoint_dir=tmp_path)  # fmt: skip
    got = scanfit.load(tmp_path, like=eqx.nn.MLP(D, 1, 4, 1, key=jax.random.key(5)))
    assert isinstance(got.params, eqx.nn.MLP)
    assert_tree_equal(eqx.filter(got.params, eqx.is_array), eqx.filter(res.params, eqx.is_array))


def test_tree_paths_rebuild_as_dicts_and_lists():
    tree = {"a": [np.zeros(1), {"b": np.ones(2)}], "c'": np.full(3, 2.0)}
    arrays = {
        f"state{jax.tree_util.keystr(p)}": x for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }
    arrays["losses"] = np.arange(3.0)
    rebuilt = _load._rebuild(arrays)
    assert_tree_equal(rebuilt["state"], tree)
    np.testing.assert_array_equal(rebuilt["losses"], np.arange(3.0))
    assert _load._split_key("opt_state[0].mu['w']") == ("opt_state", (0, "mu", "w"))
    assert _load._split_key("x[<odd>]") is None
