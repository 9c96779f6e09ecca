"""Loop benchmark: scanfit.scan_train against a hand-written lax.scan and a Python loop.

    python benchmarks/loop.py [--quick] [--out benchmarks/results]

Workload: a 64-64-10 MLP (64 features, one tanh hidden layer of 64, 10 classes), softmax
cross-entropy averaged over a batch of 32, optax.adam(1e-3), float32, one update per
microbatch, on synthetic data labelled by a fixed random linear teacher (so the loss falls).
Everything runs in one process; the implementations are interleaved (A B C A B C ...) over
several repetitions and the medians reported. Two diagnostic columns separate where any
overhead of scan_train comes from: the hand-written scan with scan_train's per-update
finite flag added, and scan_train wrapped in an outer jax.jit (its Python checks then run
once, at trace time, instead of on every call).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported
from _common import (  # noqa: E402
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine,
    write_json,
)

import scanfit  # noqa: E402

FEATURES, HIDDEN, CLASSES, BATCH = 64, 64, 10, 32
LR = 1e-3
# loop_subset: the Python loop is timed on its first loop_subset steps, scaled by n/loop_subset.
FULL = {
    "n": 4000,
    "warm_reps": 11,
    "cold_reps": 5,
    "loop_subset": 4000,
    "compile_reps": 5,
    "per_call_reps": 300,
}
QUICK = {
    "n": 300,
    "warm_reps": 3,
    "cold_reps": 1,
    "loop_subset": 300,
    "compile_reps": 1,
    "per_call_reps": 50,
}
COMPILE_NS = (10, 100_000)
RTOL = 1e-5  # on the final losses, every implementation against scan_train

# name -> label for the table; A/B/C are the compared implementations, D/E/F diagnostics.
IMPLS = {
    "scan_train": "A  scanfit.scan_train (direct call)",
    "hand_scan": "B  hand-written lax.scan (jit)",
    "python_loop": "C  Python loop over jitted optax step",
    "hand_scan_guard": "D  diag: B + scan_train's finite flag",
    "hand_scan_grouped": "F  diag: B + scan_train's (N,1,...) data",
    "jit_scan_train": "E  diag: jax.jit(scan_train)",
}


class CheckFailed(Exception):
    pass


# ---------------------------------------------------------------------------- workload


def make_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """N microbatches of BATCH examples, labels = argmax of a fixed random linear teacher."""
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    x = rng.standard_normal((n, BATCH, FEATURES), dtype=np.float32)
    y = np.argmax(x @ teacher, axis=-1).astype(np.int32)
    return x, y


def init_params() -> dict:
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (FEATURES, HIDDEN), jnp.float32) / np.sqrt(FEATURES),
        "b1": jnp.zeros((HIDDEN,), jnp.float32),
        "w2": jax.random.normal(k2, (HIDDEN, CLASSES), jnp.float32) / np.sqrt(HIDDEN),
        "b2": jnp.zeros((CLASSES,), jnp.float32),
    }


def make_loss() -> Callable:
    """A fresh closure on every call: a new function object misses every jit cache."""

    def loss_fn(params, batch):
        x, y = batch
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


# ------------------------------------------------------------------- implementations


def all_finite(tree) -> jax.Array:
    ok = jnp.bool_(True)
    for leaf in jax.tree.leaves(tree):
        ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


def make_hand_scan(
    loss_fn: Callable, optimizer, *, guard: bool = False, grouped: bool = False
) -> Callable:
    """The loop written by hand: jit(lax.scan) with carry (params, opt_state).

    Diagnostics, each adding one thing scan_train does: ``guard`` carries an update counter
    and the first update whose loss, gradient or new params were non-finite (the same
    ``jnp.isfinite(loss) & all(isfinite(grads)) & all(isfinite(params))`` flag);
    ``grouped`` scans over data reshaped to (N, 1, ...) and takes ``a[0]`` of each
    microbatch, as scan_train does with accumulate=1.
    """
    grad_fn = jax.value_and_grad(loss_fn)

    def update(params, opt_state, batch):
        loss, grads = grad_fn(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    def plain(carry, batch):
        if grouped:
            batch = jax.tree.map(lambda a: a[0], batch)
        params, opt_state, loss, _ = update(*carry, batch)
        return (params, opt_state), loss

    def guarded(carry, batch):
        params, opt_state, step, first_bad = carry
        params, opt_state, loss, grads = update(params, opt_state, batch)
        ok = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
        first_bad = jnp.where((first_bad < 0) & ~ok, step, first_bad)
        return (params, opt_state, step + 1, first_bad), loss

    def train(params, data):
        opt_state = optimizer.init(params)
        if grouped:
            data = jax.tree.map(lambda a: a.reshape(a.shape[0], 1, *a.shape[1:]), data)
        if guard:
            carry = (params, opt_state, jnp.int32(0), jnp.int32(-1))
            # first_bad is returned, as scan_train returns it: else XLA drops the flag as dead.
            (params, opt_state, _, first_bad), losses = lax.scan(guarded, carry, data)
            return params, opt_state, losses, first_bad
        (params, opt_state), losses = lax.scan(plain, (params, opt_state), data)
        return params, opt_state, losses

    return jax.jit(train)


def make_jit_scan_train(loss_fn: Callable, optimizer) -> Callable:
    return jax.jit(lambda params, data: scanfit.scan_train(loss_fn, params, optimizer, data))


def make_step(loss_fn: Callable, optimizer) -> Callable:
    grad_fn = jax.value_and_grad(loss_fn)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = grad_fn(params, (x, y))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def python_loop(step: Callable, params, opt_state, xs: list, ys: list):
    losses = []
    for x, y in zip(xs, ys):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(loss)
    return params, opt_state, losses


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


# -------------------------------------------------------------------------- measures


def build(impl: str, loss_fn: Callable, optimizer, params, opt_state, data, xs, ys, k: int):
    """(thunk, unpack): ``thunk()`` runs ``impl`` once, all updates for the scans, the first
    ``k`` steps for the Python loop; ``unpack(out)`` gives (final params, last update's loss).
    """
    if impl == "scan_train":
        return (
            lambda: scanfit.scan_train(loss_fn, params, optimizer, data),
            lambda r: (r.params, r.losses[-1]),
        )
    if impl == "jit_scan_train":
        f = make_jit_scan_train(loss_fn, optimizer)
        return lambda: f(params, data), lambda r: (r.params, r.losses[-1])
    if impl.startswith("hand_scan"):
        guard, grouped = impl == "hand_scan_guard", impl == "hand_scan_grouped"
        f = make_hand_scan(loss_fn, optimizer, guard=guard, grouped=grouped)
        return lambda: f(params, data), lambda r: (r[0], r[2][-1])
    if impl == "python_loop":
        step = make_step(loss_fn, optimizer)
        return (
            lambda: python_loop(step, params, opt_state, xs[:k], ys[:k]),
            lambda r: (r[0], r[2][-1]),
        )
    raise ValueError(impl)


def measure(cfg: dict) -> tuple[dict, dict]:
    n, k = cfg["n"], cfg["loop_subset"]
    x, y = make_data(n)
    data = jax.device_put((x, y))
    # Pre-sliced outside every timed region: the loop should pay dispatch, not slicing.
    xs, ys = jax.device_put((list(x), list(y)))
    optimizer = optax.adam(LR)
    params = init_params()
    opt_state = jax.block_until_ready(optimizer.init(params))
    loss_fn = make_loss()
    full_loss = jax.jit(make_loss())  # mean loss over the whole training set

    # Warm-up (compiles) and correctness: every implementation over all n updates once.
    thunks, final = {}, {}
    for impl in IMPLS:
        thunk, unpack = build(impl, loss_fn, optimizer, params, opt_state, data, xs, ys, n)
        p, last = unpack(jax.block_until_ready(thunk()))
        final[impl] = {
            "last_update_loss": float(last),
            "train_set_loss": float(full_loss(p, (x.reshape(-1, FEATURES), y.reshape(-1)))),
        }
        if impl == "python_loop" and k < n:  # the timed thunk runs the first k steps only
            thunk, _ = build(impl, loss_fn, optimizer, params, opt_state, data, xs, ys, k)
            jax.block_until_ready(thunk())
        thunks[impl] = thunk
    initial = float(full_loss(params, (x.reshape(-1, FEATURES), y.reshape(-1))))
    checks = {}
    for impl in IMPLS:
        rel = 0.0
        for what in ("last_update_loss", "train_set_loss"):
            a, b = final["scan_train"][what], final[impl][what]
            rel = max(rel, abs(a - b) / max(abs(b), 1e-12))
            if not rel <= RTOL:
                raise CheckFailed(
                    f"{what}: scan_train {a!r} vs {impl} {b!r}, rel diff {rel:.2e} > {RTOL:g}"
                )
        checks[impl] = rel
    if not final["scan_train"]["train_set_loss"] < 0.5 * initial:
        raise CheckFailed(f"loss did not fall: {initial:.4f} -> {final['scan_train']}")

    # Warm: interleaved A B C D E A B C D E ...
    warm = {impl: [] for impl in IMPLS}
    for _ in range(cfg["warm_reps"]):
        for impl, thunk in thunks.items():
            t, _ = timed(thunk)
            warm[impl].append(t * (n / k if impl == "python_loop" else 1.0))

    # Cold: fresh loss closure -> fresh jit caches; the first call compiles and runs.
    loop_per_step = statistics.median(warm["python_loop"]) / n
    cold = {impl: [] for impl in IMPLS}
    for _ in range(cfg["cold_reps"]):
        for impl in IMPLS:
            thunk, _ = build(impl, make_loss(), optimizer, params, opt_state, data, xs, ys, k)
            t, _ = timed(thunk)
            if impl == "python_loop":  # first k steps with a fresh jit, rest at warm speed
                t += (n - k) * loop_per_step
            cold[impl].append(t)

    rows = {}
    for impl in IMPLS:
        rows[impl] = {
            "label": IMPLS[impl],
            "warm_s": statistics.median(warm[impl]),
            "warm_min_s": min(warm[impl]),
            "warm_all_s": warm[impl],
            "cold_s": statistics.median(cold[impl]),
            "cold_all_s": cold[impl],
            **final[impl],
        }
    info = {"n": n, "loop_steps_timed": k, "initial_train_set_loss": initial, "rel_diffs": checks}
    return rows, info


def compile_times(reps: int) -> dict:
    """lower and compile of jax.jit(scan_train) at each N of COMPILE_NS, nothing run.

    Data are ShapeDtypeStructs, so N=1e5 (820 MB of inputs) is never allocated. A fresh
    loss closure per measurement keeps every cache cold; sizes alternate to share drift.
    """
    optimizer = optax.adam(LR)
    params = init_params()
    out = {n: {"lower_s": [], "compile_s": []} for n in COMPILE_NS}
    for _ in range(reps):
        for n in COMPILE_NS:
            spec = (
                jax.ShapeDtypeStruct((n, BATCH, FEATURES), jnp.float32),
                jax.ShapeDtypeStruct((n, BATCH), jnp.int32),
            )
            f = make_jit_scan_train(make_loss(), optimizer)
            t0 = time.perf_counter()
            lowered = f.lower(params, spec)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            out[n]["lower_s"].append(t1 - t0)
            out[n]["compile_s"].append(t2 - t1)
    res = {}
    for n, d in out.items():
        total = [a + b for a, b in zip(d["lower_s"], d["compile_s"])]
        res[n] = {
            **d,
            "lower_med_s": statistics.median(d["lower_s"]),
            "compile_med_s": statistics.median(d["compile_s"]),
            "total_med_s": statistics.median(total),
        }
    lo, hi = COMPILE_NS
    res["ratio_total"] = res[hi]["total_med_s"] / res[lo]["total_med_s"]
    res["ratio_compile"] = res[hi]["compile_med_s"] / res[lo]["compile_med_s"]
    return res


# ---------------------------------------------------------------------------- report


def table(rows: dict, n: int, k: int) -> str:
    ref = rows["hand_scan"]["warm_s"]
    body = []
    for impl, r in rows.items():
        star = "*" if impl == "python_loop" and k < n else ""
        body.append(
            [
                r["label"],
                f"{1e3 * r['warm_s']:.1f}{star}",
                f"{1e3 * r['warm_min_s']:.1f}{star}",
                f"{1e6 * r['warm_s'] / n:.1f}{star}",
                f"{r['warm_s'] / ref:.3f}",
                f"{1e3 * r['cold_s']:.0f}{star}",
                f"{r['last_update_loss']:.6f}",
                f"{r['train_set_loss']:.6f}",
            ]
        )
    headers = [
        "implementation",
        "warm ms",
        "warm min",
        "us/update",
        "/hand",
        "cold ms",
        "last loss",
        "train-set loss",
    ]
    return format_table(headers, body)


MATMUL_FLOPS = 2 * BATCH * (2 * (FEATURES * HIDDEN + HIDDEN * CLASSES) + HIDDEN * CLASSES)
# per update: forward x@w1, h@w2; backward dW1, dW2 and dh (no gradient for x)


def notes(cfg: dict, rows: dict, run_info: dict, comp: dict) -> str:
    n, k = run_info["n"], run_info["loop_steps_timed"]
    lines = [
        f"\nwarm: median of {cfg['warm_reps']} interleaved calls (A B C D F E A B ...) after an"
        " untimed one, so no compilation; /hand = warm / B's warm.",
        f"cold: a fresh loss_fn closure, so the first call traces and compiles; median of "
        f"{cfg['cold_reps']}.",
    ]
    if k < n:
        lines.append(
            f"* Python loop timed on its first {k} of {n} steps and scaled by {n}/{k}; its cold"
            f" time is the first {k} steps\n  with a fresh jit plus {n - k} steps at the warm"
            " per-step time."
        )
    rels = ", ".join(f"{i} {v:.1e}" for i, v in run_info["rel_diffs"].items() if i != "scan_train")
    lines += [
        f"loss: {run_info['initial_train_set_loss']:.4f} at the initial params; 'last loss' is"
        " the loss of the last update's microbatch,\n'train-set loss' the mean over all"
        f" {n * BATCH} examples at the final params. Largest rel diff vs scan_train"
        f" (limit {RTOL:g}):\n{rels}.",
        f"\ncompile of jax.jit(scan_train), nothing run (lower / compile / total ms, median of"
        f" {cfg['compile_reps']}):",
    ]
    for m in COMPILE_NS:
        c = comp[m]
        lines.append(
            f"  N={m:>6}: {1e3 * c['lower_med_s']:5.0f} / {1e3 * c['compile_med_s']:5.0f} / "
            f"{1e3 * c['total_med_s']:5.0f}"
        )
    lo, hi = COMPILE_NS
    lines.append(
        f"  N={hi} / N={lo}: total {comp['ratio_total']:.3f}, compile only "
        f"{comp['ratio_compile']:.3f}"
    )
    return "\n".join(lines)


def per_call_times(reps: int) -> dict:
    """Median wall time of one call at N=10 microbatches, where fixed per-call costs show:
    A (scan_train, Python checks on every call), E (jit(scan_train), checks at trace time
    only) and B. A-E is what the per-call Python checks cost."""
    x, y = make_data(10)
    data = jax.device_put((x, y))
    optimizer, params, loss_fn = optax.adam(LR), init_params(), make_loss()
    jit_st = make_jit_scan_train(loss_fn, optimizer)
    hand = make_hand_scan(loss_fn, optimizer)
    thunks = {
        "scan_train": lambda: scanfit.scan_train(loss_fn, params, optimizer, data),
        "jit_scan_train": lambda: jit_st(params, data),
        "hand_scan": lambda: hand(params, data),
    }
    times = {impl: [] for impl in thunks}
    for thunk in thunks.values():
        jax.block_until_ready(thunk())
    for _ in range(reps):
        for impl, thunk in thunks.items():
            times[impl].append(timed(thunk)[0])
    return {impl: statistics.median(t) for impl, t in times.items()}


def overhead_breakdown(rows: dict, n: int, per_call: dict) -> dict:
    """Where scan_train's warm time over B goes, and why the Python loop is not 10x slower."""
    w = {impl: r["warm_s"] for impl, r in rows.items()}
    a, b, c = w["scan_train"], w["hand_scan"], w["python_loop"]
    d, e, f = w["hand_scan_guard"], w["jit_scan_train"], w["hand_scan_grouped"]
    out = {
        "scan_train_over_hand": a / b,
        "finite_flag_ratio": d / b,  # D/B: the per-update finite flag alone
        "grouped_data_ratio": f / b,  # F/B: the (N, 1, ...) reshape and a[0] alone
        "graph_ratio": e / b,  # E/B: scan_train's compiled program, no per-call Python
        # A-E at N=10: the Python checks each direct call runs (at N=n they drown in noise)
        "python_per_call_ms": 1e3 * (per_call["scan_train"] - per_call["jit_scan_train"]),
        "per_call_n10_ms": {impl: 1e3 * t for impl, t in per_call.items()},
        "hand_us_per_update": 1e6 * b / n,
        "hand_matmul_gflops": MATMUL_FLOPS * n / b / 1e9,
        "loop_dispatch_us_per_update": 1e6 * (c - b) / n,
    }
    print(
        f"\nscan_train warm / B = {out['scan_train_over_hand']:.3f}; diagnostics against B: "
        f"finite flag (D/B) {out['finite_flag_ratio']:.3f}, (N,1,...) data\n(F/B) "
        f"{out['grouped_data_ratio']:.3f}, jit(scan_train) (E/B) {out['graph_ratio']:.3f}; a"
        f" direct call adds {out['python_per_call_ms']:+.2f} ms of Python checks per call (A-E"
        f" at N=10:\n{per_call['scan_train'] * 1e3:.2f} vs"
        f" {per_call['jit_scan_train'] * 1e3:.2f} ms; B {per_call['hand_scan'] * 1e3:.2f} ms).\n"
        f"per update: B computes for {out['hand_us_per_update']:.1f} us (the matmuls alone are"
        f" {MATMUL_FLOPS / 1e3:.0f} kflop, {out['hand_matmul_gflops']:.0f} GFLOP/s); the Python"
        f" loop adds\n{out['loop_dispatch_us_per_update']:.1f} us of dispatch, so C/B cannot"
        " exceed 1 + dispatch/compute whatever the scan does.\n"
    )
    return out


def goals(rows: dict, comp: dict) -> list[str]:
    a, b, c = (rows[i]["warm_s"] for i in ("scan_train", "hand_scan", "python_loop"))
    lo, hi = COMPILE_NS
    specs = [
        ("scan_train warm / hand-written scan warm", a / b, "<=", 1.05),
        ("Python loop warm / scan_train warm", c / a, ">=", 10.0),
        (f"scan_train compile (lower+compile) N={hi} / N={lo}", comp["ratio_total"], "<=", 1.2),
    ]
    lines = []
    for what, v, op, target in specs:
        ok = v <= target if op == "<=" else v >= target
        lines.append(f"{'PASS' if ok else 'MISS'}  {what} {op} {target}: got {v:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="300 updates, fewer repeats (<30 s)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for loop.json")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    t_start = time.perf_counter()

    info = machine()
    print(f"loop benchmark{' (quick)' if args.quick else ''}: {describe_machine(info)}")
    print(
        f"  MLP {FEATURES}-{HIDDEN}-{CLASSES} (tanh), batch {BATCH}, adam({LR:g}), float32, "
        f"{cfg['n']} updates; {cfg['warm_reps']} warm / {cfg['cold_reps']} cold repetitions",
        flush=True,
    )
    try:
        rows, run_info = measure(cfg)
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    comp = compile_times(cfg["compile_reps"])
    per_call = per_call_times(cfg["per_call_reps"])
    n, k = run_info["n"], run_info["loop_steps_timed"]

    print()
    print(table(rows, n, k))
    print(notes(cfg, rows, run_info, comp))
    breakdown = overhead_breakdown(rows, n, per_call)
    goal_lines = goals(rows, comp)
    print("\n".join(goal_lines))

    payload = {
        "benchmark": "loop",
        "quick": args.quick,
        "machine": info,
        "workload": {
            "mlp": [FEATURES, HIDDEN, CLASSES],
            "activation": "tanh",
            "batch": BATCH,
            "optimizer": f"adam({LR:g})",
            "dtype": "float32",
            **run_info,
        },
        "config": cfg,
        "rows": rows,
        "compile": {str(kk): v for kk, v in comp.items()},
        "breakdown": breakdown,
        "goals": goal_lines,
        "wall_s": time.perf_counter() - t_start,
    }
    path = write_json(args.out / "loop.json", payload)
    print(f"\nwrote {path} ({payload['wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
