"""The XLA:CPU compile options of scanfit's loop programs (``scanfit._xla_cpu``).

The stall they avoid (a vmapped program idle in ``block_until_ready``) is
guarded by running vmapped loops in a child process under a timeout: a stall
fails the test instead of hanging the suite.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanfit import _xla_cpu


def test_cpu_options_are_the_scheduler_flag_on_cpu_and_nothing_elsewhere():
    assert _xla_cpu.cpu_options("cpu") == {"xla_cpu_enable_concurrency_optimized_scheduler": False}
    assert _xla_cpu.cpu_options("gpu") == {} and _xla_cpu.cpu_options("tpu") == {}
    assert _xla_cpu.cpu_options() == _xla_cpu.cpu_options(jax.default_backend())
    options = _xla_cpu.cpu_options("cpu")
    options.clear()  # a copy: the caller may change it
    assert _xla_cpu.OPTIONS


def test_the_option_names_a_real_compile_option():
    # XLA refuses unknown names, so a program that compiles with OPTIONS has them set.
    def f(x):
        return jnp.cumsum(x) * 2

    x = jnp.arange(5.0)
    jax.jit(f).lower(x).compile(_xla_cpu.OPTIONS)
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(f).lower(x).compile({"xla_cpu_no_such_option_here": False})


def test_jit_equals_jax_jit_with_static_and_donated_arguments():
    def body(w, xs, *, scale):
        def step(w, x):
            w = w - scale * jnp.tanh(w @ x) * x
            return w, jnp.sum(w * w)

        return jax.lax.scan(step, w, xs)

    rng = np.random.default_rng(0)
    w, xs = rng.normal(size=3).astype(np.float32), rng.normal(size=(40, 3)).astype(np.float32)
    ours = _xla_cpu.jit(body, static_argnames="scale", donate_argnames="w")
    theirs = jax.jit(body, static_argnames="scale", donate_argnames="w")
    got, want = ours(jnp.asarray(w), xs, scale=0.1), theirs(jnp.asarray(w), xs, scale=0.1)
    jax.tree.map(np.testing.assert_array_equal, got, want)  # the same program, bitwise
    assert ours.lower(w, xs, scale=0.1).as_text() == theirs.lower(w, xs, scale=0.1).as_text()
    assert ours.__wrapped__ is body and ours.__name__ == "body"
    assert ours._cache_size() == 1  # jax.jit's other attributes pass through


def test_jit_refuses_compiler_options():
    with pytest.raises(TypeError, match="sets compiler_options itself.*got compiler_options"):
        _xla_cpu.jit(lambda x: x, compiler_options={"xla_cpu_use_thunk_runtime": True})


def run_child(code: str, timeout: float) -> str:
    """Runs ``code`` in a fresh Python; a stall becomes a test failure after ``timeout`` s."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the program did not finish in {timeout} s (an XLA:CPU stall?)")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_sweep_of_vmapped_loops_runs_to_completion_in_a_child_process():
    out = run_child(
        """
        import jax, jax.numpy as jnp, numpy as np, optax, scanfit

        rng = np.random.default_rng(0)
        x = rng.normal(size=(50, 16, 4)).astype(np.float32)
        y = (x @ rng.normal(size=4)).astype(np.float32)

        def loss(p, batch):
            xb, yb = batch
            return jnp.mean((jnp.tanh(xb @ p["w"]) @ p["v"] - yb) ** 2)

        params = {"w": np.eye(4, dtype=np.float32), "v": np.ones(4, np.float32)}
        res = scanfit.sweep(
            loss, params, lambda lr: optax.adam(lr), (x, y), scanfit.grid(lr=[1e-3, 1e-2]),
            seeds=None, epochs=3, key=jax.random.key(0),
        )
        jax.block_until_ready(res.losses)
        print("done", res.losses.shape)
        """,
        timeout=240,
    )
    assert "done (2, 150)" in out


def test_jit_inside_another_jit_or_vmap_is_the_same_program():
    # JAX refuses compiler_options on a jit staged into another: there it is plain.
    def f(x):
        return jax.lax.fori_loop(0, 3, lambda i, x: jnp.sin(x) + i, x)

    x = jnp.linspace(0.0, 1.0, 8).reshape(2, 4)
    ours = _xla_cpu.jit(f)
    want = jax.jit(f)(x)
    np.testing.assert_array_equal(jax.jit(ours)(x), want)
    np.testing.assert_array_equal(jax.jit(jax.vmap(ours))(x), jax.jit(jax.vmap(f))(x))
    np.testing.assert_array_equal(jax.vmap(ours)(x), jax.jit(jax.vmap(f))(x))  # top level
    np.testing.assert_array_equal(jax.lax.map(ours, x), jax.lax.map(jax.jit(f), x))
