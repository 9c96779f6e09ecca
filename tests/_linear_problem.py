"""A tiny linear regression shared by the checkpoint-adjacent tests (saves, load, trackers)."""

import jax.numpy as jnp
import numpy as np

B, D = 4, 3


def mse(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def problem(seed: int = 0, n: int = 12):
    """(params, data): random initial weights, ``n`` microbatches of ``B`` rows of ``D``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, B, D)).astype(np.float32)
    y = (x @ rng.normal(size=D) + 0.3).astype(np.float32)
    return {"w": rng.normal(size=D).astype(np.float32), "b": np.zeros((), np.float32)}, (x, y)
