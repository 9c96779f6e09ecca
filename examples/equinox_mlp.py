"""An Equinox model trained through scanfit.fit: split it, train the arrays, recombine.

    python examples/equinox_mlp.py [--quick]

``eqx.partition(model, eqx.is_inexact_array)`` separates the trainable
floating arrays (a pytree scanfit carries through its scan) from the static
rest (activation functions, sizes); the loss recombines them with
``eqx.combine``, and so does the caller with the trained arrays.
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import scanfit


def target(x):
    return jnp.sin(2 * x)


def make_data(n: int, batch: int = 32):
    """n microbatches of ``batch`` points x in [-2, 2] with y = sin(2x)."""
    x = np.random.default_rng(0).uniform(-2, 2, size=(n, batch, 1)).astype(np.float32)
    return x, np.sin(2 * x).astype(np.float32)


def max_abs_error(model) -> float:
    grid = jnp.linspace(-2, 2, 101)[:, None]
    return float(jnp.max(jnp.abs(jax.vmap(model)(grid) - target(grid))))


def main(quick: bool = False) -> dict:
    model = eqx.nn.MLP(
        in_size=1, out_size=1, width_size=32, depth=2, activation=jax.nn.tanh, key=jax.random.key(0)
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params, batch):
        x, y = batch
        model = eqx.combine(params, static)
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    x, y = make_data(200 if quick else 1000)
    res = scanfit.fit(
        loss_fn,
        params,
        optax.adam(3e-3),
        (x, y),
        epochs=5 if quick else 10,
        key=jax.random.key(1),
        chunk_steps=500,  # compiled chunks of 500 updates; the result does not depend on it
        progress=False,
    )
    trained = eqx.combine(res.params, static)
    losses = np.asarray(res.losses)
    out = {
        "updates": len(losses),
        "first_loss": float(losses[:50].mean()),
        "final_loss": float(losses[-50:].mean()),
        "untrained_max_abs_error": max_abs_error(model),
        "max_abs_error": max_abs_error(trained),
        "model": trained,
    }
    print(
        f"equinox MLP: {out['updates']} updates, loss {out['first_loss']:.4f} -> "
        f"{out['final_loss']:.5f}, max |model(x) - sin(2x)| on [-2, 2]: "
        f"{out['untrained_max_abs_error']:.3f} -> {out['max_abs_error']:.3f}"
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer microbatches and epochs")
    main(quick=p.parse_args().quick)
