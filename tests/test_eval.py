"""Evaluation, best state and early stopping inside the compiled program; log_every.

Every in-graph figure is checked against the slow obvious version: a run of exactly
that many updates, evaluated on the host.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scanfit
from scanfit import _eval
from scanfit._scan import epoch_order
from tests import _stateful_problem

F = 3
W_TRUE = np.array([1.0, -2.0, 0.5], np.float32)


def problem(n=20, m=4, batch=8, seed=0):
    """Training pulls w from 0 to W_TRUE; the eval targets use W_TRUE / 2, so the
    validation loss falls, bottoms out half way, then rises: early stopping triggers."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, batch, F)).astype(np.float32)
    xv = rng.normal(size=(m, batch, F)).astype(np.float32)
    return (x, x @ W_TRUE), (xv, xv @ (W_TRUE / 2))


def loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def loss_aux(p, batch):
    value = loss(p, batch)
    return value, {"sqrt": jnp.sqrt(value), "w0": p["w"][0]}


def eval_fn(p, batch):
    value = loss(p, batch)
    return {"val_loss": value, "neg_loss": -value, "hits": jnp.sum(value < 1.0)}


P0 = {"w": np.zeros(F, np.float32), "b": np.zeros((), np.float32)}
OPT = optax.adam(0.02)


def visited(data, *, epochs, key=None):
    """The microbatches in the order a run visits them, over all its epochs."""
    n = len(jax.tree.leaves(data)[0])
    if key is None:
        order = np.tile(np.arange(n), epochs)
    else:
        order = np.concatenate([np.asarray(epoch_order(key, e, n)) for e in range(epochs)])
    return jax.tree.map(lambda a: a[order], data)


def run_of(updates, data, *, epochs=1, key=None, accumulate=1, loss_fn=loss, **kw):
    """The reference: a plain scan_train of exactly ``updates`` updates, no evaluation."""
    stream = visited(data, epochs=epochs, key=key)
    head = jax.tree.map(lambda a: a[: updates * accumulate], stream)
    return scanfit.scan_train(loss_fn, P0, OPT, head, accumulate=accumulate, **kw)


def host_metrics(params, eval_data):
    """eval_fn eagerly on each eval microbatch, averaged on the host."""
    per = [eval_fn(params, jax.tree.map(lambda a, i=i: a[i], eval_data)) for i in range(4)]
    return {k: np.mean([float(d[k]) for d in per]) for k in per[0]}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # NNX RNG streams
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------
# scan_train


@pytest.mark.parametrize(
    "epochs, key, accumulate, every",
    [(1, None, 1, 5), (3, None, 1, 7), (3, jax.random.key(4), 2, 4), (2, jax.random.key(1), 1, 40)],
)
def test_metrics_equal_host_evaluation_of_a_run_that_long(epochs, key, accumulate, every):
    data, eval_data = problem()
    res = scanfit.scan_train(
        loss, P0, OPT, data, epochs=epochs, key=key, accumulate=accumulate,
        eval_fn=eval_fn, eval_data=eval_data, eval_every=every,
    )  # fmt: skip
    total = epochs * 20 // accumulate
    want_steps = [*range(every, total + 1, every)]
    want_steps += [total] if total % every else []
    np.testing.assert_array_equal(res.metrics["step"], want_steps)
    assert set(res.metrics) == {"step", "val_loss", "neg_loss", "hits"}
    assert res.stopped_at == -1 and res.best_params is None and res.best_step is None
    for i, step in enumerate(want_steps):
        ref = run_of(step, data, epochs=epochs, key=key, accumulate=accumulate)
        # Eager on the host vs fused in the graph, summed in another order: a few ulps.
        for name, value in host_metrics(ref.params, eval_data).items():
            np.testing.assert_allclose(res.metrics[name][i], value, rtol=2e-6, atol=1e-7)
    # Evaluating changes nothing about training: bitwise the run without it.
    plain = scanfit.scan_train(loss, P0, OPT, data, epochs=epochs, key=key, accumulate=accumulate)
    assert_trees_equal((res.params, res.opt_state, res.losses), (plain.params, plain.opt_state,
                                                                  plain.losses))  # fmt: skip


