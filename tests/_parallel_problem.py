"""A small regression problem shared by the sharding tests and the two-process worker."""

import jax.numpy as jnp
import numpy as np


def problem(n=24, batch=16, features=6):
    rng = np.random.default_rng(99)
    x = rng.normal(size=(n, batch, features)).astype(np.float32)
    y = (x @ rng.normal(size=(features,)) + 0.1 * rng.normal(size=(n, batch))).astype(np.float32)
    params = {"w": np.zeros(features, np.float32), "b": np.zeros((), np.float32)}

    def loss(p, b):
        xb, yb = b
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    return loss, params, (x, y)
