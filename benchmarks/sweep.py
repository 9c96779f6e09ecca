"""Sweeps and data parallelism: one vmapped program against a loop of runs; 1, 2, 4 devices.

    python benchmarks/sweep.py [--quick]

1. Sweep: K=64 learning rates trained in ONE compiled program (scanfit.sweep)
   against 64 sequential scan_train calls (the same optimizer factory, the
   learning rate a traced hyper-parameter of optax.inject_hyperparams so the
   sequential calls share one compilation), same total updates, for the seed
   problem and the 64-64-10 MLP. Warm times (compilation excluded, reported
   apart), medians of interleaved repetitions.
2. Data parallelism: fit(devices=d) for d in 1, 2, 4 fake CPU devices, each in
   its own process (XLA_FLAGS=--xla_force_host_platform_device_count=4), on a
   batch large enough to matter. Fake devices share the same 2 cores: this
   measures correctness and overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine, write_json  # noqa: E402

K = 64


def _timed(fn) -> float:
    import jax

    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def workloads(quick: bool):
    import jax
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)
    n = 200 if quick else 2000
    x = rng.normal(size=(n, 32)).astype(np.float32)
    seed = {
        "name": "seed problem (scalar w, batch 32)",
        "loss": lambda w, b: jnp.sum((w * b[0] - b[1]) ** 2),
        "params": jnp.zeros(()),
        "data": (jnp.asarray(x), jnp.asarray(3 * x)),
        "lrs": np.geomspace(1e-4, 1e-2, K).astype(np.float32),
        "make": optax.inject_hyperparams(optax.sgd),
    }
    m = 50 if quick else 500
    xm = rng.normal(size=(m, 32, 64)).astype(np.float32)
    ym = np.argmax(xm @ rng.normal(size=(64, 10)), -1).astype(np.int32)
    k1, k2 = jax.random.split(jax.random.key(0))

    def mlp_loss(p, b):
        logits = jax.nn.relu(b[0] @ p[0] + p[1]) @ p[2] + p[3]
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    mlp = {
        "name": "64-64-10 MLP (adam, batch 32)",
        "loss": mlp_loss,
        "params": [
            jax.random.normal(k1, (64, 64)) * 0.17,
            jnp.zeros(64),
            jax.random.normal(k2, (64, 10)) * 0.17,
            jnp.zeros(10),
        ],
        "data": (jnp.asarray(xm), jnp.asarray(ym)),
        "lrs": np.geomspace(1e-4, 1e-2, K).astype(np.float32),
        "make": optax.inject_hyperparams(optax.adam),
    }
    return [seed, mlp]


def bench_sweep(quick: bool) -> list[dict]:
    return [_measure_sweep(w, 1 if quick else 7) for w in workloads(quick)]


def _measure_sweep(w: dict, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    import scanfit

    lrs, make_opt = w["lrs"], w["make"]  # one factory object: warm calls reuse the program
    opt = make_opt(learning_rate=0.0)  # one optimizer: sequential calls share a program

    def sequential():
        out = []
        for lr in lrs:
            state = opt.init(w["params"])
            state.hyperparams["learning_rate"] = jnp.asarray(lr)
            run = scanfit.scan_train(w["loss"], w["params"], opt, w["data"], opt_state=state)
            out.append(run.losses)
        return out

    def swept():
        return scanfit.sweep(
            w["loss"], w["params"], make_opt, w["data"], {"learning_rate": lrs}
        ).losses

    cold = {"sweep": _timed(swept), "sequential": _timed(sequential)}
    a, b = np.asarray(swept()), np.stack([np.asarray(v) for v in sequential()])
    # Batched float32 matmuls round differently and adam amplifies it over hundreds of
    # updates; tests/test_sweep.py pins equality at 1e-12 in float64. Here: same runs to 1%.
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4)
    warm = {"sweep": [], "sequential": []}
    for _ in range(reps):
        warm["sweep"].append(_timed(swept))
        warm["sequential"].append(_timed(sequential))
    row = {
        "workload": w["name"],
        "configs": K,
        "updates_total": K * len(jax.tree.leaves(w["data"])[0]),
        **{f"{k}_warm_s": statistics.median(v) for k, v in warm.items()},
        **{f"{k}_cold_s": v for k, v in cold.items()},
    }
    row["speedup_warm"] = row["sequential_warm_s"] / row["sweep_warm_s"]
    return row


def parallel_worker(devices: int, quick: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import scanfit

    n, batch = (40, 256) if quick else (400, 1024)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, batch, 64)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(64, 10)), -1).astype(np.int32)
    params = [
        jnp.asarray(rng.normal(size=(64, 256)).astype(np.float32) * 0.12),
        jnp.zeros(256),
        jnp.asarray(rng.normal(size=(256, 10)).astype(np.float32) * 0.06),
        jnp.zeros(10),
    ]

    def loss(p, b):
        logits = jax.nn.relu(b[0] @ p[0] + p[1]) @ p[2] + p[3]
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    opt = optax.adam(1e-3)

    def run():
        data = (x, y)  # NumPy: streamed in 4 chunks, each sharded over the devices
        return scanfit.fit(
            loss, params, opt, data, chunk_steps=n // 4, devices=devices, progress=False
        ).losses

    cold = _timed(run)
    warm = statistics.median(_timed(run) for _ in range(1 if quick else 3))
    return {
        "devices": devices,
        "batch": batch,
        "updates": n,
        "cold_s": cold,
        "warm_s": warm,
        "updates_per_s": n / warm,
        "final_loss": float(np.asarray(run())[-1]),
    }


def bench_parallel(quick: bool) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    rows = []
    for d in (1, 2, 4):
        cmd = [sys.executable, __file__, "--parallel-worker", str(d)] + (
            ["--quick"] if quick else []
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parallel-worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.parallel_worker:
        print(json.dumps(parallel_worker(args.parallel_worker, args.quick)))
        return 0
    sweep_rows = bench_sweep(args.quick)
    print(f"\nsweep: {K} learning rates, one vmapped program vs {K} sequential scan_train calls")
    print(
        f"{'workload':<34}{'updates':>10}{'sweep s':>10}{'sequential s':>14}{'speed-up':>10}"
        f"{'compile s (sweep/seq)':>24}"
    )
    for r in sweep_rows:
        print(
            f"{r['workload']:<34}{r['updates_total']:>10,}{r['sweep_warm_s']:>10.3f}"
            f"{r['sequential_warm_s']:>14.3f}{r['speedup_warm']:>9.1f}x"
            f"{r['sweep_cold_s'] - r['sweep_warm_s']:>13.2f} / "
            f"{r['sequential_cold_s'] - r['sequential_warm_s']:.2f}"
        )
    par_rows = bench_parallel(args.quick)
    base = par_rows[0]["updates_per_s"]
    print(
        f"\ndata parallelism: fit(devices=d) on fake CPU devices sharing 2 cores, batch "
        f"{par_rows[0]['batch']}, 64-256-10 MLP"
    )
    print(f"{'devices':>8}{'updates/s':>12}{'vs 1 device':>13}{'final loss':>12}")
    for r in par_rows:
        print(
            f"{r['devices']:>8}{r['updates_per_s']:>12,.0f}{r['updates_per_s'] / base:>12.2f}x"
            f"{r['final_loss']:>12.5f}"
        )
    for r in sweep_rows:
        verdict = "PASS" if r["speedup_warm"] >= 10 else "MISS"
        print(
            f"{verdict}  sweep of {K} >= 10x sequential, {r['workload']}: "
            f"got {r['speedup_warm']:.1f}x"
        )
    write_json(
        RESULTS_DIR / "sweep.json",
        {"quick": args.quick, "sweep": sweep_rows, "parallel": par_rows, "machine": machine()},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