@pytest.mark.parametrize("best", [("val_loss", "min"), ("neg_loss", "max")])
def test_best_params_are_those_of_a_run_of_best_step_updates(best):
    data, eval_data = problem()
    res = scanfit.scan_train(
        loss, P0, OPT, data, epochs=4, eval_fn=eval_fn, eval_data=eval_data, eval_every=6,
        best=best,
    )  # fmt: skip
    values = np.asarray(res.metrics[best[0]])
    i = int(np.argmin(values) if best[1] == "min" else np.argmax(values))
    assert 0 < i < len(values) - 1  # the problem has its best in the middle
    assert int(res.best_step) == int(res.metrics["step"][i])
    assert res.stopped_at == -1  # no patience: the run goes to the end
    ref = run_of(int(res.best_step), data, epochs=4)
    assert_trees_equal(res.best_params, ref.params)
    assert res.best_model_state is None
    assert_trees_equal(res.params, run_of(80, data, epochs=4).params)


@pytest.mark.parametrize("patience, every", [(1, 5), (3, 5), (2, 7)])
def test_early_stopping_stops_patience_evaluations_after_the_best(patience, every):
    data, eval_data = problem()
    res = scanfit.scan_train(
        loss_aux, P0, OPT, data, epochs=4, has_aux=True, eval_fn=eval_fn, eval_data=eval_data,
        eval_every=every, best=("val_loss", "min"), patience=patience,
    )  # fmt: skip
    stop, best_step = int(res.stopped_at), int(res.best_step)
    steps = np.asarray(res.metrics["step"])
    i = list(steps).index(best_step)
    assert stop == best_step + patience * every == steps[i + patience]
    assert stop < 80
    done = i + patience + 1  # evaluations that ran
    assert np.all(np.diff(res.metrics["val_loss"][i:done]) > 0)  # it really got worse
    # The evaluations skipped after the stop: NaN, step -1; losses and aux NaN.
    assert np.all(steps[done:] == -1) and np.all(np.isnan(res.metrics["val_loss"][done:]))
    assert np.all(np.isnan(res.losses[stop:])) and np.all(np.isnan(res.aux["sqrt"][stop:]))
    assert len(steps) == -(-80 // every)
    # The state at the end is that of a run of exactly stopped_at updates, bitwise.
    ref = run_of(stop, data, epochs=4, loss_fn=loss_aux, has_aux=True)
    assert_trees_equal((res.params, res.opt_state), (ref.params, ref.opt_state))
    assert_trees_equal((res.losses[:stop], res.aux["w0"][:stop]), (ref.losses, ref.aux["w0"]))
    assert_trees_equal(res.best_params, run_of(best_step, data, epochs=4).params)


def test_extended_form_tracks_the_best_model_state():
    loss_fn, params, model_state, data = _stateful_problem.problem(n=24)
    eval_data = jax.tree.map(lambda a: a[:3], data)

    def evaluate(p, state, batch):
        x, y = batch
        return {"mse": jnp.mean(((x - state["mean"]) @ p["w"] + p["b"] - y) ** 2)}

    kw = dict(model_state=model_state, rng=jax.random.key(3), epochs=3)
    res = scanfit.scan_train(
        loss_fn, params, optax.adam(0.05), data, eval_fn=evaluate, eval_data=eval_data,
        eval_every=10, best=("mse", "min"), **kw,
    )  # fmt: skip
    step = int(res.best_step)
    assert step in np.asarray(res.metrics["step"])
    stream = visited(data, epochs=3)
    ref = scanfit.scan_train(
        loss_fn, params, optax.adam(0.05), jax.tree.map(lambda a: a[:step], stream),
        model_state=model_state, rng=jax.random.key(3),
    )  # fmt: skip
    assert_trees_equal((res.best_params, res.best_model_state), (ref.params, ref.model_state))


def test_evaluation_without_eval_every_runs_once_after_the_last_update():
    data, eval_data = problem()
    res = scanfit.scan_train(loss, P0, OPT, data, eval_fn=eval_fn, eval_data=eval_data)
    np.testing.assert_array_equal(res.metrics["step"], [20])
    want = host_metrics(res.params, eval_data)["val_loss"]
    np.testing.assert_allclose(res.metrics["val_loss"], [want], rtol=2e-6)


def test_the_loop_body_is_traced_once_whatever_the_run_length():
    data, eval_data = problem(n=40)
    traces = []

    def counting_eval(p, batch):
        traces.append("eval")
        return eval_fn(p, batch)

    def counting_loss(p, batch):
        traces.append("loss")
        return loss(p, batch)

    counts = []
    for epochs in (1, 2, 50):  # the first call also traces the checks (then cached)
        traces.clear()
        scanfit.scan_train(
            counting_loss, P0, OPT, data, epochs=epochs, eval_fn=counting_eval,
            eval_data=eval_data, eval_every=3, best=("val_loss", "min"), patience=4,
        )  # fmt: skip
        counts.append((traces.count("loss"), traces.count("eval")))
    assert counts[1] == counts[2]


# ---------------------------------------------------------------------------
# log_every


def test_log_every_means_equal_means_of_the_per_update_losses():
    data, _ = problem()
    full = scanfit.scan_train(loss_aux, P0, OPT, data, epochs=3, has_aux=True)
    res = scanfit.scan_train(loss_aux, P0, OPT, data, epochs=3, has_aux=True, log_every=6)
    assert res.losses.shape == (10,) and res.aux["sqrt"].shape == (10,)
    # Sums in the loop's order, divided once: float32 rounding of a 6-term mean.
    np.testing.assert_allclose(res.losses, np.reshape(full.losses, (10, 6)).mean(1), rtol=1e-6)
    np.testing.assert_allclose(res.aux["w0"], np.reshape(full.aux["w0"], (10, 6)).mean(1),
                               rtol=1e-6)  # fmt: skip
    assert_trees_equal(res.params, full.params)


def test_log_every_after_an_early_stop_averages_the_updates_done():
    data, eval_data = problem()
    kw = dict(epochs=4, eval_fn=eval_fn, eval_data=eval_data, eval_every=5,
              best=("val_loss", "min"), patience=1)  # fmt: skip
    full = scanfit.scan_train(loss, P0, OPT, data, **kw)
    res = scanfit.scan_train(loss, P0, OPT, data, log_every=8, **kw)
    stop = int(full.stopped_at)
    assert stop % 8  # the stop falls inside a logged group
    done = stop // 8
    np.testing.assert_allclose(res.losses[:done], np.reshape(full.losses[: done * 8], (-1, 8))
                               .mean(1), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(res.losses[done], np.mean(full.losses[done * 8 : stop]), rtol=1e-6)
    assert np.all(np.isnan(res.losses[done + 1 :]))


# ---------------------------------------------------------------------------
# fit and sweep


@pytest.mark.parametrize("chunk_steps", [1, 4, 5, 9, 40, None])
@pytest.mark.parametrize("host_data", [False, True])
def test_fit_equals_scan_train_at_any_chunk_size(chunk_steps, host_data):
    data, eval_data = problem()
    kw = dict(epochs=4, key=jax.random.key(2), has_aux=True, eval_fn=eval_fn,
              eval_data=eval_data, eval_every=5, best=("val_loss", "min"), patience=2)  # fmt: skip
    want = scanfit.scan_train(loss_aux, P0, OPT, data, **kw)
    assert 0 < want.stopped_at < 80
    fit_data = data if host_data else jax.tree.map(jnp.asarray, data)
    calls = []
    got = scanfit.fit(loss_aux, P0, OPT, fit_data, chunk_steps=chunk_steps, progress=False,
                      on_chunk=lambda info: calls.append(info.step), **kw)  # fmt: skip
    assert_trees_equal(got, want)
    c = chunk_steps or 80
    # No chunk is dispatched after the one in which the run stopped; that one reports
    # the update the run stopped at.
    assert len(calls) == -(-int(want.stopped_at) // c) and calls[-1] == int(want.stopped_at)


@pytest.mark.parametrize("nan_policy", ["raise", "ignore"])
def test_fit_with_log_every_equals_scan_train(nan_policy):
    data, eval_data = problem()
    kw = dict(epochs=3, has_aux=True, log_every=4, eval_fn=eval_fn, eval_data=eval_data,
              eval_every=7)  # fmt: skip
    want = scanfit.scan_train(loss_aux, P0, OPT, data, **kw)
    got = scanfit.fit(loss_aux, P0, OPT, data, chunk_steps=12, nan_policy=nan_policy,
                      progress=False, **kw)  # fmt: skip
    assert got.losses.shape == (15,)
    assert_trees_equal(got, want)


def test_fit_on_two_devices_evaluates_as_one(tmp_path):
    data, eval_data = problem(batch=8)
    kw = dict(epochs=4, eval_fn=eval_fn, eval_data=eval_data, eval_every=5,
              best=("val_loss", "min"), patience=2)  # fmt: skip
    want = scanfit.scan_train(loss, P0, OPT, data, **kw)
    got = scanfit.fit(loss, P0, OPT, data, devices=2, chunk_steps=8, progress=False, **kw)
    assert int(got.stopped_at) == int(want.stopped_at) and got.best_step == want.best_step
    np.testing.assert_array_equal(got.metrics["step"], want.metrics["step"])
    # The batch mean is reduced across two devices: float32 reassociation.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("log_every", [None, 4])
def test_sweep_configs_stop_on_their_own_as_single_runs(x64, log_every):
    data, eval_data = problem()
    data = jax.tree.map(lambda a: a.astype(np.float64), data)
    eval_data = jax.tree.map(lambda a: a.astype(np.float64), eval_data)
    params = jax.tree.map(lambda a: a.astype(np.float64), P0)
    lrs = [0.01, 0.03, 0.1]
    kw = dict(epochs=4, eval_fn=eval_fn, eval_data=eval_data, eval_every=4,
              best=("val_loss", "min"), patience=2, log_every=log_every)  # fmt: skip
    res = scanfit.sweep(loss, params, lambda lr: optax.adam(lr), data, {"lr": lrs}, **kw)
    stops = []
    for i, lr in enumerate(lrs):
        one = scanfit.scan_train(loss, params, optax.adam(lr), data, **kw)
        stops.append(int(one.stopped_at))
        assert int(res.stopped_at[i]) == stops[-1] and int(res.best_step[i]) == one.best_step
        np.testing.assert_array_equal(res.metrics["step"][i], one.metrics["step"])
        # vmapped vs single programs: float64 reassociation only.
        for got, want in zip(jax.tree.leaves(res), jax.tree.leaves(one)):
            np.testing.assert_allclose(np.asarray(got)[i], want, rtol=1e-12, atol=1e-14)
    assert len(set(stops)) == 3  # each config stopped at its own update


# ---------------------------------------------------------------------------
# Framework models

nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
eqx = pytest.importorskip("equinox", reason="equinox is in the examples extra")


class Net(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(F, 16, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))[..., 0]


def nnx_loss(model, batch):
    return jnp.mean((model(batch[0]) - batch[1]) ** 2)


def nnx_eval(model, batch):
    return {"mse": nnx_loss(model, batch)}


def test_nnx_model_is_evaluated_in_eval_mode_as_on_the_host():
    data, eval_data = problem()
    model = Net(nnx.Rngs(params=0, dropout=1))
    res = scanfit.scan_train(nnx_loss, model, OPT, data, epochs=2, eval_fn=nnx_eval,
                             eval_data=eval_data, eval_every=40, best=("mse", "min"))  # fmt: skip
    assert not model.bn.use_running_average and not model.drop.deterministic  # still training
    # The module now holds the final state: evaluate it as the NNX tutorial does.
    model.eval()
    host = np.mean([float(nnx_eval(model, (eval_data[0][i], eval_data[1][i]))["mse"])
                    for i in range(4)])  # fmt: skip
    np.testing.assert_allclose(res.metrics["mse"][-1], host, rtol=2e-6)
    # In eval mode: no dropout (two evaluations agree) and the running statistics
    # (a train-mode forward pass would normalise by the eval batch's own statistics).
    model.train()
    train_mode = np.mean([float(nnx_eval(model, (eval_data[0][i], eval_data[1][i]))["mse"])
                          for i in range(4)])  # fmt: skip
    assert abs(train_mode - host) > 1e-4
    # Evaluation draws no dropout mask and leaves the BatchNorm statistics as they were.
    plain_model = Net(nnx.Rngs(params=0, dropout=1))
    plain = scanfit.scan_train(nnx_loss, plain_model, OPT, data, epochs=2)
    assert_trees_equal((res.params, res.model_state), (plain.params, plain.model_state))
    assert isinstance(res.best_params, nnx.State) and isinstance(res.best_model_state, nnx.State)


def test_equinox_model_eval_gets_the_module():
    data, eval_data = problem()
    model = eqx.nn.Linear(F, "scalar", key=jax.random.key(0))

    def eqx_loss(m, batch):
        return jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)

    res = scanfit.scan_train(eqx_loss, model, OPT, data, epochs=2,
                             eval_fn=lambda m, b: {"mse": eqx_loss(m, b)}, eval_data=eval_data,
                             eval_every=8, best=("mse", "min"))  # fmt: skip
    assert isinstance(res.best_params, eqx.nn.Linear)
    i = int(np.argmin(res.metrics["mse"]))
    host = np.mean([float(eqx_loss(res.best_params, (eval_data[0][j], eval_data[1][j])))
                    for j in range(4)])  # fmt: skip
    np.testing.assert_allclose(res.metrics["mse"][i], host, rtol=2e-6)


# ---------------------------------------------------------------------------
# Errors, raised before tracing


def _bad_eval_shape(p, b):
    return {"val_loss": jnp.zeros(3)}


EV = dict(eval_fn=eval_fn, eval_data=problem()[1])

ERRORS = [
    (dict(eval_data=EV["eval_data"]), ValueError, r"eval_data needs eval_fn.*got eval_fn=None"),
    (dict(best=("val_loss", "min")), ValueError, r"best needs eval_fn"),
    (dict(eval_fn=eval_fn), ValueError, r"eval_fn needs eval_data.*got eval_data=None"),
    ({**EV, "eval_fn": 3}, TypeError, r"eval_fn must be callable as eval_fn\(params, batch\)"),
    ({**EV, "eval_every": 0}, ValueError, r"eval_every must be an integer >= 1.*got 0"),
    ({**EV, "eval_every": 2.5}, ValueError, r"eval_every must be an integer >= 1.*got 2.5"),
    (
        {**EV, "eval_data": (np.zeros((0, 8, F)), np.zeros((0, 8)))},
        ValueError,
        r"eval_data\[0\] must be an array with a leading axis of M >= 1",
    ),
    (
        {**EV, "eval_data": (np.zeros((2, 8, F)), np.zeros((3, 8)))},
        ValueError,
        r"eval_data leaves must share the leading axis M",
    ),
    (
        {**EV, "eval_fn": loss},
        ValueError,
        r"eval_fn must return a non-empty dict.*got an array of shape \(\)",
    ),
    (
        {**EV, "eval_fn": _bad_eval_shape},
        ValueError,
        r"metric 'val_loss' is an array of shape \(3,\)",
    ),
    ({**EV, "eval_fn": lambda p, b: {"step": loss(p, b)}}, ValueError, r"other than 'step'"),
    (
        {**EV, "best": "val_loss"},
        ValueError,
        r"best must be a pair \(metric name, 'min' or 'max'\).*got 'val_loss'",
    ),
    (
        {**EV, "best": ("val_loss", "minimum")},
        ValueError,
        r"mode must be 'min' or 'max', got 'minimum'",
    ),
    (
        {**EV, "best": ("acc", "max")},
        ValueError,
        r"names metric 'acc', but eval_fn returns \['hits', 'neg_loss', 'val_loss'\]",
    ),
    (
        {**EV, "patience": 3},
        ValueError,
        r"patience=3 needs best=\(metric, 'min' or 'max'\).*got best=None",
    ),
    (
        {**EV, "patience": 0, "best": ("val_loss", "min")},
        ValueError,
        r"patience must be an integer >= 1.*got 0",
    ),
    (
        dict(log_every=7),
        ValueError,
        r"log_every=7 must divide the number of updates of the run \(20\)",
    ),
    (dict(log_every=-1), ValueError, r"log_every must be an integer >= 1.*got -1"),
]


@pytest.mark.parametrize("kw, exc, match", ERRORS)
def test_bad_arguments_are_reported_before_tracing(kw, exc, match):
    data, _ = problem()
    with pytest.raises(exc, match=match):
        scanfit.scan_train(loss, P0, OPT, data, **kw)


def test_fit_needs_chunks_that_hold_whole_log_groups():
    data, _ = problem()
    with pytest.raises(ValueError, match=r"chunk_steps=6 must be a multiple of log_every=4"):
        scanfit.fit(loss, P0, OPT, data, log_every=4, chunk_steps=6, progress=False)


def test_sweep_checks_the_evaluation_arguments():
    data, eval_data = problem()
    with pytest.raises(ValueError, match=r"names metric 'acc'"):
        scanfit.sweep(loss, P0, lambda lr: optax.adam(lr), data, {"lr": [0.1, 0.2]},
                      eval_fn=eval_fn, eval_data=eval_data, best=("acc", "max"))  # fmt: skip


def test_layout_puts_evaluations_at_the_runs_multiples_of_every():
    total, every = 23, 5
    for chunk in (1, 3, 5, 7, 23):
        ends = []
        for start in range(0, total, chunk):
            count = min(chunk, total - start)
            lay = _eval.layout(start, count, every, total)
            assert lay.head + lay.n_full * lay.every + lay.tail == count
            pos = start + lay.head
            ends += [pos] if lay.head_eval else []
            ends += [pos + every * (j + 1) for j in range(lay.n_full)]
            ends += [start + count] if lay.tail_eval else []
        assert ends == [5, 10, 15, 20, 23]


def _same_results(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("log_every", [None, 2])
def test_fit_resumes_evaluation_bitwise_and_a_stopped_run_stays_stopped(tmp_path, log_every):
    data, eval_data = problem()
    kw = dict(epochs=4, eval_fn=eval_fn, eval_data=eval_data, eval_every=5,
              best=("val_loss", "min"), patience=2, log_every=log_every, chunk_steps=6,
              progress=False)  # fmt: skip
    want = scanfit.fit(loss, P0, OPT, data, **kw)
    assert 0 < int(want.stopped_at) < 80  # the run stops early
    # Interrupted after two chunks (before the stop), then resumed from the checkpoint.
    scanfit.fit(loss, P0, OPT, data, checkpoint_dir=tmp_path, on_chunk=lambda i: i.step < 12,
                **kw)  # fmt: skip
    resumed = scanfit.fit(loss, P0, OPT, data, checkpoint_dir=tmp_path, **kw)
    _same_results(resumed, want)
    assert resumed.best_step == want.best_step
    # The stopped run, resumed again: no chunk runs, the same result comes back.
    chunks = []
    again = scanfit.fit(loss, P0, OPT, data, checkpoint_dir=tmp_path,
                        on_chunk=chunks.append, **kw)  # fmt: skip
    assert chunks == []
    _same_results(again, want)


def test_a_checkpoint_of_other_evaluation_settings_is_another_run(tmp_path):
    data, eval_data = problem()
    kw = dict(eval_fn=eval_fn, eval_data=eval_data, best=("val_loss", "min"), progress=False)
    scanfit.fit(loss, P0, OPT, data, checkpoint_dir=tmp_path, eval_every=5, **kw)
    with pytest.raises(scanfit.CheckpointMismatchError, match="eval_settings"):
        scanfit.fit(loss, P0, OPT, data, checkpoint_dir=tmp_path, eval_every=4, **kw)
    other = jax.tree.map(lambda a: a + 1, eval_data)
    with pytest.raises(scanfit.CheckpointMismatchError, match="eval_data"):
        scanfit.fit(loss, P0, OPT, data, checkpoint_dir=tmp_path, eval_every=5,
                    **{**kw, "eval_data": other})  # fmt: skip
