"""An MLP on scikit-learn's bundled digits (8x8 images, 10 classes), trained with scanfit.fit.

    python examples/digits_mlp.py [--quick]

The data ships with scikit-learn: nothing is downloaded. ``save_digits_npz``
writes the same data as an .npz for the command line:

    python -c "from examples.digits_mlp import save_digits_npz; save_digits_npz('digits.npz')"
    scanfit train --data digits.npz --model mlp --optimizer adam --lr 0.001 --epochs 40
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scanfit


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load

    digits = sk_load()
    return digits.data.astype(np.float32), digits.target.astype(np.int32)


def save_digits_npz(path: str) -> None:
    """x: float32 (1797, 64) pixel values 0..16; y: int (1797,) labels 0..9."""
    x, y = load_digits()
    np.savez(path, x=x, y=y)


def init_mlp(key: jax.Array, sizes=(64, 128, 10)) -> list:
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


def main(quick: bool = False) -> dict:
    x, y = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # standardise each pixel
    n_val = 360
    xv, yv, xt, yt = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    batch = 32
    n = len(xt) // batch
    train = (xt[: n * batch].reshape(n, batch, 64), yt[: n * batch].reshape(n, batch))
    epochs = 5 if quick else 40
    res = scanfit.fit(
        loss_fn,
        init_mlp(jax.random.key(0)),
        optax.adam(1e-3),
        train,
        epochs=epochs,
        key=jax.random.key(1),
        progress=False,
    )
    accuracy = float(jnp.mean(jnp.argmax(logits(res.params, xv), -1) == yv))
    losses = np.asarray(res.losses)
    out = {
        "epochs": epochs,
        "updates": len(losses),
        "first_loss": float(losses[:n].mean()),
        "final_loss": float(losses[-n:].mean()),
        "val_accuracy": accuracy,
    }
    print(
        f"digits MLP: {out['updates']} updates, training loss {out['first_loss']:.3f} -> "
        f"{out['final_loss']:.3f}, validation accuracy {accuracy:.3f}"
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    main(p.parse_args().quick)
