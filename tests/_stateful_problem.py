"""A regression problem in the extended form: a running batch mean as model state, dropout.

Shared by the loop, fit, sweep, parallel and fault tests, so every guarantee is
checked on a loss that reads and writes model state and draws randomness.
"""

import jax
import jax.numpy as jnp
import numpy as np


def problem(n=24, batch=16, features=6, dtype=np.float32, seed=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, batch, features)).astype(dtype)
    y = (x @ rng.normal(size=(features,)) + 0.1 * rng.normal(size=(n, batch))).astype(dtype)
    params = {"w": np.zeros(features, dtype), "b": np.zeros((), dtype)}
    model_state = {"mean": np.zeros(features, dtype), "count": np.zeros((), np.int32)}
    return loss, params, model_state, (x, y)


def loss(params, state, batch, rng):
    """Centres x by the batch mean (a statistic of the whole batch), drops 20% of inputs."""
    x, y = batch
    mean = jnp.mean(x, axis=0)
    keep = jax.random.bernoulli(rng, 0.8, x.shape)
    h = jnp.where(keep, (x - mean) / 0.8, 0.0).astype(x.dtype)
    err = h @ params["w"] + params["b"] - y
    new = {"mean": 0.9 * state["mean"] + 0.1 * mean, "count": state["count"] + 1}
    return jnp.mean(err**2), new


def loss_with_aux(params, state, batch, rng):
    value, new = loss(params, state, batch, rng)
    return value, (new, {"sqrt_loss": jnp.sqrt(value), "count": new["count"]})
