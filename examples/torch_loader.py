"""The digits MLP of digits_mlp.py trained from a torch DataLoader with NumPy collation.

    python examples/torch_loader.py [--quick]

A torch ``Dataset`` of single images, a ``DataLoader`` that shuffles them (a
new order each epoch) and collates each batch of 32 into NumPy arrays instead
of tensors (``collate_fn=numpy_collate``): ``scanfit.fit`` takes the loader as
it is. It has a ``len()``, so ``fit`` knows the epoch length, and it is
re-iterable, so each epoch calls ``iter(loader)`` again. Only the CPU build of
torch is needed (``pip install torch==2.13.0``); without torch this script
says so and exits.

A shuffling torch loader draws each epoch's order from its generator's
current state, which a new process does not share: a resumed run would
re-read other microbatches, and ``fit`` refuses such a checkpoint (the hash
of the microbatches re-read differs). For exact resume, use a loader whose
order is a function of the epoch (a grain sampler, see grain_loader.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from digits_mlp import BATCH, accuracy, init_mlp, load_digits, loss_fn, split_and_standardise  # noqa: E402, E501

import scanfit  # noqa: E402


def numpy_collate(samples: list) -> tuple[np.ndarray, np.ndarray]:
    """[(pixels (64,), label ()), ...] -> (float32 (B, 64), int32 (B,)): arrays, not tensors."""
    xs, ys = zip(*samples)
    return np.stack(xs), np.asarray(ys, np.int32)


def make_loader(x: np.ndarray, y: np.ndarray, seed: int = 0):
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Images(Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int):
            return x[i], y[i]

    return DataLoader(
        Images(),
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,  # every microbatch the same shape: one compiled chunk
        collate_fn=numpy_collate,
        generator=torch.Generator().manual_seed(seed),
    )


def main(quick: bool = False) -> dict:
    (xt, yt), (xv, yv) = split_and_standardise(*load_digits())
    epochs = 5 if quick else 40
    loader = make_loader(xt, yt)
    res = scanfit.fit(
        loss_fn,
        init_mlp(jax.random.key(0)),
        optax.adam(1e-3),
        loader,
        epochs=epochs,  # len(loader) updates each
        chunk_steps=len(loader),
        progress=False,
    )
    losses = np.asarray(res.losses)
    out = {
        "epochs": epochs,
        "updates": len(losses),
        "first_loss": float(losses[: len(loader)].mean()),
        "final_loss": float(losses[-len(loader) :].mean()),
        "val_accuracy": accuracy(res.params, xv, yv),
    }
    print(
        f"digits MLP from a torch DataLoader: {out['updates']} updates over {epochs} epochs; "
        f"loss {out['first_loss']:.3f} -> {out['final_loss']:.4f}; validation accuracy "
        f"{out['val_accuracy']:.3f}"
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few epochs (a smoke test)")
    args = p.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed (pip install torch==2.13.0, the CPU build): skipped.")
        sys.exit(0)
    main(quick=args.quick)
