"""Canonical convolutions (issue 12): same numbers, canonical layout, XLA keeps it.

Each conv model is trained three ways on fresh data: by ``scan_train`` (the
rewrite on), by the same program compiled without the rewrite, and by a Python
loop of jitted steps (XLA canonicalizes convolutions outside loops itself).
float64, so the three may differ only by rounding: 1e-10 relative.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.extend import core as jcore

import scanfit
from scanfit import _conv, _loop

B, STEPS = 4, 3
SIZES = {"N": B, "C": 4, "H": 6, "W": 5, "D": 4}  # input
KERNEL = {"O": 8, "H": 3, "W": 2, "D": 2}


class Conv(dict):
    """One convolution layer's settings: specs (lhs, rhs, out) plus lax keyword arguments."""

    def __init__(self, specs, **kw):
        super().__init__({"window_strides": (1,) * (len(specs[0]) - 2), "padding": "SAME", **kw})
        self.specs = specs

    def __call__(self, x, w):
        return lax.conv_general_dilated(x, w, dimension_numbers=self.specs, **self)


CASES = {
    "nhwc_same": Conv(("NHWC", "HWIO", "NHWC")),
    "nchw_valid": Conv(("NCHW", "OIHW", "NCHW"), padding="VALID"),
    "nchw_strided": Conv(("NCHW", "OIHW", "NCHW"), window_strides=(2, 1)),
    "nhwc_dilated": Conv(("NHWC", "HWIO", "NHWC"), padding="VALID", rhs_dilation=(2, 1)),
    "nchw_depthwise": Conv(("NCHW", "OIHW", "NCHW"), feature_group_count=4),
    "nhwc_grouped_strided": Conv(
        ("NHWC", "HWIO", "NHWC"), feature_group_count=2, window_strides=(2, 2)
    ),
    "nchw_transposed": Conv(
        ("NCHW", "OIHW", "NCHW"), padding=((2, 1), (1, 1)), lhs_dilation=(2, 1)
    ),
    "mixed_layouts": Conv(("HNCW", "IWOH", "WCHN"), window_strides=(1, 2)),
    "ncw_1d": Conv(("NCH", "OIH", "NCH"), padding=((1, 2),), window_strides=(2,)),
    "nwc_1d_dilated": Conv(("NHC", "HIO", "NHC"), rhs_dilation=(2,)),
    "ncdhw_3d": Conv(("NCDHW", "OIDHW", "NCDHW"), padding="VALID"),
}


def make_problem(conv: Conv, dtype=jnp.float64, seed=0):
    """Params, a loss of one conv layer and a linear read-out, and STEPS microbatches."""
    lhs, rhs, out = conv.specs
    kernel = {**KERNEL, "I": SIZES["C"] // conv.get("feature_group_count", 1)}
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(STEPS, *(SIZES[c] for c in lhs)))
    w = rng.normal(size=tuple(kernel[c] for c in rhs)) / 3
    feats = jax.eval_shape(conv, x[0], w).size // B
    params = {"w": w, "v": rng.normal(size=(feats,)) / feats}
    y = rng.normal(size=(STEPS, B))
    params, data = jax.tree.map(lambda a: jnp.asarray(a, dtype), (params, (x, y)))

    def loss(p, batch):
        x, y = batch
        features = jnp.moveaxis(jnp.tanh(conv(x, p["w"])), out.index("N"), 0).reshape(B, -1)
        return jnp.mean((features @ p["v"] - y) ** 2)

    return params, data, loss


def conv_dimension_numbers(closed: jcore.ClosedJaxpr) -> list:
    """The dimension numbers of every convolution in ``closed``, at any depth."""
    found, todo = [], [closed.jaxpr]
    while todo:
        jaxpr = todo.pop()
        for eqn in jaxpr.eqns:
            if eqn.primitive is lax.conv_general_dilated_p:
                found.append(eqn.params["dimension_numbers"])
        todo.extend(jcore.subjaxprs(jaxpr))
    return found


def unrewritten(loss, optimizer):
    """scan_train's program compiled without the rewrite."""
    settings = dict(epochs=1, accumulate=1, has_aux=False, unroll=1, skip_nonfinite=False)
    return jax.jit(lambda p, d: _loop.train(loss, p, optimizer, d, None, None, **settings))


