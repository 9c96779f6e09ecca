"""A Flax NNX model trained through scanfit.fit: nnx.split, train the state, nnx.merge.

    python examples/flax_nnx.py [--quick]

``nnx.split`` gives a static graph definition and a pytree of parameters
(an ``nnx.State``) that scanfit carries through its scan; the loss rebuilds
the module with ``nnx.merge``; ``nnx.update`` writes the trained parameters
back into the module. A module with non-trainable state (batch-norm
statistics, RNG counters) would be split as
``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``, with ``rest``
closed over by the loss, so that only floating parameters are trained.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import scanfit

FEATURES, HIDDEN, CLASSES = 16, 64, 4


class MLP(nnx.Module):
    def __init__(self, features: int, hidden: int, classes: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def make_data(n: int, seed: int, batch: int = 32):
    """n microbatches of ``batch`` points labelled by a fixed random linear teacher."""
    teacher = np.random.default_rng(0).normal(size=(FEATURES, CLASSES))  # the same every call
    x = np.random.default_rng(seed).normal(size=(n, batch, FEATURES)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=-1).astype(np.int32)


def accuracy(model, x, y) -> float:
    return float(jnp.mean(jnp.argmax(model(jnp.asarray(x)), -1) == y))


def main(quick: bool = False) -> dict:
    model = MLP(FEATURES, HIDDEN, CLASSES, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)  # static structure, trainable arrays

    def loss_fn(params, batch):
        x, y = batch
        logits = nnx.merge(graphdef, params)(x)  # a fresh module from the traced params
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    x, y = make_data(150 if quick else 600, seed=1)
    xt, yt = make_data(20, seed=2)  # 640 held-out points from the same teacher
    untrained_accuracy = accuracy(model, xt, yt)
    res = scanfit.fit(
        loss_fn,
        params,
        optax.adam(3e-3),
        (x, y),
        epochs=4 if quick else 8,
        key=jax.random.key(1),
        progress=False,
    )
    nnx.update(model, res.params)  # the module now holds the trained weights
    losses = np.asarray(res.losses)
    out = {
        "updates": len(losses),
        "first_loss": float(losses[:20].mean()),
        "final_loss": float(losses[-20:].mean()),
        "untrained_accuracy": untrained_accuracy,
        "accuracy": accuracy(model, xt, yt),
        "model": model,
        "graphdef": graphdef,
        "params": res.params,
    }
    print(
        f"flax NNX MLP: {out['updates']} updates, loss {out['first_loss']:.3f} -> "
        f"{out['final_loss']:.3f}, held-out accuracy {untrained_accuracy:.3f} -> "
        f"{out['accuracy']:.3f}"
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer microbatches and epochs")
    main(quick=p.parse_args().quick)
