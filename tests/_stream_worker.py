"""A training run over an iterable of microbatches, started as a subprocess and SIGKILLed.

Usage: python _stream_worker.py CHECKPOINT_DIR OUT.npz {plain,grain}

``plain``: a re-iterable (a class with ``__iter__``), 4 epochs, resumed by
fast-forwarding. ``grain``: a grain DataLoader whose sampler shuffles over 4
epochs itself (fit sees one epoch), resumed from the iterator's saved state.
It trains slowly enough to be killed from outside, and writes its final
params and losses to OUT.npz.
"""

import sys
import time

import jax.numpy as jnp
import numpy as np
import optax

import scanfit

N, B, D, EPOCHS, ACCUMULATE = 60, 8, 4, 4, 2


def arrays():
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(N, B, D)).astype(np.float32)
    y = (x @ rng.normal(size=(D,)) + 0.1 * rng.normal(size=(N, B))).astype(np.float32)
    return x, y


def loss(p, batch):
    xb, yb = batch
    return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)


class Microbatches:
    """A re-iterable over (x[i], y[i]) in a fixed shuffled order; ``reads`` counts yields."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.order = np.random.default_rng(5).permutation(len(x))
        self.reads = 0

    def __len__(self):
        return len(self.x)

    def __iter__(self):
        for i in self.order:
            self.reads += 1
            yield self.x[i], self.y[i]


class Records:
    """A grain data source (its repr is part of the loader state grain checks)."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.reads = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]

    def __repr__(self):
        return f"Records(n={len(self.x)})"


def grain_loader(x, y):
    import grain.python as gp

    sampler = gp.IndexSampler(
        N, shard_options=gp.NoSharding(), shuffle=True, seed=3, num_epochs=EPOCHS
    )
    options = gp.ReadOptions(num_threads=0)
    return gp.DataLoader(
        data_source=Records(x, y), sampler=sampler, worker_count=0, read_options=options
    )


def train(kind, checkpoint_dir, on_chunk=None, **kw):
    x, y = arrays()
    if kind == "plain":
        data, epochs, steps = Microbatches(x, y), EPOCHS, None
    else:
        data, epochs, steps = grain_loader(x, y), 1, EPOCHS * N // ACCUMULATE
    params = {"w": np.zeros(D, np.float32), "b": np.zeros((), np.float32)}
    return scanfit.fit(
        loss,
        params,
        optax.adam(0.05),
        data,
        epochs=epochs,
        steps_per_epoch=steps,
        accumulate=ACCUMULATE,
        chunk_steps=7,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=7,
        keep=2,
        progress=False,
        on_chunk=on_chunk,
        **kw,
    )


def main() -> None:
    ckpt, out, kind = sys.argv[1:4]
    res = train(kind, ckpt, on_chunk=lambda info: time.sleep(0.05))
    np.savez(out, losses=np.asarray(res.losses), w=np.asarray(res.params["w"]))


if __name__ == "__main__":
    main()
