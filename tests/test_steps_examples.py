"""The step-form examples against their obvious references.

- PureJaxRL's PPO (examples/ppo_cartpole.py) through ``fit_steps`` in chunks,
  killed and resumed, and 4 seeds through ``jax.vmap`` of ``scan_steps``, each
  equal bitwise to PureJaxRL's own ``jax.jit(train)`` (or its vmapped form:
  a vmapped run differs from single runs in the last bits, so like is compared
  with like).
- The GAN with two optimizers and an EMA (examples/gan_ema.py) through
  ``scan_steps``/``fit_steps`` against a Python loop of the jitted step.

PPO compiles slowly (about 10 s a program here), so the CI sample is one
chunked run; the rest is marked slow. Needs gymnax (the ``examples`` extra).
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scanfit
from scanfit import _checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(scope="module")
def ppo_example():
    pytest.importorskip("gymnax")
    pytest.importorskip("flax")
    import ppo_cartpole

    return ppo_cartpole


@pytest.fixture(scope="module")
def tiny():
    """PureJaxRL's config, 4 envs x 16 steps, 8 updates (the kill worker's)."""
    pytest.importorskip("gymnax")
    import _ppo_worker

    return _ppo_worker.CONFIG


@pytest.fixture(scope="module")
def reference(ppo_example, tiny):
    """PureJaxRL's run as it is: ``jax.jit(make_train(config))(rng)``."""
    return jax.jit(ppo_example.make_train(tiny))(jax.random.PRNGKey(30))


def assert_bitwise(got, want):
    """Every leaf equal bitwise, at the same path (TrainState's static fields, the
    network's apply and the optimizer, are other objects in another make_ppo)."""
    got, want = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "chunk_steps",
    [3, pytest.param(1, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow)],
)
def test_ppo_fit_steps_in_chunks_equals_purejaxrl_train_bitwise(
    ppo_example, tiny, reference, chunk_steps
):
    ppo = ppo_example.make_ppo(tiny)
    res = scanfit.fit_steps(
        ppo.update_step,  # PureJaxRL's scan body, unchanged
        jax.jit(ppo.init)(jax.random.PRNGKey(30)),
        steps=ppo.num_updates,
        chunk_steps=chunk_steps,
        progress=False,
    )
    assert_bitwise(res.metrics, reference["metrics"])  # every update's rollout info
    assert_bitwise(res.state, reference["runner_state"])  # params, Adam, envs, obs, key
    assert res.metrics["returned_episode_returns"].shape == (8, 16, 4)