def python_loop(loss, optimizer, params, data):
    @jax.jit
    def step(p, o, batch):
        grads = jax.grad(loss)(p, batch)
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    opt_state = optimizer.init(params)
    for i in range(STEPS):
        params, opt_state = step(params, opt_state, jax.tree.map(lambda a, i=i: a[i], data))
    return params


def assert_close(actual, desired, rtol=1e-10):
    jax.tree.map(lambda a, d: np.testing.assert_allclose(a, d, rtol=rtol, atol=0), actual, desired)


@pytest.mark.parametrize("case", CASES)
def test_scan_train_equals_unrewritten_and_python_loop(case, x64):
    params, data, loss = make_problem(CASES[case])
    opt = optax.adam(1e-2)
    res = scanfit.scan_train(loss, params, opt, data)
    plain = unrewritten(loss, opt)(params, data)
    assert_close(res.params, plain.params)
    assert_close(res.losses, plain.losses)
    assert_close(res.params, python_loop(loss, opt, params, data))
    assert not np.array_equal(res.params["w"], params["w"])  # it trained

    # The rewrite did happen: every conv scan_train runs is canonical, and some were not.
    rewritten = jax.make_jaxpr(lambda p: scanfit.scan_train(loss, p, opt, data))(params)
    original = jax.make_jaxpr(unrewritten(loss, opt))(params, data)
    assert {_conv._is_canonical(d) for d in conv_dimension_numbers(rewritten)} == {True}
    assert not all(_conv._is_canonical(d) for d in conv_dimension_numbers(original))


@pytest.mark.parametrize(
    "specs, preferred",
    [
        (("NCHW", "OIHW", "NCHW"), None),
        (("NWHC", "OHWI", "CNWH"), None),
        (("NCHW", "OIHW", "NCHW"), jnp.float32),
    ],
)
@pytest.mark.parametrize("groups", [(1, 1), (2, 1), (1, 2)], ids=["plain", "feature", "batch"])
def test_op_rewrite_is_exact(specs, preferred, groups):
    """Each parameter carried through: bitwise equal to XLA's own canonicalization."""
    feature_groups, batch_groups = groups
    sizes = {"N": 4, "C": 4, "H": 7, "W": 6}
    kernel = {"O": 4, "I": 4 // feature_groups, "H": 3, "W": 2}
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=[sizes[c] for c in specs[0]]), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=[kernel[c] for c in specs[1]]), jnp.bfloat16)
    conv = functools.partial(
        lax.conv_general_dilated,
        window_strides=(2, 1),
        padding=((1, 0), (2, 1)),
        lhs_dilation=(1, 2),
        rhs_dilation=(2, 1),
        dimension_numbers=specs,
        feature_group_count=feature_groups,
        batch_group_count=batch_groups,
        preferred_element_type=preferred,
    )
    expected = jax.jit(conv)(x, w)
    got = jax.jit(_conv.canonical_convs(conv, platform="cpu"))(x, w)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


def test_vmapped_sweep_equals_single_runs(x64):
    params, data, loss = make_problem(CASES["nchw_strided"])
    lrs = [1e-2, 3e-2]
    res = scanfit.sweep(loss, params, lambda lr: optax.adam(lr), data, {"lr": lrs})
    for i, lr in enumerate(lrs):
        single = scanfit.scan_train(loss, params, optax.adam(lr), data)
        assert_close(jax.tree.map(lambda a, i=i: a[i], res.params), single.params)
    closed = jax.make_jaxpr(
        lambda p: scanfit.sweep(loss, p, lambda lr: optax.adam(lr), data, {"lr": lrs})
    )(params)
    assert {_conv._is_canonical(d) for d in conv_dimension_numbers(closed)} == {True}


def hlo_conv_labels(compiled_text: str) -> list[str]:
    return re.findall(r" convolution\(.*?dim_labels=([^,\s]+)", compiled_text)


