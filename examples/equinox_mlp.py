"""An Equinox model trained through scanfit.fit: split it, train the arrays, recombine.

    python examples/equinox_mlp.py [--quick]

``eqx.partition`` separates the trainable arrays (a pytree scanfit can carry)
from the static rest; the loss recombines them with ``eqx.combine``.
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import scanfit


def make_data(n: int, batch: int = 32):
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(n, batch, 1)).astype(np.float32)
    return x, np.sin(2 * x).astype(np.float32)  # learn sin(2x) on [-2, 2]


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
        chunk_steps=500,
        progress=False,
    )
    trained = eqx.combine(res.params, static)
    grid = jnp.linspace(-2, 2, 101)[:, None]
    fit_error = float(jnp.max(jnp.abs(jax.vmap(trained)(grid) - jnp.sin(2 * grid))))
    losses = np.asarray(res.losses)
    out = {
        "first_loss": float(losses[:50].mean()),
        "final_loss": float(losses[-50:].mean()),
        "max_abs_error": fit_error,
        "model": trained,
    }
    print(
        f"equinox MLP: loss {out['first_loss']:.4f} -> {out['final_loss']:.5f}, "
        f"max |model(x) - sin(2x)| on [-2, 2]: {fit_error:.3f}"
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    main(p.parse_args().quick)
