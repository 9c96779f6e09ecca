"""A Flax NNX model with BatchNorm and Dropout, passed to scanfit.fit as it is.

    python examples/flax_nnx.py [--quick]

The module itself is ``params``: scanfit trains its ``nnx.Param``s and carries
every other variable (BatchNorm's running statistics, the Dropout stream's RNG
counter) through the compiled loop, so BatchNorm statistics advance and dropout
draws a new mask every update, exactly as in the NNX tutorial loop
(``nnx.jit`` step with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``).
Afterwards the module holds the trained state; ``model.eval()`` switches it to
the running statistics and no dropout for evaluation. Data: scikit-learn's
bundled 8x8 digits (nothing downloaded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from digits_mlp import load_digits, microbatches, split_and_standardise  # noqa: E402

import scanfit  # noqa: E402

HIDDEN, CLASSES = 128, 10


class Net(nnx.Module):
    def __init__(self, features: int, rngs: nnx.Rngs):
        # No bias before BatchNorm: its mean subtraction cancels one.
        self.hidden = nnx.Linear(features, HIDDEN, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(HIDDEN, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.hidden(x)))))


def loss_fn(model: Net, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def accuracy(model: Net, x, y) -> float:
    model.eval()  # running statistics, no dropout
    acc = float(jnp.mean(jnp.argmax(model(jnp.asarray(x)), -1) == y))
    model.train()
    return acc


def main(quick: bool = False) -> dict:
    (xt, yt), (xv, yv) = split_and_standardise(*load_digits())
    model = Net(xt.shape[1], nnx.Rngs(params=0, dropout=1))
    untrained_accuracy = accuracy(model, xv, yv)
    epochs = 5 if quick else 30
    res = scanfit.fit(
        loss_fn,
        model,  # the module as it is: Params trained, BatchStat and RNG counts carried
        optax.adam(1e-3),
        microbatches(xt, yt),
        epochs=epochs,
        key=jax.random.key(2),  # reshuffles the microbatches every epoch
        progress=False,
    )
    losses = np.asarray(res.losses)
    out = {
        "updates": len(losses),
        "epochs": epochs,
        "first_loss": float(losses[:20].mean()),
        "final_loss": float(losses[-20:].mean()),
        "untrained_accuracy": untrained_accuracy,
        "val_accuracy": accuracy(model, xv, yv),
        "dropout_masks_drawn": int(model.drop.rngs.count[...]),
        "model": model,
        "result": res,
    }
    print(
        f"{out['updates']} updates: loss {out['first_loss']:.3f} -> {out['final_loss']:.3f}; "
        f"held-out accuracy {untrained_accuracy:.3f} -> {out['val_accuracy']:.3f}; "
        f"{out['dropout_masks_drawn']} dropout masks drawn"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for the tests")
    main(parser.parse_args().quick)
