"""Operations around training: what a checkpoint at every chunk costs.

    python benchmarks/operations.py [--quick]

The workload is a wide MLP (D-H-D, adam, batch 4) whose training state (params and
adam's two moments) takes 64 MiB (``--quick``: 8 MiB), trained by ``fit`` in
chunks of 10 updates. Two variants run in one process, alternated, warm (compiled
beforehand), median of several runs:

- ``none``: no checkpoint_dir;
- ``every_chunk``: ``checkpoint_dir`` with a checkpoint after every chunk (a fresh
  directory each run, ``resume=False``).

Timed: from the end of the first chunk to the return of ``fit`` (the chunks
after the first, and every save, the last one landed), so the fingerprint a
checkpointed run computes once before training stays out of the ratio; the
whole call is reported beside it. Goal: ``every_chunk`` <= 1.05x ``none``,
under ``nan_policy="raise"`` and ``"skip"`` (a donated carry).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import RESULTS_DIR, describe_machine, machine, write_json

import scanfit

QUICK = {"width": 1024, "hidden": 320, "chunks": 4, "reps": 2}
FULL = {"width": 1024, "hidden": 2560, "chunks": 8, "reps": 5}
CHUNK, BATCH = 10, 4
POLICIES = ("raise", "skip")


def loss(p, batch):
    x, y = batch
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)


def workload(width: int, hidden: int, updates: int):
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(width, hidden)).astype(np.float32) / width**0.5),
        "b1": jnp.zeros(hidden),
        "w2": jnp.asarray(rng.normal(size=(hidden, width)).astype(np.float32) / hidden**0.5),
        "b2": jnp.zeros(width),
    }
    x = rng.normal(size=(updates, BATCH, width)).astype(np.float32)
    data = (jnp.asarray(x), jnp.asarray(np.tanh(x)))
    return params, data


def state_bytes(params) -> int:
    return 3 * sum(leaf.nbytes for leaf in jax.tree.leaves(params))  # params + adam's mu, nu


def one_run(params, data, policy: str, checkpoint: bool) -> tuple[float, float]:
    """(seconds after the first chunk, seconds of the whole call) of one fit."""
    first = []
    on_chunk = lambda info: first.append(time.perf_counter()) if not first else None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = scanfit.fit(
            loss, params, optax.adam(1e-4), data, chunk_steps=CHUNK, progress=False,
            nan_policy=policy, on_chunk=on_chunk,
            checkpoint_dir=Path(tmp) / "ckpt" if checkpoint else None, resume=False,
        )  # fmt: skip
        jax.block_until_ready(res.params)
        end = time.perf_counter()
    return end - first[0], end - t0


def measure(params, data, reps: int) -> dict[str, dict[str, float]]:
    """Median seconds per variant, alternated rep by rep after one warm-up each."""
    names = [(p, c) for p in POLICIES for c in (False, True)]
    for policy, checkpoint in names:
        one_run(params, data, policy, checkpoint)
    loop: dict = {n: [] for n in names}
    whole: dict = {n: [] for n in names}
    for _ in range(reps):
        for policy, checkpoint in names:
            a, b = one_run(params, data, policy, checkpoint)
            loop[policy, checkpoint].append(a)
            whole[policy, checkpoint].append(b)
    return {
        f"{p}/{'every_chunk' if c else 'none'}": {
            "after_first_chunk_s": statistics.median(loop[p, c]),
            "whole_call_s": statistics.median(whole[p, c]),
        }
        for p, c in names
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller state, fewer repeats")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the json")
    p.add_argument("--reps", type=int, default=None, help="repeats (default: 5, quick 2)")
    args = p.parse_args(argv)
    cfg = {**(QUICK if args.quick else FULL), **({"reps": args.reps} if args.reps else {})}
    info = machine()
    print(f"operations benchmark{' (quick)' if args.quick else ''}: {describe_machine(info)}")
    params, data = workload(cfg["width"], cfg["hidden"], cfg["chunks"] * CHUNK)
    mib = state_bytes(params) / 2**20
    secs = measure(params, data, cfg["reps"])
    print(f"  {cfg['width']}-{cfg['hidden']}-{cfg['width']} MLP, adam, batch {BATCH}: state "
          f"{mib:.1f} MiB; {cfg['chunks']} chunks of {CHUNK} updates; median of "
          f"{cfg['reps']}, alternated")  # fmt: skip
    ratios = {}
    for policy in POLICIES:
        none, every = secs[f"{policy}/none"], secs[f"{policy}/every_chunk"]
        ratios[policy] = every["after_first_chunk_s"] / none["after_first_chunk_s"]
        print(
            f"    nan_policy={policy!r}: after the first chunk "
            f"{none['after_first_chunk_s']:.3f} s without checkpoints, "
            f"{every['after_first_chunk_s']:.3f} s with one every chunk: "
            f"{ratios[policy]:.3f}x (goal <= 1.05x); whole calls "
            f"{none['whole_call_s']:.3f} s, {every['whole_call_s']:.3f} s"
        )
    payload = {
        "benchmark": "operations",
        "quick": args.quick,
        "machine": info,
        "config": {**cfg, "chunk_steps": CHUNK, "batch": BATCH, "state_mib": mib},
        "seconds": secs,
        "checkpoint_every_chunk_ratio": ratios,
        "checkpoint_goal_met": all(r <= 1.05 for r in ratios.values()),
    }
    path = write_json(args.out / "operations.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
