"""scan_steps and fit_steps: the user's own step, against a Python loop of the same step."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scanfit
from scanfit._scan import epoch_order

OPT = optax.adam(0.05)


def _problem(seed: int, n: int = 6, b: int = 5, f: int = 3, dtype=jnp.float64):
    """Fresh random regression data (N, B, F), (N, B) and a state: params, Adam, an EMA."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (n, b, f), dtype)
    y = x @ jnp.arange(1.0, f + 1, dtype=dtype) + 0.1 * jax.random.normal(k2, (n, b), dtype)
    w = 0.1 * jax.random.normal(k3, (f,), dtype)
    return (x, y), (w, OPT.init(w), w)


def _step(state, batch, rng=None):
    """One Adam update, an EMA of the params, and (with rng) noise on the gradient."""
    params, opt_state, ema = state
    x, y = batch

    def loss_fn(p):
        return jnp.mean((x @ p - y) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(params)
    if rng is not None:
        g = g + 0.01 * jax.random.normal(rng, g.shape, g.dtype)
    updates, opt_state = OPT.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = 0.9 * ema + 0.1 * params
    return (params, opt_state, ema), {"loss": loss, "gnorm": jnp.linalg.norm(g), "g": g}


def _eval(state, batch):
    x, y = batch
    return {"val": jnp.mean((x @ state[2] - y) ** 2)}


def _reference(step, state, data, *, epochs=1, key=None, rng=None, steps=None):
    """The obvious Python loop: states after each step and stacked metrics."""
    jstep = jax.jit(step)
    n = steps if data is None else jax.tree.leaves(data)[0].shape[0]
    states, metrics, t = [state], [], 0
    for e in range(1 if data is None else epochs):
        order = np.arange(n) if key is None else np.asarray(epoch_order(key, e, n))
        for i in order:
            batch = None if data is None else _row(data, i)
            args = (state, batch) if rng is None else (state, batch, jax.random.fold_in(rng, t))
            state, m = jstep(*args)
            states.append(state)
            metrics.append(m)
            t += 1
    return states, jax.tree.map(lambda *a: np.stack(a), *metrics)


def _row(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _close(a, b, rtol=1e-12):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("with_rng", [False, True])
def test_scan_steps_equals_python_loop(x64, shuffle, with_rng):
    seed = np.random.randint(1 << 30)
    data, state = _problem(seed)
    key = jax.random.key(seed + 1) if shuffle else None
    rng = jax.random.key(seed + 2) if with_rng else None
    step = _step if with_rng else (lambda s, b: _step(s, b))
    res = scanfit.scan_steps(step, state, data, epochs=3, key=key, rng=rng)
    states, metrics = _reference(step, state, data, epochs=3, key=key, rng=rng)
    _close(res.state, states[-1])
    assert res.metrics["g"].shape == (18, 3)
    _close(res.metrics, metrics)
    assert int(res.first_nonfinite) == -1


def test_scan_steps_without_data_gets_none_and_fold_in(x64):
    def walk(state, batch, rng):
        assert batch is None
        pos, count = state
        return (pos + jax.random.normal(rng, (), pos.dtype), count + 1), {"pos": pos}

    state = (jnp.float64(0.0), jnp.int32(0))
    rng = jax.random.key(np.random.randint(1 << 30))
    res = scanfit.scan_steps(walk, state, steps=9, rng=rng)
    states, metrics = _reference(walk, state, None, rng=rng, steps=9)
    _close(res.state, states[-1])
    _close(res.metrics, metrics)
    assert int(res.state[1]) == 9


def test_scan_steps_log_every_means(x64):
    data, state = _problem(np.random.randint(1 << 30))
    res = scanfit.scan_steps(_step, state, data, epochs=2, log_every=4)
    _, metrics = _reference(_step, state, data, epochs=2)
    for name, values in metrics.items():
        _close(res.metrics[name], values.reshape(3, 4, *values.shape[1:]).mean(1))


def test_scan_steps_eval_best_patience_equals_loop(x64):
    seed = np.random.randint(1 << 30)
    data, state = _problem(seed, n=8)
    eval_data, _ = _problem(seed + 7, n=2)
    res = scanfit.scan_steps(
        _step, state, data, epochs=6, eval_fn=_eval, eval_data=eval_data, eval_every=4,
        best=("val", "min"), patience=2,
    )  # fmt: skip
    states, _ = _reference(_step, state, data, epochs=6)
    # The obvious rule on the host: evaluate every 4 steps, keep the best, stop after 2 worse.
    best, best_step, since, vals = np.inf, -1, 0, []
    for t in range(4, 49, 4):
        v = np.mean([float(_eval(states[t], _row(eval_data, i))["val"])
                     for i in range(2)])  # fmt: skip
        vals.append(v)
        if v < best:
            best, best_step, since = v, t, 0
        else:
            since += 1
        if since >= 2:
            break
    assert int(res.best_step) == best_step
    assert int(res.stopped_at) == (t if since >= 2 else -1)
    _close(res.best_state, states[best_step])
    _close(res.evals["val"][: len(vals)], np.array(vals))
    if since >= 2:
        _close(res.state, states[t])
        assert np.isnan(np.asarray(res.evals["val"][len(vals) :])).all()


def test_eval_without_data_called_once_with_none(x64):
    seen = []

    def episodes(state, batch):
        seen.append(batch)
        return {"score": -jnp.abs(state[0]).sum()}

    data, state = _problem(np.random.randint(1 << 30))
    res = scanfit.scan_steps(_step, state, data, epochs=2, eval_fn=episodes, eval_every=3,
                             best=("score", "max"))  # fmt: skip
    states, _ = _reference(_step, state, data, epochs=2)
    assert all(b is None for b in seen)
    expected = [float(-jnp.abs(states[t][0]).sum()) for t in (3, 6, 9, 12)]
    _close(res.evals["score"], np.array(expected))
    assert int(res.best_step) == [3, 6, 9, 12][int(np.argmax(expected))]


def test_vmap_of_scan_steps_over_seeds_equals_single_runs(x64):
    data, state = _problem(np.random.randint(1 << 30))
    rngs = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3)
    states = jax.tree.map(lambda a: jnp.stack([a, 2 * a, 3 * a]), state)
    run = lambda s, r: scanfit.scan_steps(_step, s, data, epochs=2, rng=r)  # noqa: E731
    batched = jax.jit(jax.vmap(run))(states, rngs)
    for i in range(3):
        single = run(_row(states, i), rngs[i])
        _close(_row(batched.state, i), single.state, rtol=1e-10)
        _close(_row(batched.metrics, i), single.metrics, rtol=1e-10)


@pytest.mark.parametrize("chunk_steps", [1, 5, 7, 100])
def test_fit_steps_chunks_equal_scan_steps_bitwise(chunk_steps):
    data, state = _problem(np.random.randint(1 << 30), dtype=jnp.float32)
    data = jax.tree.map(np.asarray, data)  # host arrays, streamed a chunk at a time
    eval_data = jax.tree.map(lambda a: a[:2], data)
    kw = dict(epochs=3, key=jax.random.key(4), rng=jax.random.key(5), eval_fn=_eval,
              eval_data=eval_data, eval_every=5, best=("val", "min"))  # fmt: skip
    res = scanfit.fit_steps(_step, state, data, chunk_steps=chunk_steps, **kw)
    ref = scanfit.scan_steps(_step, state, data, **kw)
    for a, b in zip(jax.tree.leaves(res), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fit_steps_iterable_equals_stacked():
    data, state = _problem(np.random.randint(1 << 30), dtype=jnp.float32)
    data = jax.tree.map(np.asarray, data)

    class Batches:  # re-iterable, as a DataLoader is
        def __iter__(self):
            return (_row(data, i) for i in range(6))

    res = scanfit.fit_steps(_step, state, Batches(), epochs=2, chunk_steps=4, steps_per_epoch=6)
    ref = scanfit.scan_steps(_step, state, data, epochs=2)
    for a, b in zip(jax.tree.leaves(res), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _gan_like_state(seed):
    """Two optimizer states, a typed key and an int counter: what checkpoints must carry."""
    k = jax.random.key(seed)
    g, d = jax.random.normal(k, (3,)), jax.random.normal(jax.random.fold_in(k, 1), (3,))
    opt_g, opt_d = optax.adam(0.01), optax.sgd(0.02, momentum=0.9)
    return (g, d, opt_g.init(g), opt_d.init(d), k, jnp.int32(0)), opt_g, opt_d


def _gan_step(opt_g, opt_d):
    def step(state, batch):
        g, d, sg, sd, k, count = state
        k, sub = jax.random.split(k)
        z = jax.random.normal(sub, batch.shape)
        fake = z * g[0] + g[1]
        d_loss, gd = jax.value_and_grad(
            lambda d: jnp.mean(jax.nn.softplus(-(batch * d[0] + d[1]))
                               + jax.nn.softplus(fake * d[0] + d[1])))(d)  # fmt: skip
        ud, sd = opt_d.update(gd, sd, d)
        d = optax.apply_updates(d, ud)
        g_loss, gg = jax.value_and_grad(
            lambda g: jnp.mean(jax.nn.softplus(-((z * g[0] + g[1]) * d[0] + d[1])))
        )(g)
        ug, sg = opt_g.update(gg, sg, g)
        g = optax.apply_updates(g, ug)
        return (g, d, sg, sd, k, count + 1), {"loss": g_loss + d_loss, "d_loss": d_loss}

    return step


def test_fit_steps_resume_after_stop_is_bitwise(tmp_path):
    state, opt_g, opt_d = _gan_like_state(np.random.randint(1 << 30))
    step = _gan_step(opt_g, opt_d)
    data = np.random.default_rng(0).normal(2.0, 0.5, (12, 16)).astype(np.float32)
    kw = dict(epochs=3, chunk_steps=5, key=jax.random.key(1))
    whole = scanfit.fit_steps(step, state, data, **kw)
    calls = []
    first = scanfit.fit_steps(step, state, data, checkpoint_dir=tmp_path,
                              on_chunk=lambda info: calls.append(info.step) or len(calls) < 3,
                              **kw)  # fmt: skip
    assert int(first.state[-1]) == 15
    resumed = scanfit.fit_steps(step, state, data, checkpoint_dir=tmp_path, **kw)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.dtypes.issubdtype(resumed.state[4].dtype, jax.dtypes.prng_key)


def test_fit_steps_divergence_in_a_state_leaf(tmp_path):
    bad_at = np.random.randint(3, 17)

    def step(state, batch):
        w, hidden = state  # the loss ignores `hidden`, which turns NaN at step bad_at
        w = w - 0.1 * (w - batch.mean())
        hidden = jnp.where(state[1] >= bad_at - 0.5, jnp.nan, hidden + 1.0)
        return (w, hidden), {"loss": (w - batch.mean()) ** 2}

    data = np.ones((20, 4), np.float32)
    state = (jnp.float32(0.0), jnp.float32(0.0))
    with pytest.raises(scanfit.DivergenceError) as err:
        scanfit.fit_steps(step, state, data, chunk_steps=8, checkpoint_dir=tmp_path)
    states, _ = _reference(step, state, data)
    good = err.value.state.state
    first_bad = next(t for t, s in enumerate(states) if not np.isfinite(s[1])) - 1
    assert err.value.step == first_bad == bad_at
    np.testing.assert_array_equal(np.asarray(good[0]), np.asarray(states[first_bad][0]))
    np.testing.assert_array_equal(np.asarray(good[1]), np.asarray(states[first_bad][1]))


def test_fit_steps_on_two_devices_equals_one(x64):
    data, state = _problem(np.random.randint(1 << 30), b=4)
    one = scanfit.fit_steps(_step, state, data, epochs=2, chunk_steps=5)
    two = scanfit.fit_steps(_step, state, data, epochs=2, chunk_steps=5, devices=2)
    _close(two.state, one.state, rtol=1e-9)
    _close(two.metrics, one.metrics, rtol=1e-9)


def _fixed(state, batch):
    return state, {"loss": jnp.float32(0)}


@pytest.mark.parametrize(
    "step, match",
    [
        (lambda s, b: s, "must return \\(state, metrics\\)"),
        (lambda s, b: ((s, s), {}), "state of the structure it was given"),
        (lambda s, b: (jnp.zeros(3), {}), "changed state from float32\\[\\] to float32\\[3\\]"),
        (lambda s, b: (s.astype(jnp.int32), {}), "changed state from float32\\[\\] to int32"),
        (lambda s, b: (s, [s]), "metrics as a dict of name -> array"),
        (lambda s, b: (s, {"name": "text"}), "of arrays, as step_fn.*\\[1\\]\\['name'\\]"),
    ],
)
def test_bad_step_fn_is_a_clear_error(step, match):
    for run in (scanfit.scan_steps, scanfit.fit_steps):
        with pytest.raises(ValueError, match=match):
            run(step, jnp.float32(0), jnp.ones((4, 2)))


def test_bad_step_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="steps is required with data=None"):
        scanfit.scan_steps(_fixed, jnp.float32(0))
    with pytest.raises(ValueError, match="steps is for data=None"):
        scanfit.fit_steps(_fixed, jnp.float32(0), jnp.ones((4, 2)), steps=4)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        scanfit.scan_steps(_fixed, jnp.float32(0), steps=0)
    with pytest.raises(TypeError, match="step_fn must be callable"):
        scanfit.scan_steps("step", jnp.float32(0), steps=3)
    with pytest.raises(TypeError, match="state\\['f'\\] must be an array or a number"):
        scanfit.scan_steps(_fixed, {"f": "x"}, steps=3)
    with pytest.raises(ValueError, match="nan_policy='skip' is for fit"):
        scanfit.fit_steps(_fixed, jnp.float32(0), steps=3, nan_policy="skip")
    with pytest.raises(TypeError, match="rng must be a PRNG key"):
        scanfit.scan_steps(_fixed, jnp.float32(0), steps=3, rng=3)


def test_fit_steps_of_a_vmapped_step_trains_each_configuration(x64):
    data, _ = _problem(np.random.randint(1 << 30))

    def sgd(state, batch):
        w, lr = state
        x, y = batch
        loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
        return (w - lr * g, lr), {"loss": loss}

    lrs = jnp.array([0.3, 0.1, 0.01])
    states = (jnp.zeros((3, 3)), lrs)
    res = scanfit.fit_steps(jax.vmap(sgd, in_axes=(0, None)), states, data, epochs=2,
                            chunk_steps=5)  # fmt: skip
    assert res.metrics["loss"].shape == (12, 3)
    for i in range(3):
        single = scanfit.scan_steps(sgd, (jnp.zeros(3), lrs[i]), data, epochs=2)
        _close(res.state[0][i], single.state[0], rtol=1e-10)
        _close(res.metrics["loss"][:, i], single.metrics["loss"], rtol=1e-10)


def test_fit_steps_log_holds_the_step_metrics(tmp_path):
    def walk(state, batch, rng):
        return state + jax.random.normal(rng), {"position": state}

    scanfit.fit_steps(walk, jnp.float32(0), steps=12, rng=jax.random.key(0), chunk_steps=4,
                      log_dir=tmp_path)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert all("loss" not in r and "position" in r for r in records)  # no loss: none made up


def test_fit_steps_sigterm_saves_and_the_rerun_resumes_bitwise(tmp_path):
    state, opt_g, opt_d = _gan_like_state(np.random.randint(1 << 30))
    step = _gan_step(opt_g, opt_d)
    data = np.random.default_rng(1).normal(2.0, 0.5, (12, 16)).astype(np.float32)
    kw = dict(epochs=2, chunk_steps=4, checkpoint_dir=tmp_path)
    seen = []

    def term(info):  # SIGTERM during the run, as a scheduler sends it
        seen.append(info.step)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(scanfit.Preempted) as stop:
        scanfit.fit_steps(step, state, data, on_chunk=term, **kw)
    assert stop.value.step == 8 and seen == [4, 8]
    resumed = scanfit.fit_steps(step, state, data, **kw)
    whole = scanfit.scan_steps(step, state, data, epochs=2)
    np.testing.assert_array_equal(np.asarray(resumed.state[0]), np.asarray(whole.state[0]))
    np.testing.assert_array_equal(resumed.metrics["d_loss"], whole.metrics["d_loss"])


def test_numpy_integers_and_nan_evaluations_in_the_step_form():
    def walk(state, batch):
        return state + 1.0, {"loss": state}

    res = scanfit.scan_steps(walk, jnp.float32(0), steps=np.int64(6), log_every=np.int32(3))
    assert res.metrics["loss"].tolist() == [1.0, 4.0]
    with pytest.warns(RuntimeWarning, match="eval metric 'v' is nan at the evaluation after"):
        scanfit.fit_steps(walk, jnp.float32(0), steps=6, eval_every=np.int64(2),
                          eval_fn=lambda s, _: {"v": s * jnp.nan})  # fmt: skip


def test_fit_steps_loggers_get_the_metrics_log_records(tmp_path):
    class Tracker:
        def __init__(self):
            self.rows = []

        def log(self, metrics, step):
            self.rows.append((step, metrics))

        def close(self):
            self.rows.append("closed")

    def walk(state, batch, rng):
        return state + jax.random.normal(rng), {"position": state}

    tracker = Tracker()
    scanfit.fit_steps(walk, jnp.float32(0), steps=8, rng=jax.random.key(0), chunk_steps=4,
                      log_dir=tmp_path, loggers=[tracker])  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in tracker.rows[:-1]] == [r["step"] for r in records] == [4, 8]
    assert tracker.rows[-1] == "closed"
    for (_, sent), record in zip(tracker.rows, records):
        assert sent == {"chunk/position": pytest.approx(record["position"])}


def test_load_reads_a_fit_steps_checkpoint(tmp_path):
    state, opt_g, opt_d = _gan_like_state(np.random.randint(1 << 30))
    data = np.random.default_rng(2).normal(2.0, 0.5, (8, 16)).astype(np.float32)
    res = scanfit.fit_steps(_gan_step(opt_g, opt_d), state, data, chunk_steps=4,
                            checkpoint_dir=tmp_path)  # fmt: skip
    loaded = scanfit.load(tmp_path, like=state)
    assert loaded.step == 8
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(res.state)):
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fit_steps_fsdp_shards_the_whole_state_and_equals_one_device(x64):
    k1, k2 = jax.random.split(jax.random.key(np.random.randint(1 << 30)))
    x = jax.random.normal(k1, (6, 8, 64))
    y = jnp.tanh(x @ jax.random.normal(k2, (64,)))
    w = {"w1": 0.1 * jax.random.normal(k2, (64, 32)), "w2": jnp.zeros((32,))}
    opt = optax.adam(0.01)

    def step(state, batch):
        params, opt_state = state
        xb, yb = batch
        loss, g = jax.value_and_grad(lambda p: jnp.mean((jnp.tanh(xb @ p["w1"]) @ p["w2"]
                                                          - yb) ** 2))(params)  # fmt: skip
        updates, opt_state = opt.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    state = (w, opt.init(w))
    one = scanfit.fit_steps(step, state, (x, y), epochs=2, chunk_steps=4)
    per_device = []

    def bytes_on_device0(info):
        per_device.append(
            sum(
                s.data.nbytes
                for a in jax.tree.leaves(info.state)
                for s in a.addressable_shards
                if s.device == jax.devices()[0]
            )
        )

    sharded = scanfit.fit_steps(step, state, (x, y), epochs=2, chunk_steps=4, devices=4,
                                param_sharding="fsdp", on_chunk=bytes_on_device0)  # fmt: skip
    _close(sharded.state, one.state, rtol=1e-9)
    total = sum(a.nbytes for a in jax.tree.leaves(state))
    big = sum(a.nbytes for a in jax.tree.leaves(state) if a.size >= 1024)
    assert per_device and max(per_device) <= (big / 4 + (total - big)) * 1.1
    assert sharded.state[0]["w1"].sharding.spec != jax.sharding.PartitionSpec()
