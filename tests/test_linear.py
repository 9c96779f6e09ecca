"""scan_training_step against a float64 NumPy reference of the same recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import scanfit


def reference(w, lr, x_batches, y_batches):
    """The obvious loop, in float64: w <- w - lr * sum(2 * (w*x - y) * x)."""
    w = np.float64(w)
    for x, y in zip(np.asarray(x_batches, np.float64), np.asarray(y_batches, np.float64)):
        w = w - lr * np.sum(2.0 * (w * x - y) * x)
    return w


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    b=st.integers(1, 16),
    w0=st.floats(-2, 2),
    lr_scale=st.floats(0.01, 0.4),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_reference(n, b, w0, lr_scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, b)).astype(np.float32)
    y = (1.5 * x + 0.1 * rng.normal(size=(n, b))).astype(np.float32)
    # Well-conditioned: each step contracts, lr * 2 * sum(x**2) <= 0.8 < 1.
    lr = lr_scale / max(float(np.max(np.sum(x.astype(np.float64) ** 2, axis=1))), 1e-3)
    got = scanfit.scan_training_step(w0, lr, x, y)
    want = reference(w0, lr, x, y)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)


def test_float64_matches_reference_tightly(x64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7))
    y = -0.7 * x + 0.3 * rng.normal(size=(50, 7))
    got = scanfit.scan_training_step(0.2, 0.02, x, y)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), reference(0.2, 0.02, x, y), rtol=1e-12)


def test_converges_on_noiseless_data():
    x = jax.random.normal(jax.random.key(1), (500, 16))
    w = scanfit.scan_training_step(0.0, 0.01, x, 3.0 * x)
    np.testing.assert_allclose(float(w), 3.0, rtol=1e-5)


def test_zero_microbatches_returns_w_unchanged():
    w = scanfit.scan_training_step(1.25, 0.1, np.zeros((0, 4)), np.zeros((0, 4)))
    assert w.shape == () and float(w) == 1.25


@pytest.mark.parametrize(
    "w, lr, x, y",
    [
        (0.5, 0.01, np.ones((3, 2)), np.ones((3, 2))),  # Python floats, NumPy data
        (np.float32(0.5), np.float64(0.01), jnp.ones((3, 2)), jnp.ones((3, 2))),
        (jnp.array(0.5), jnp.array(0.01), np.ones((3, 2), np.int32), np.ones((3, 2), int)),
        (1, 0.01, [[1, 2], [3, 4]], [[2, 4], [6, 8]]),  # nested lists, integer w
    ],
)
def test_accepts_python_numpy_and_jax_inputs(w, lr, x, y):
    got = scanfit.scan_training_step(w, lr, x, y)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), reference(w, float(lr), x, y), rtol=1e-5)


def test_float64_in_float64_out_only_with_x64(x64):
    x = np.ones((2, 3), np.float64)
    assert scanfit.scan_training_step(0.0, 0.1, x, x).dtype == jnp.float64
    assert scanfit.scan_training_step(0.0, 0.1, x.astype(np.float32), x).dtype == jnp.float64
    xi = np.ones((2, 3), np.int32)
    assert scanfit.scan_training_step(0.0, 0.1, xi, xi).dtype == jnp.float64


def test_float64_data_without_x64_gives_float32():
    x = np.ones((2, 3), np.float64)
    assert scanfit.scan_training_step(0.0, 0.1, x, x).dtype == jnp.float32


def test_under_jit_with_traced_w_and_lr():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2, 20, 5)).astype(np.float32)
    got = jax.jit(scanfit.scan_training_step)(0.3, 0.01, x, y)
    np.testing.assert_allclose(float(got), reference(0.3, 0.01, x, y), rtol=1e-5)


def test_vmap_over_lr_and_w():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(2, 30, 4)).astype(np.float32)
    lrs = jnp.array([0.001, 0.01, 0.05])
    ws = jnp.array([-1.0, 0.0, 2.0])
    got = jax.vmap(scanfit.scan_training_step, in_axes=(0, 0, None, None))(ws, lrs, x, y)
    want = [reference(w, lr, x, y) for w, lr in zip(np.asarray(ws), np.asarray(lrs))]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_vmap_over_datasets():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(2, 3, 10, 4)).astype(np.float32)
    got = jax.vmap(scanfit.scan_training_step, in_axes=(None, None, 0, 0))(0.0, 0.02, x, y)
    want = [reference(0.0, 0.02, xi, yi) for xi, yi in zip(x, y)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_grad_wrt_lr_and_w_matches_finite_differences(x64):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(10, 3))
    y = 2.0 * x + 0.1 * rng.normal(size=(10, 3))
    lr, w, eps = 0.02, 0.5, 1e-6
    d_lr, d_w = jax.grad(scanfit.scan_training_step, argnums=(1, 0))(w, lr, x, y)
    fd_lr = (reference(w, lr + eps, x, y) - reference(w, lr - eps, x, y)) / (2 * eps)
    fd_w = (reference(w + eps, lr, x, y) - reference(w - eps, lr, x, y)) / (2 * eps)
    np.testing.assert_allclose(float(d_lr), fd_lr, rtol=1e-6)
    np.testing.assert_allclose(float(d_w), fd_w, rtol=1e-6)


# The seed's pitfalls, each pinned: the body must unpack the (x, y) tuple, lr is a
# captured constant (a traced lr under jit/vmap/grad works, tested above), and the
# body returns a (carry, None) 2-tuple so nothing per-step is stacked.


def test_body_sees_one_microbatch_as_an_x_y_pair():
    # If the body forgot to unpack, or indexed the pair the wrong way round, a
    # dataset whose x and y differ in scale would give a different answer.
    x = np.array([[1.0, 2.0]], np.float32)
    y = np.array([[10.0, 0.0]], np.float32)
    got = scanfit.scan_training_step(0.0, 0.1, x, y)
    assert float(got) == pytest.approx(0.0 - 0.1 * (2 * (0 - 10) * 1 + 2 * (0 - 0) * 2))


def test_returns_only_the_final_carry_not_stacked_outputs():
    x = np.ones((7, 3), np.float32)
    out = jax.eval_shape(scanfit.scan_training_step, 0.0, 0.1, x, x)
    assert out.shape == ()


def test_compiles_once_for_repeated_calls():
    x = np.ones((9, 3), np.float32)
    from scanfit._linear import _scan_sgd

    scanfit.scan_training_step(0.0, 0.1, x, x)
    before = _scan_sgd._cache_size()
    scanfit.scan_training_step(1.0, 0.2, 2 * x, x)
    assert _scan_sgd._cache_size() == before


@pytest.mark.parametrize(
    "args, error, match",
    [
        (
            (np.ones(2), 0.1, np.ones((3, 2)), np.ones((3, 2))),
            ValueError,
            r"w must be a scalar \(shape \(\)\), got an array of shape \(2,\)",
        ),
        (
            (0.0, [0.1, 0.2], np.ones((3, 2)), np.ones((3, 2))),
            ValueError,
            r"lr must be a scalar \(shape \(\)\), got an array of shape \(2,\)",
        ),
        (
            (0.0, 0.1, np.ones(6), np.ones(6)),
            ValueError,
            r"x_batches must be 2-D with shape \(N, B\).*got an array of shape \(6,\)",
        ),
        (
            (0.0, 0.1, np.ones((3, 2)), np.ones((3, 2, 1))),
            ValueError,
            r"y_batches must be 2-D with shape \(N, B\).*got an array of shape \(3, 2, 1\)",
        ),
        (
            (0.0, 0.1, np.ones((3, 2)), np.ones((3, 4))),
            ValueError,
            r"x_batches and y_batches must have the same shape \(N, B\), got "
            r"x_batches.shape=\(3, 2\) and y_batches.shape=\(3, 4\)",
        ),
        (
            (0.0, 0.1, np.ones((3, 2)), np.ones((4, 2))),
            ValueError,
            r"x_batches.shape=\(3, 2\) and y_batches.shape=\(4, 2\)",
        ),
        (
            (0.0, float("nan"), np.ones((3, 2)), np.ones((3, 2))),
            ValueError,
            r"lr must be a positive finite number, got nan",
        ),
        (
            (0.0, np.inf, np.ones((3, 2)), np.ones((3, 2))),
            ValueError,
            r"lr must be a positive finite number, got inf",
        ),
        (
            (0.0, jnp.float32(-0.5), np.ones((3, 2)), np.ones((3, 2))),
            ValueError,
            r"lr must be a positive finite number, got -0.5",
        ),
        (
            ("0.5", 0.1, np.ones((3, 2)), np.ones((3, 2))),
            TypeError,
            r"w must be a real number or an array of real numbers, got '0.5' of type str",
        ),
        (
            (0.0, 0.1, np.ones((3, 2), bool), np.ones((3, 2))),
            TypeError,
            r"x_batches must be a real number or an array of real numbers, "
            r"got an array of shape \(3, 2\) and dtype bool",
        ),
    ],
)
def test_bad_input_is_a_clear_python_error(args, error, match):
    with pytest.raises(error, match=match):
        scanfit.scan_training_step(*args)
