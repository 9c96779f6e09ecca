"""The CLI's built-in models: initialisation, loss and evaluation, all pure."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

MODELS = ("scalar", "linear", "mlp")
TASKS = ("regression", "classification")


class Model(NamedTuple):
    init: Callable[[jax.Array], dict]  # key -> params
    loss: Callable[[dict, tuple], jax.Array]  # (params, (x, y)) -> scalar
    metric: Callable[[dict, jax.Array, jax.Array], jax.Array]  # validation: mse or accuracy
    metric_name: str


def _forward(params: dict, x: jax.Array) -> jax.Array:
    h = x
    layers = params["layers"]
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


def build(name: str, task: str, features: int, outputs: int, hidden: Sequence[int]) -> Model:
    """``outputs`` is the number of classes for classification, 1 for regression."""
    if name == "scalar":
        # The seed exercise: y ~ w * x, loss sum((w*x - y)**2) over the batch.
        def loss(params, batch):
            x, y = batch
            return jnp.sum((params["w"] * x[..., 0] - y) ** 2)

        def mse(params, x, y):
            return jnp.mean((params["w"] * x[..., 0] - y) ** 2)

        return Model(lambda key: {"w": jnp.zeros((), jnp.float32)}, loss, mse, "val_mse")

    sizes = [features, *(hidden if name == "mlp" else ()), outputs]

    def init(key):
        keys = jax.random.split(key, len(sizes) - 1)
        return {
            "layers": [
                (jax.random.normal(k, (m, n), jnp.float32) * jnp.sqrt(2.0 / m), jnp.zeros(n))
                for k, m, n in zip(keys, sizes[:-1], sizes[1:])
            ]
        }

    if task == "classification":

        def loss(params, batch):
            x, y = batch
            logits = _forward(params, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def accuracy(params, x, y):
            return jnp.mean(jnp.argmax(_forward(params, x), axis=-1) == y)

        return Model(init, loss, accuracy, "val_accuracy")

    def loss(params, batch):
        x, y = batch
        return jnp.mean((_forward(params, x)[..., 0] - y) ** 2)

    def mse(params, x, y):
        return jnp.mean((_forward(params, x)[..., 0] - y) ** 2)

    return Model(init, loss, mse, "val_mse")