@pytest.mark.parametrize(
    "case, canonical", [("nchw_strided", "b01f_01io->b01f"), ("ncw_1d", "b0f_0io->b0f")]
)
def test_compiled_loop_body_keeps_canonical_convolutions(case, canonical):
    """XLA's transpose folding must not turn them back (jax-ml/jax#12868)."""
    params, data, loss = make_problem(CASES[case], dtype=jnp.float32)
    opt = optax.adam(1e-2)
    program = jax.jit(lambda p, d: scanfit.scan_train(loss, p, opt, d))
    text = program.lower(params, data).compile().as_text()
    assert re.search(r" while\(", text), "the updates should run in a while loop"
    labels = hlo_conv_labels(text)
    assert len(labels) == 2, labels  # forward and kernel gradient (data has none)
    assert set(labels) == {canonical}, labels
    # Control: without the rewrite XLA leaves some non-canonical. If this fails, XLA:CPU
    # canonicalizes loop-body convs itself now, and the rewrite may no longer be needed.
    plain = unrewritten(loss, opt).lower(params, data).compile().as_text()
    assert set(hlo_conv_labels(plain)) - {canonical}


def test_fit_rewrites_and_recompiles_nothing(compilations):
    params, data, loss = make_problem(CASES["nchw_valid"], dtype=jnp.float32)
    opt = optax.adam(1e-2)
    first = scanfit.fit(loss, params, opt, data, progress=False, nan_policy="ignore")
    before = compilations()
    again = scanfit.fit(loss, params, opt, data, progress=False, nan_policy="ignore")
    assert compilations() == before
    np.testing.assert_array_equal(first.losses, again.losses)
    ref = scanfit.scan_train(loss, params, opt, data)
    assert_close(first.params, ref.params, rtol=1e-6)


def test_scan_train_compiles_once(compilations):
    params, data, loss = make_problem(CASES["nchw_depthwise"], dtype=jnp.float32)
    opt = optax.sgd(1e-2)
    other = jax.tree.map(lambda a: a + 1, params)
    scanfit.scan_train(loss, params, opt, data)
    before = compilations()
    scanfit.scan_train(loss, other, opt, data)
    assert compilations() == before


def test_only_cpu_is_rewritten(monkeypatch):
    conv = CASES["nchw_valid"]
    x, w = jnp.ones((2, 4, 6, 5)), jnp.ones((6, 4, 3, 2))
    plain = str(jax.make_jaxpr(conv)(x, w))
    on_cpu = str(jax.make_jaxpr(_conv.canonical_convs(conv, platform="cpu"))(x, w))
    assert "transpose" in on_cpu and "transpose" not in plain
    assert str(jax.make_jaxpr(_conv.canonical_convs(conv, platform="gpu"))(x, w)) == plain
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert str(jax.make_jaxpr(_conv.canonical_convs(conv))(x, w)) == plain


def test_pytrees_static_args_and_sub_jaxprs_pass_through():
    """Non-array arguments stay Python objects; cond, remat and custom_jvp bodies are reached."""
    conv = CASES["nchw_valid"]

    @jax.custom_jvp
    def act(y):
        return jnp.tanh(y)

    act.defjvp(lambda primals, tangents: (act(*primals), tangents[0] / jnp.cosh(*primals) ** 2))

    def fn(tree, pred, *, scale):
        x, w = tree["x"], tree["w"]
        remat = jax.checkpoint(lambda w: act(conv(x, w)))
        y = lax.cond(pred, lambda: remat(w), lambda: conv(x, w))
        return {"y": y * scale, "none": None, "scale": scale}

    tree = {"x": jnp.ones((2, 4, 6, 5)), "w": jnp.ones((6, 4, 3, 2)) / 10}
    rewritten = _conv.canonical_convs(fn, platform="cpu")
    got = jax.jit(rewritten, static_argnames="scale")(tree, True, scale=2.0)
    assert got["none"] is None and float(got["scale"]) == 2.0
    np.testing.assert_allclose(got["y"], fn(tree, True, scale=2.0)["y"], rtol=1e-6)
    closed = jax.make_jaxpr(functools.partial(rewritten, scale=2.0))(tree, True)
    dims = conv_dimension_numbers(closed)
    assert len(dims) == 2 and all(_conv._is_canonical(d) for d in dims), dims
