"""An Equinox MLP with BatchNorm and Dropout, trained by scanfit.fit in the extended form.

    python examples/equinox_mlp.py [--quick]

The module is passed as ``params`` as it is (its floating arrays are trained,
everything else is static, as ``eqx.filter_jit`` treats it), its
``eqx.nn.State`` as ``model_state=``, and a key as ``rng=``. The loss then has
the Equinox/Haiku signature ``loss_fn(model, state, batch, key) -> (loss,
new_state)``: microbatch ``m`` of the run gets ``jax.random.fold_in(rng, m)``,
whatever the chunking or resume, and the state threads through every update.
Data: scikit-learn's bundled 8x8 digits (nothing downloaded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from digits_mlp import load_digits, microbatches, split_and_standardise  # noqa: E402

import scanfit  # noqa: E402

HIDDEN, CLASSES = 128, 10


class Net(eqx.Module):
    hidden: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    out: eqx.nn.Linear

    def __init__(self, features: int, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(features, HIDDEN, use_bias=False, key=k1)
        self.bn = eqx.nn.BatchNorm(HIDDEN, axis_name="batch", mode="batch")
        self.drop = eqx.nn.Dropout(0.2)
        self.out = eqx.nn.Linear(HIDDEN, CLASSES, key=k2)

    def __call__(self, x, state, key):
        h, state = self.bn(self.hidden(x), state)
        return self.out(self.drop(jax.nn.relu(h), key=key)), state


def batched(model, x, state, key):
    """The model over a batch: BatchNorm's statistics are taken over the "batch" axis."""
    keys = jax.random.split(key, len(x))
    return jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))(
        x, state, keys
    )


def loss_fn(model: Net, state, batch, key):
    x, y = batch
    logits, state = batched(model, x, state, key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


def accuracy(model: Net, state, x, y) -> float:
    model = eqx.nn.inference_mode(model)  # running statistics, no dropout
    logits, _ = batched(model, jnp.asarray(x), state, jax.random.key(0))
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def main(quick: bool = False) -> dict:
    (xt, yt), (xv, yv) = split_and_standardise(*load_digits())
    model, state = eqx.nn.make_with_state(Net)(xt.shape[1], jax.random.key(0))
    untrained_accuracy = accuracy(model, state, xv, yv)
    epochs = 5 if quick else 30
    res = scanfit.fit(
        loss_fn,
        model,
        optax.adam(1e-3),
        microbatches(xt, yt),
        model_state=state,
        rng=jax.random.key(1),
        epochs=epochs,
        key=jax.random.key(2),
        chunk_steps=500,  # compiled chunks of 500 updates; the result does not depend on it
        progress=False,
    )
    model, state = res.params, res.model_state  # the trained module and its state
    losses = np.asarray(res.losses)
    out = {
        "updates": len(losses),
        "epochs": epochs,
        "first_loss": float(losses[:20].mean()),
        "final_loss": float(losses[-20:].mean()),
        "untrained_accuracy": untrained_accuracy,
        "val_accuracy": accuracy(model, state, xv, yv),
        "model": model,
        "state": state,
    }
    print(
        f"{out['updates']} updates: loss {out['first_loss']:.3f} -> {out['final_loss']:.3f}; "
        f"held-out accuracy {untrained_accuracy:.3f} -> {out['val_accuracy']:.3f}"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for the tests")
    main(parser.parse_args().quick)
