"""An MLP on scikit-learn's bundled digits (8x8 images, 10 classes), trained with scanfit.fit.

    python examples/digits_mlp.py [--quick]
    python examples/digits_mlp.py --save-npz digits.npz   # write the data file, then exit
    scanfit train --data digits.npz --model mlp

The data ships with scikit-learn: nothing is downloaded. Training rows are
standardised with their own mean and standard deviation, cut into microbatches
of 32 (data shape (N, 32, 64)) and visited in a new order each epoch
(``key=``); 20% of the rows are held out for the validation accuracy.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scanfit

BATCH = 32


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """x: float32 (1797, 64) pixel intensities 0..16; y: int32 (1797,) labels 0..9."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    return digits.data.astype(np.float32), digits.target.astype(np.int32)


def save_digits_npz(path: str | os.PathLike) -> None:
    """Writes the digits as an .npz with ``x`` (float32, (1797, 64)) and ``y`` (int32, (1797,)).

    This is the file format ``scanfit train --data`` reads (it shuffles the rows and holds out
    validation rows itself; it does not rescale features).
    """
    x, y = load_digits()
    np.savez(path, x=x, y=y)


def split_and_standardise(x, y, val_fraction: float = 0.2, seed: int = 0):
    """Shuffled train/validation split; both standardised with the training rows' statistics."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(val_fraction * len(x)))
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(0), x[train].std(0)
    std = np.where(std > 0, std, 1.0)  # a few border pixels are always 0
    scale = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return (scale(x[train]), y[train]), (scale(x[val]), y[val])


def microbatches(x, y, batch: int = BATCH):
    """(rows, 64), (rows,) -> (N, batch, 64), (N, batch); the last rows that do not fill one
    microbatch are dropped (the shuffled epochs of ``fit`` reorder microbatches, not rows)."""
    n = len(x) // batch
    return x[: n * batch].reshape(n, batch, -1), y[: n * batch].reshape(n, batch)


def init_mlp(key: jax.Array, sizes=(64, 128, 10)) -> list:
    """He-initialised weights and zero biases, as a list of (w, b) pairs: a plain pytree."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def logits(params: list, x: jax.Array) -> jax.Array:
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def loss_fn(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def accuracy(params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(logits(params, x), -1) == y))


def main(quick: bool = False) -> dict:
    (xt, yt), (xv, yv) = split_and_standardise(*load_digits())
    data = microbatches(xt, yt)
    n = len(data[0])
    epochs = 5 if quick else 40
    params = init_mlp(jax.random.key(0))
    res = scanfit.fit(
        loss_fn,
        params,
        optax.adam(1e-3),
        data,
        epochs=epochs,
        key=jax.random.key(1),  # a new microbatch order each epoch
        progress=False,
    )
    losses = np.asarray(res.losses)
    out = {
        "epochs": epochs,
        "updates": len(losses),
        "first_loss": float(losses[:n].mean()),  # mean over the first epoch
        "final_loss": float(losses[-n:].mean()),  # mean over the last epoch
        "initial_val_accuracy": accuracy(params, xv, yv),
        "val_accuracy": accuracy(res.params, xv, yv),
        "train_accuracy": accuracy(res.params, xt, yt),
    }
    print(
        f"digits MLP: {n} microbatches of {BATCH}, {epochs} epochs, {out['updates']} updates; "
        f"training loss {out['first_loss']:.3f} -> {out['final_loss']:.4f}; "
        f"validation accuracy {out['val_accuracy']:.3f} ({len(yv)} held-out images)"
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few epochs (a smoke test)")
    p.add_argument("--save-npz", metavar="PATH", help="write the digits to PATH and exit")
    args = p.parse_args()
    if args.save_npz:
        save_digits_npz(args.save_npz)
        print(f"wrote {args.save_npz}: x float32 (1797, 64), y int32 (1797,)")
    else:
        main(quick=args.quick)
