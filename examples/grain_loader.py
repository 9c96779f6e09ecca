"""The digits MLP of digits_mlp.py trained from a grain pipeline, checkpointed and resumed exactly.

    python examples/grain_loader.py [--quick]

A grain ``DataLoader`` reads single images from a data source, shuffles them
with a new order each epoch (its ``IndexSampler``) and batches them into
microbatches of 32: ``scanfit.fit`` takes the loader as it is and stacks a
chunk of microbatches at a time for the compiled loop. The sampler runs all
the epochs, so ``fit`` sees one long epoch (``epochs=1`` with
``steps_per_epoch``). The run is stopped halfway and resumed: the loader's
own state (``get_state()``, JSON) is saved in each checkpoint and set again on
resume, and the result is bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import grain.python as gp
import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from digits_mlp import BATCH, accuracy, init_mlp, load_digits, loss_fn, split_and_standardise  # noqa: E402, E501

import scanfit  # noqa: E402


class Images:
    """A grain data source: image i as (pixels float32 (64,), label int32 ())."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]

    def __repr__(self) -> str:  # grain restores a state only for the same repr
        return f"Images(n={len(self.x)})"


def make_loader(x, y, epochs: int, seed: int = 0) -> gp.DataLoader:
    """Shuffled (a new order each epoch), batched by 32 (a batch may span two epochs)."""
    sampler = gp.IndexSampler(
        len(x), shard_options=gp.NoSharding(), shuffle=True, seed=seed, num_epochs=epochs
    )
    return gp.DataLoader(
        data_source=Images(x, y),
        sampler=sampler,
        operations=[gp.Batch(BATCH, drop_remainder=True)],
        worker_count=0,
        # grain's read threads cost more than they save for in-memory images on a few cores.
        read_options=gp.ReadOptions(num_threads=0),
    )


def train(x, y, epochs: int, checkpoint_dir=None, stop_at=None) -> scanfit.TrainResult:
    return scanfit.fit(
        loss_fn,
        init_mlp(jax.random.key(0)),
        optax.adam(1e-3),
        make_loader(x, y, epochs),
        steps_per_epoch=epochs * len(x) // BATCH,  # the loader's epochs, as one for fit
        chunk_steps=50,
        checkpoint_dir=checkpoint_dir,
        on_chunk=None if stop_at is None else (lambda info: info.step < stop_at),
        progress=False,
    )


def main(quick: bool = False) -> dict:
    (xt, yt), (xv, yv) = split_and_standardise(*load_digits())
    epochs = 5 if quick else 40
    res = train(xt, yt, epochs)
    updates = len(res.losses)
    with tempfile.TemporaryDirectory() as ckpt:
        stopped = train(xt, yt, epochs, ckpt, stop_at=updates // 2)  # "killed" halfway
        resumed = train(xt, yt, epochs, ckpt)  # a new loader, set to the saved state
    same = np.array_equal(resumed.losses, res.losses) and all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(res.params))
    )
    losses = np.asarray(res.losses)
    per_epoch = len(xt) // BATCH
    out = {
        "epochs": epochs,
        "updates": updates,
        "first_loss": float(losses[:per_epoch].mean()),
        "final_loss": float(losses[-per_epoch:].mean()),
        "val_accuracy": accuracy(res.params, xv, yv),
        "stopped_at": len(stopped.losses),
        "resumed_equals_uninterrupted": bool(same),
    }
    print(
        f"digits MLP from a grain DataLoader: {updates} updates over {epochs} epochs; loss "
        f"{out['first_loss']:.3f} -> {out['final_loss']:.4f}; validation accuracy "
        f"{out['val_accuracy']:.3f}; stopped at {out['stopped_at']} and resumed: "
        f"{'bitwise equal' if same else 'DIFFERENT'} to the uninterrupted run"
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few epochs (a smoke test)")
    main(quick=p.parse_args().quick)
