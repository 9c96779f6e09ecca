"""Why the seed scan at B=1024 stays above 1.5x the bandwidth floor on XLA:CPU.

    python benchmarks/lowering.py [--quick] [--out benchmarks/results]

Times ns per scan step of scan_training_step next to other ways of writing the same
per-step reduction and next to XLA CPU compile options, all on the same arrays in one
process, and reports how XLA lowered the per-step reduction (reduce-window or reduce).
If every row costs about the same, the cost is XLA's, not the formulation's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import RESULTS_DIR, describe_machine, format_table, machine, time_it, write_json
from jax import lax
from seed import _floor, _reduce_scan, make_data

import scanfit
from scanfit._linear import _scan_sgd

FULL = {"n": 10_000, "bs": (32, 1024), "repeats": 7}
QUICK = {"n": 1_000, "bs": (32,), "repeats": 3}


def _loss(w, x, y):
    return jnp.sum((w * x - y) ** 2)


def _grad_32x32(w, x, y):
    # The same microbatch as a (B/32, 32) tile: every reduction XLA sees is 32 long.
    return jax.grad(_loss)(w, x.reshape(-1, 32), y.reshape(-1, 32))


# Per-step gradients of the seed loss, each written differently; all equal jax.grad(_loss).
GRADS = {
    "jax.grad (the seed body)": jax.grad(_loss),
    "hand-written, jnp.dot": lambda w, x, y: jnp.dot(2 * (w * x - y), x),
    "hand-written, (B/32,32) @ ones": lambda w, x, y: jnp.sum(
        ((2 * (w * x - y)) * x).reshape(-1, 32) @ jnp.ones(32, x.dtype)
    ),
    "jax.grad on a (B/32, 32) tile": _grad_32x32,
}

# XLA CPU compile options (jax.jit(..., compiler_options=...)) that could plausibly
# change how the reduction is emitted.
OPTIONS = {
    "fast math": {"xla_cpu_enable_fast_math": True},
    "512-bit vectors": {"xla_cpu_prefer_vector_width": 512},
    "reduce-window length 8": {"xla_reduce_window_rewrite_base_length": 8},
    "XNNPACK reduce fusion": {
        "xla_cpu_use_xnnpack": True,
        "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
    },
    "YNNPACK reduce fusion": {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
    },
}


def _scan_with(grad, unroll=1, compiler_options=None):
    def run(w, lr, xs, ys):
        def step(w, batch):
            x, y = batch
            return w - lr * grad(w, x, y), None

        return lax.scan(step, w, (xs, ys), unroll=unroll)[0]

    return jax.jit(run, compiler_options=compiler_options)


def reduction_ops(compiled_text: str) -> str:
    """How the per-step reduction was lowered, from the optimised HLO."""
    windows = compiled_text.count("reduce-window(")
    reduces = compiled_text.count(" reduce(")
    return f"{windows} reduce-window, {reduces} reduce"


def measure(n: int, b: int, repeats: int) -> list[dict]:
    x, y, lr = make_data(n, b)
    xd, yd = jax.device_put((x, y))
    w0 = np.float32(0)
    want = float(scanfit.scan_training_step(w0, lr, xd, yd))

    rows = [
        {"variant": "bandwidth floor (no scan)"},
        {
            "variant": "scan that only sums x*y",
            "lowering": reduction_ops(_reduce_scan.lower(xd, yd).compile().as_text()),
        },
        {
            "variant": "scanfit.scan_training_step",
            "lowering": reduction_ops(_scan_sgd.lower(w0, lr, xd, yd).compile().as_text()),
        },
    ]
    fns = [
        lambda: _floor(xd, yd),
        lambda: _reduce_scan(xd, yd),
        lambda: scanfit.scan_training_step(w0, lr, xd, yd),
    ]
    seed_grad = GRADS["jax.grad (the seed body)"]
    cases = [(name, _scan_with(g)) for name, g in GRADS.items()]
    cases += [("jax.grad, unroll=4", _scan_with(seed_grad, unroll=4))]
    cases += [
        (f"jax.grad, {name}", _scan_with(seed_grad, compiler_options=o))
        for name, o in OPTIONS.items()
    ]
    for name, fn in cases:
        try:
            compiled = fn.lower(w0, lr, xd, yd).compile()
        except Exception as e:  # an option this jaxlib does not know: report, go on
            rows.append({"variant": name, "error": str(e).splitlines()[0][:80]})
            continue
        got = float(compiled(w0, lr, xd, yd))
        if abs(got - want) > 1e-4 * abs(want):
            raise AssertionError(f"{name}: w={got} but scan_training_step gives {want}")
        rows.append({"variant": name, "lowering": reduction_ops(compiled.as_text())})
        fns.append(lambda c=compiled: c(w0, lr, xd, yd))

    # Round robin, so drift in the machine's load spreads over every row alike.
    timed = [r for r in rows if "error" not in r]
    samples = [[] for _ in timed]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            samples[i].append(time_it(fn, repeats=1, warmup=0)[0])
    for r, ts in zip(timed, samples):
        r["ns_per_step"] = 1e9 * statistics.median(ts) / n
        r["vs_floor"] = r["ns_per_step"] / timed[0]["ns_per_step"]
    return rows


def table(rows: list[dict]) -> str:
    body = [
        [
            r["variant"],
            f"{r['ns_per_step']:.0f}" if "ns_per_step" in r else "-",
            f"{r['vs_floor']:.2f}" if "vs_floor" in r else "-",
            r.get("lowering", r.get("error", "")),
        ]
        for r in rows
    ]
    return format_table(["variant", "ns/step", "/ floor", "per-step reduction lowered to"], body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=1000, B=32 only (a few seconds)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for lowering.json")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    info = machine()
    print(f"seed lowering{' (quick)' if args.quick else ''}: {describe_machine(info)}")
    results = {}
    for b in cfg["bs"]:
        rows = measure(cfg["n"], b, cfg["repeats"])
        results[str(b)] = rows
        print(f"\nN={cfg['n']}, B={b} (every scan checked against scan_training_step's w)")
        print(table(rows))
    payload = {"benchmark": "lowering", "quick": args.quick, "machine": info, "n": cfg["n"]}
    print(f"\nwrote {write_json(args.out / 'lowering.json', {**payload, 'rows': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