@pytest.mark.slow
def test_ppo_sigkill_then_resume_equals_purejaxrl_train_bitwise(tmp_path, reference):
    import _ppo_worker

    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    cmd = [sys.executable, _ppo_worker.__file__, str(ckpt), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _checkpoint.list_checkpoints(ckpt):  # killed after its first checkpoint
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the worker saved no checkpoint in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    killed_at = max(s for s, _ in _checkpoint.list_checkpoints(ckpt))
    assert 2 <= killed_at < 8
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # resumes
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as got:
        leaves = jax.tree.leaves(reference["runner_state"])
        for i, want in enumerate(leaves):
            np.testing.assert_array_equal(got[f"leaf_{i}"], want)
        for name, want in reference["metrics"].items():
            np.testing.assert_array_equal(got[f"metric_{name}"], want)


@pytest.mark.slow
def test_ppo_four_seeds_by_vmap_of_scan_steps_equal_vmapped_purejaxrl_bitwise(ppo_example, tiny):
    ppo = ppo_example.make_ppo(tiny)
    rngs = jax.random.split(jax.random.PRNGKey(30), 4)
    want = jax.jit(jax.vmap(ppo_example.make_train(tiny)))(rngs)

    def train(rng):  # PureJaxRL's train with scan_steps for its lax.scan
        return scanfit.scan_steps(ppo.update_step, ppo.init(rng), steps=ppo.num_updates)

    # Like with like: the init in the same program (runner states made by a separate
    # jit(vmap(init)) give params 1 ulp apart after 8 updates, as lax.scan does from them).
    res = jax.jit(jax.vmap(train))(rngs)
    assert_bitwise(res.metrics, want["metrics"])
    assert_bitwise(res.state, want["runner_state"])
    returns = np.asarray(res.metrics["returned_episode_returns"])
    assert not np.array_equal(returns[0], returns[1])  # each seed its own run


@pytest.mark.slow
def test_ppo_example_runs_and_logs_the_mean_episode_return(ppo_example, tmp_path):
    out = ppo_example.main(quick=True, log_dir=tmp_path / "logs")
    assert out["updates"] == 20 and out["stopped_at"] == -1  # not solved in 20 updates
    assert out["eval_steps"].tolist() == [5, 10, 15, 20]
    assert np.all((out["eval_returns"] > 0) & (out["eval_returns"] <= 500))
    assert out["logged_lines"] == 2 + 4  # a line per chunk of 10 updates, one per evaluation
    assert np.isfinite(out["train_return"]).all() and out["train_return"].shape == (20,)
    assert out["seed_best_returns"].shape == (4,) and (out["seed_best_returns"] > 0).all()


@pytest.mark.slow
def test_ppo_stops_one_evaluation_after_the_return_reaches_solved(ppo_example, monkeypatch):
    monkeypatch.setattr(ppo_example, "SOLVED", 0.0)  # solved at the first evaluation
    res = ppo_example.train_one(ppo_example.QUICK, eval_every=5, chunk_steps=5, progress=False)
    assert int(res.best_step) == 5 and int(res.stopped_at) == 10
    assert np.asarray(res.evals["step"]).tolist() == [5, 10, -1, -1]


# --- GAN + EMA -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gan():
    import gan_ema

    return gan_ema


def test_gan_ema_scan_steps_equals_a_python_loop_of_the_jitted_step(gan, x64):
    init, step, evaluate = gan.make_gan()
    state = jax.tree.map(lambda a: a.astype(jnp.float64), init(jax.random.PRNGKey(3)))
    data = gan.real_batches(jax.random.PRNGKey(4), 30).astype(np.float64)
    rng = jax.random.PRNGKey(5)
    res = scanfit.scan_steps(step, state, data, rng=rng, epochs=2)

    jitted, want, metrics = jax.jit(step), state, []
    for t in range(60):  # step t gets fold_in(rng, t) and microbatch t mod 30
        want, m = jitted(want, data[t % 30], jax.random.fold_in(rng, t))
        metrics.append(m)
    # float64, 60 steps of two small MLPs: rounding differences stay far below 1e-9.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), res.state, want
    )
    for name in ("d_loss", "g_loss"):
        np.testing.assert_allclose(res.metrics[name], [float(m[name]) for m in metrics], rtol=1e-9)
    # The EMA is of the generator after each update, not a copy of it.
    g, ema = jax.tree.leaves(res.state.generator), jax.tree.leaves(res.state.ema)
    assert not any(np.allclose(a, b) for a, b in zip(g, ema))


@pytest.mark.slow
def test_gan_ema_fit_steps_in_chunks_equals_scan_steps_bitwise(gan, tmp_path):
    init, step, evaluate = gan.make_gan()
    state = init(jax.random.PRNGKey(6))
    data = gan.real_batches(jax.random.PRNGKey(7), 24)
    kw = dict(rng=jax.random.PRNGKey(8), eval_fn=evaluate, eval_every=8, best=("distance", "min"))
    want = scanfit.scan_steps(step, state, data, **kw)
    got = scanfit.fit_steps(
        step, state, data, chunk_steps=5, checkpoint_dir=tmp_path, progress=False, **kw
    )
    assert_bitwise(got.state, want.state)
    assert_bitwise(got.metrics, want.metrics)
    assert_bitwise(got.evals, want.evals)
    assert_bitwise(got.best_state, want.best_state)
    assert int(got.best_step) == int(want.best_step)


@pytest.mark.slow
def test_gan_example_learns_the_ring(gan):
    out = gan.main(quick=True)
    assert out["after"]["distance"] < 0.7 * out["before"]["distance"]
    assert np.isfinite(out["d_loss"]).all() and np.isfinite(out["g_loss"]).all()
    assert out["d_loss"].shape == (out["steps"],)


@pytest.mark.slow
def test_ppo_without_info_in_the_shuffle_is_the_same_run_bitwise(ppo_example, tiny, reference):
    # The benchmark's faster vmapped variant: the loss never reads the rollout's info.
    got = jax.jit(ppo_example.make_train({**tiny, "SHUFFLE_INFO": False}))(jax.random.PRNGKey(30))
    assert_bitwise(got, reference)
