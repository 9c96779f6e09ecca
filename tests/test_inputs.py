"""Bad inputs are clear errors naming the argument, raised before tracing; NumPy integers
work wherever ints do; non-finite eval metrics are a warning naming the evaluation."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scanfit

M, B, D = 6, 8, 3
rng = np.random.default_rng(0)
X = rng.normal(size=(M, B, D)).astype(np.float32)
Y = (X @ rng.normal(size=(D,))).astype(np.float32)
PARAMS = {"w": np.zeros(D, np.float32)}
OPT = optax.sgd(0.1)


def loss(p, batch):
    xb, yb = batch
    return jnp.mean((xb @ p["w"] - yb) ** 2)


def evaluate(p, batch):
    return {"val": loss(p, batch)}


def run(train, data=(X, Y), **kw):
    if train == "fit":
        kw = {"progress": False, **kw}
        if data == "stream":
            data, kw["steps_per_epoch"] = iter(list(zip(X, Y))), M
    elif data == "stream":
        data = (X, Y)
    return getattr(scanfit, train)(loss, PARAMS, OPT, data, **kw)


def assert_same(a, b):
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.params["w"], b.params["w"])


EVAL = dict(eval_fn=evaluate, eval_data=(X[:2], Y[:2]))


@pytest.mark.parametrize("train", ["scan_train", "fit"])
def test_numpy_integers_are_taken_as_ints(train):
    ints = dict(epochs=2, accumulate=2, unroll=2, eval_every=2, log_every=1, **EVAL,
                best=("val", "min"), patience=3)  # fmt: skip
    if train == "fit":
        ints.update(chunk_steps=2)
    numpy = {k: np.int64(v) if type(v) is int else v for k, v in ints.items()}
    got, want = run(train, **numpy), run(train, **ints)
    assert_same(got, want)
    np.testing.assert_array_equal(got.metrics["val"], want.metrics["val"])


def test_a_numpy_float_is_still_refused():
    with pytest.raises(ValueError, match=r"eval_every must be an integer >= 1 .* got np"):
        run("scan_train", eval_every=np.float64(2.0), **EVAL)


def _arity(p):
    return {"val": 0.0}


BAD_EVAL = [
    ("arity", dict(eval_fn=_arity), TypeError,
     r"eval_fn failed when called as eval_fn\(params, batch\) on one eval microbatch of "
     r"eval_data \(float32\[8, 3\], float32\[8\]\): TypeError: _arity\(\) takes 1 positional"),
    ("strings", dict(eval_fn=lambda p, b: {"val": "high"}), TypeError,
     r"eval_fn failed .*not a valid JAX type"),
    ("missing leaf", dict(eval_data=(X[:2],)), ValueError,
     r"eval_fn failed .* eval_data \(float32\[8, 3\],\): ValueError: not enough values"),
    ("feature size", dict(eval_data=(X[:2, :, :2], Y[:2])), TypeError,
     r"eval_fn failed .* eval_data \(float32\[8, 2\], float32\[8\]\): TypeError: dot_general"),
    ("list of batches", dict(eval_data=[(X[0], Y[0]), (X[1], Y[1])]), TypeError,
     r"eval_data is a list of 2 eval batches \(each a tuple of length 2\); .* stack them"),
    ("no M axis", dict(eval_data=(X[0], Y[0])), ValueError,
     r"eval_data has the shapes of one batch, \(float32\[8, 3\], float32\[8\]\), like a "
     r"training microbatch .* taken as 8 eval microbatches of one example each"),
]  # fmt: skip


@pytest.mark.parametrize("train, data", [("scan_train", None), ("fit", "stream")])
@pytest.mark.parametrize("case, given, error, message", BAD_EVAL, ids=[c[0] for c in BAD_EVAL])
def test_bad_eval_inputs_name_the_argument(train, data, case, given, error, message):
    with pytest.raises(error, match=message):
        run(train, data=data or (X, Y), **{**EVAL, **given})


def test_an_eval_batch_axis_of_one_is_taken():
    one = jax_tree_expand((X[0], Y[0]))
    res = run("scan_train", eval_fn=evaluate, eval_data=one)
    np.testing.assert_allclose(res.metrics["val"], [loss(res.params, (X[0], Y[0]))], rtol=1e-6)


def jax_tree_expand(batch):
    return tuple(a[None] for a in batch)


def test_a_microbatch_of_python_lists_names_data():
    lists = [([[1.0, 2.0, 3.0]] * B, [0.0] * B)] * M
    with pytest.raises(TypeError, match=r"microbatch 0 of data: \[0\] is a Python list of "):
        scanfit.fit(loss, PARAMS, OPT, iter(lists), steps_per_epoch=M, progress=False)


@pytest.mark.parametrize("train", ["scan_train", "fit"])
def test_nan_eval_metrics_warn_and_best_stays_at_init(train):
    xe = X[:2].copy()
    xe[0, 0, 0] = np.nan
    kw = dict(eval_fn=evaluate, eval_data=(xe, Y[:2]), eval_every=2, best=("val", "min"))
    with pytest.warns(
        RuntimeWarning,
        match=r"eval metric 'val' is nan at the evaluation after update 2 \(2 of 2 evaluations "
        r"non-finite\).* best= never picks a non-finite evaluation; no evaluation improved on "
        r"the initial params, so best_params are those; patience stopped the run at update 4",
    ):
        res = run(train, patience=2, **kw)
    assert int(res.best_step) == -1 and int(res.stopped_at) == 4
    np.testing.assert_array_equal(res.best_params["w"], PARAMS["w"])


def test_metrics_skipped_after_a_stop_do_not_warn():
    # Evaluations after an early stop report NaN with step -1 by design: no warning.
    res = run("scan_train", eval_fn=evaluate, eval_data=(X[:2], Y[:2]), eval_every=1,
              best=("val", "max"), patience=1, epochs=2)  # fmt: skip
    assert int(res.stopped_at) > 0 and np.isnan(res.metrics["val"][-1])
