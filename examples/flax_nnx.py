"""A Flax NNX model trained through scanfit.fit: nnx.split, train the state, nnx.merge.

    python examples/flax_nnx.py [--quick]

``nnx.split`` gives a static graph definition and a pytree of parameters that
scanfit carries through its scan; the loss rebuilds the module with
``nnx.merge``; ``nnx.update`` writes the trained parameters back.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import scanfit


class MLP(nnx.Module):
    def __init__(self, features: int, hidden: int, classes: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def make_data(n: int, seed: int, batch: int = 32, features: int = 16, classes: int = 4):
    teacher = np.random.default_rng(0).normal(size=(features, classes))  # fixed across calls
    x = np.random.default_rng(seed).normal(size=(n, batch, features)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=-1).astype(np.int32)


def main(quick: bool = False) -> dict:
    model = MLP(16, 64, 4, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss_fn(params, batch):
        x, y = batch
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    x, y = make_data(150 if quick else 600, seed=1)
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
    xt, yt = make_data(20, seed=2)  # held-out examples from the same teacher
    accuracy = float(jnp.mean(jnp.argmax(model(jnp.asarray(xt)), -1) == yt))
    losses = np.asarray(res.losses)
    out = {
        "first_loss": float(losses[:20].mean()),
        "final_loss": float(losses[-20:].mean()),
        "accuracy": accuracy,
        "model": model,
        "params": res.params,
        "graphdef": graphdef,
    }
    print(
        f"flax NNX MLP: loss {out['first_loss']:.3f} -> {out['final_loss']:.3f}, "
        f"accuracy {accuracy:.3f}"
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    main(p.parse_args().quick)
