"""A small GAN with two optimizers and an EMA of the generator, as one scanfit step.

    python examples/gan_ema.py [--quick]

The data: 2-D points from a ring of 8 Gaussians (the classic mode-collapse
toy). Each step updates the discriminator (``optax.adam``), then the generator
(its own ``optax.adam``), then the exponential moving average of the
generator's params that is used for sampling: two losses, two optimizer states
and an average, none of which fits ``loss_fn + optimizer``, so the whole step
goes to ``scanfit.fit_steps`` as ``step(state, batch, rng) -> (state,
metrics)``; step ``t`` draws its noise from ``fold_in(rng, t)``. An in-graph
evaluation every few hundred steps measures how far the EMA generator's samples
land from the nearest mode, and how many modes they cover.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scanfit

MODES = 8
RADIUS, SPREAD = 2.0, 0.02
NOISE, HIDDEN, BATCH = 8, 64, 128
EMA_DECAY = 0.99
EVAL_SAMPLES = 1024
CLOSE = 10 * SPREAD  # a sample this near a centre counts for its mode


def mode_centres() -> jax.Array:
    angles = 2 * jnp.pi * jnp.arange(MODES) / MODES
    return RADIUS * jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)  # (MODES, 2)


def real_batches(key: jax.Array, steps: int) -> np.ndarray:
    """``steps`` batches of ring points, shape (steps, BATCH, 2), float32."""
    k_mode, k_noise = jax.random.split(key)
    modes = jax.random.randint(k_mode, (steps, BATCH), 0, MODES)
    noise = SPREAD * jax.random.normal(k_noise, (steps, BATCH, 2))
    return np.asarray(mode_centres()[modes] + noise, np.float32)


def mlp_init(key: jax.Array, sizes: list[int]) -> list[tuple[jax.Array, jax.Array]]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) * jnp.sqrt(1.0 / m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def mlp(params, x: jax.Array) -> jax.Array:
    for w, b in params[:-1]:
        x = jax.nn.leaky_relu(x @ w + b, 0.2)
    w, b = params[-1]
    return x @ w + b


class GANState(NamedTuple):
    generator: Any  # list of (w, b): noise (NOISE,) -> point (2,)
    discriminator: Any  # list of (w, b): point (2,) -> logit ()
    g_opt: Any  # optax state of the generator's optimizer
    d_opt: Any  # optax state of the discriminator's optimizer
    ema: Any  # EMA of ``generator``, the params used for sampling


def make_gan(lr: float = 1e-3):
    """``(init, step, evaluate)`` of the GAN; ``step`` is a scanfit step with ``rng=``."""
    g_tx, d_tx = optax.adam(lr, b1=0.5), optax.adam(lr, b1=0.5)

    def init(key: jax.Array) -> GANState:
        kg, kd = jax.random.split(key)
        g = mlp_init(kg, [NOISE, HIDDEN, HIDDEN, 2])
        d = mlp_init(kd, [2, HIDDEN, HIDDEN, 1])
        return GANState(g, d, g_tx.init(g), d_tx.init(d), g)

    def d_loss(d, g, real, z):
        fake = mlp(g, z)
        logits = jnp.concatenate([mlp(d, real), mlp(d, fake)])[:, 0]
        labels = jnp.concatenate([jnp.ones(len(real)), jnp.zeros(len(fake))])
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    def g_loss(g, d, z):  # the non-saturating generator loss
        logits = mlp(d, mlp(g, z))[:, 0]
        return optax.sigmoid_binary_cross_entropy(logits, jnp.ones(len(z))).mean()

    def step(state: GANState, real: jax.Array, rng: jax.Array):
        kd, kg = jax.random.split(rng)
        z = jax.random.normal(kd, (len(real), NOISE))
        dl, grads = jax.value_and_grad(d_loss)(state.discriminator, state.generator, real, z)
        updates, d_opt = d_tx.update(grads, state.d_opt, state.discriminator)
        d = optax.apply_updates(state.discriminator, updates)
        z = jax.random.normal(kg, (len(real), NOISE))
        gl, grads = jax.value_and_grad(g_loss)(state.generator, d, z)
        updates, g_opt = g_tx.update(grads, state.g_opt, state.generator)
        g = optax.apply_updates(state.generator, updates)
        ema = optax.incremental_update(g, state.ema, step_size=1 - EMA_DECAY)
        return GANState(g, d, g_opt, d_opt, ema), {"d_loss": dl, "g_loss": gl}

    def evaluate(state: GANState, unused) -> dict:
        """EMA samples' mean distance to the nearest mode, and the modes that hold >= 2%
        of them within CLOSE (a collapsed generator covers few)."""
        z = jax.random.normal(jax.random.PRNGKey(0), (EVAL_SAMPLES, NOISE))
        dist = jnp.linalg.norm(mlp(state.ema, z)[:, None] - mode_centres()[None], axis=-1)
        share = jnp.mean(dist < CLOSE, axis=0)  # (MODES,)
        return {
            "distance": dist.min(-1).mean(),
            "modes": jnp.sum(share >= 0.02).astype(jnp.float32),
        }

    return init, step, evaluate


def main(quick: bool = False) -> dict:
    steps = 600 if quick else 6000
    init, step, evaluate = make_gan()
    state = init(jax.random.PRNGKey(0))
    before = {k: float(v) for k, v in jax.jit(evaluate)(state, None).items()}
    res = scanfit.fit_steps(
        step,
        state,
        real_batches(jax.random.PRNGKey(1), steps),
        rng=jax.random.PRNGKey(2),
        eval_fn=evaluate,
        eval_every=steps // 6,
        best=("distance", "min"),
        chunk_steps=steps // 3,
        progress=False,
    )
    after = {k: float(v[-1]) for k, v in res.evals.items() if k != "step"}
    out = {
        "steps": steps,
        "before": before,
        "after": after,
        "best_step": int(res.best_step),
        "d_loss": np.asarray(res.metrics["d_loss"]),
        "g_loss": np.asarray(res.metrics["g_loss"]),
        "state": res.state,
    }
    print(
        f"{steps} steps: EMA samples' distance to the nearest mode "
        f"{before['distance']:.3f} -> {after['distance']:.3f}, "
        f"modes covered {before['modes']:.0f} -> {after['modes']:.0f} of {MODES}"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for the tests")
    main(parser.parse_args().quick)
