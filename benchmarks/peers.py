"""scanfit against what a user would write instead, each in its own fresh process.

    python benchmarks/peers.py [--quick] [--reps R]

Workload: a 64-64-10 MLP (64 features, one relu hidden layer of 64, 10 classes),
softmax cross-entropy, batch 32, Adam(1e-3), float32, on synthetic data labelled
by a fixed random teacher: N microbatches x E epochs, the order reshuffled every
epoch (full: 1000 x 5 = 5000 updates; --quick: 100 x 3 = 300).

Every implementation starts from the same weights and data and runs in its own
fresh process (with JAX loaded beside it a PyTorch CPU loop ran 3x slower: the
two runtimes' thread pools fight over the cores). The parent runs the workers in
turn, A B C ... A B C ..., and reports medians. In each worker the first full
run is 'cold' (tracing and compilation included, imports not) and is never
counted as warm; the following full runs are 'warm'. The final loss is the mean
loss over the whole training set at the cold run's final weights, computed here
in NumPy (float64) the same way for every implementation, so equal work is
compared. A peer that is not installed is reported as skipped.

PyTorch runs twice: with its default thread count (torch.get_num_threads(), 2
on a 2-core machine) and with torch.set_num_threads(1); the goal is checked
against the faster. Its default threads collapse (10-20x slower) when other
work shares the cores, so an eager run stops after EAGER_RUN_CAP_S seconds and
its rate is taken from the updates done (an eager loop's cost per update is
flat: nothing compiles).

The 'limit' worker measures what this machine can do for this model: XLA's
rate on one update's own matmul shapes, chained in a lax.scan so no dispatch is
timed, as an updates/s ceiling (FLOPs per update: forward 2*B*(F*H + H*C),
backward the two weight gradients and the hidden layer's input gradient, none
for x); and, in the same process, the same scanned loop with parts left out,
which says where scanfit's time per update goes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported
from _common import RESULTS_DIR, describe_machine, format_table, machine, write_json  # noqa: E402

F, H, C, B, LR = 64, 64, 10, 32, 1e-3
FULL = {"n": 1000, "epochs": 5, "reps": 3, "warm_runs": 3, "chain": 2000, "chain_reps": 5}
QUICK = {"n": 100, "epochs": 3, "reps": 1, "warm_runs": 1, "chain": 500, "chain_reps": 3}
WARM_BUDGET_S = 8.0  # a worker stops adding warm runs (after the first) past this much
# An eager loop compiles nothing, so its time per update is flat and a run cut short
# measures the same rate; capped runs keep a PyTorch loop that thread contention slows
# 20x (default threads on a busy 2-core machine) from taking minutes.
EAGER_RUN_CAP_S = 6.0
WORKER_TIMEOUT_S = 300

# One update's matmuls (no gradient for the input x): (label, lhs shape, rhs shape, op).
MATMULS = [
    ("fwd   x @ w1", (B, F), (F, H), "nn"),
    ("fwd   h @ w2", (B, H), (H, C), "nn"),
    ("bwd   dlogits @ w2.T", (B, C), (H, C), "nt"),
    ("bwd   h.T @ dlogits", (B, H), (B, C), "tn"),
    ("bwd   x.T @ dh", (B, F), (B, H), "tn"),
]


def _flops(lhs: tuple, rhs: tuple, op: str) -> int:
    m, k = lhs[::-1] if op == "tn" else lhs
    n = rhs[0] if op == "nt" else rhs[1]
    return 2 * m * k * n


FORWARD_FLOPS = 2 * B * (F * H + H * C)  # 303,104
FLOPS_PER_UPDATE = sum(_flops(a, b, op) for _, a, b, op in MATMULS)  # 647,168: bwd 1.14x fwd

WORKERS = [
    "scanfit_fit",
    "hand_scan",
    "python_loop",
    "keras_fit_spe_epoch",
    "keras_fit_spe1",
    "torch_eager",
    "torch_eager_1t",
    "limit",
]
LABELS = {
    "scanfit_fit": "scanfit.fit (defaults, key= shuffling)",
    "hand_scan": "hand-written lax.scan (jit)",
    "python_loop": "Python loop of a jitted optax step",
    "keras_fit_spe_epoch": "Keras 3 fit (jax), steps_per_execution=epoch",
    "keras_fit_spe1": "Keras 3 fit (jax), steps_per_execution=1",
    "torch_eager": "PyTorch eager loop, default threads",
    "torch_eager_1t": "PyTorch eager loop, 1 thread",
}
# (label, peer rows, goal): scanfit warm updates/s >= goal x the best of the peer rows.
GOALS = [
    ("the Python loop of a jitted step", ["python_loop"], 15.0),
    ("the PyTorch eager loop (faster thread setting)", ["torch_eager", "torch_eager_1t"], 15.0),
    ("Keras fit, steps_per_execution = one epoch", ["keras_fit_spe_epoch"], 5.0),
]


# ------------------------------------------------------------------------------ workload


def problem(n: int):
    """n microbatches of B rows, labels from a noisy fixed random linear teacher, and the
    initial weights [w1, b1, w2, b2] (He-normal, zero biases) every implementation starts from.
    """
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(F, C))
    x = rng.normal(size=(n, B, F)).astype(np.float32)
    y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(n, B, C)), -1).astype(np.int32)
    w1 = (rng.normal(size=(F, H)) * np.sqrt(2 / F)).astype(np.float32)
    w2 = (rng.normal(size=(H, C)) * np.sqrt(2 / H)).astype(np.float32)
    return x, y, [w1, np.zeros(H, np.float32), w2, np.zeros(C, np.float32)]


def numpy_loss(weights, x, y) -> float:
    """Mean softmax cross-entropy over the whole training set, in float64."""
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in weights)
    logits = np.maximum(x.reshape(-1, F) @ w1 + b1, 0) @ w2 + b2
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(logp)), y.reshape(-1)].mean())


# ------------------------------------------------------------- workers (one per process)
# Each run_<name>(x, y, init, epochs) builds what it needs outside the clock and returns
# once(): one full training run from the initial weights, returning the final weights
# [w1, b1, w2, b2] as (in, out) arrays once the work has finished.


def _jax_parts():
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(p, batch):
        x, y = batch
        logits = jax.nn.relu(x @ p[0] + p[1]) @ p[2] + p[3]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax, jnp, optax, loss_fn


def run_scanfit_fit(x, y, init, epochs):
    jax, jnp, optax, loss_fn = _jax_parts()
    import scanfit

    data = (jnp.asarray(x), jnp.asarray(y))
    opt = optax.adam(LR)  # built once: a new optimizer object is a new program to compile

    def once():
        params = [jnp.asarray(w) for w in init]
        res = scanfit.fit(loss_fn, params, opt, data, epochs=epochs, key=jax.random.key(0))
        return jax.block_until_ready(res.params)

    return once


def _hand_scan_train(jax, jnp, optax, loss_fn, n, epochs, *, adam: bool = True):
    """jit(lax.scan) over epochs of lax.scan over updates, the order permuted in-graph per
    epoch as scanfit does it (so the two give the same result). adam=False: plain SGD, an
    ablation for the 'limit' worker."""
    opt = optax.adam(LR)

    @jax.jit
    def train(params, x, y, key):
        def update(carry, i):
            params, state = carry
            grads = jax.grad(loss_fn)(params, (x[i], y[i]))
            if not adam:
                return (jax.tree.map(lambda p, g: p - LR * g, params, grads), state), None
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        def epoch(carry, e):
            order = jax.random.permutation(jax.random.fold_in(key, e), n)
            return jax.lax.scan(update, carry, order)[0], None

        carry = (params, opt.init(params))
        return jax.lax.scan(epoch, carry, jnp.arange(epochs, dtype=jnp.int32))[0][0]

    return train


def run_hand_scan(x, y, init, epochs):
    jax, jnp, optax, loss_fn = _jax_parts()
    train = _hand_scan_train(jax, jnp, optax, loss_fn, len(x), epochs)
    data = (jnp.asarray(x), jnp.asarray(y))
    return lambda: jax.block_until_ready(
        train([jnp.asarray(w) for w in init], *data, jax.random.key(0))
    )


def run_python_loop(x, y, init, epochs):
    jax, jnp, optax, loss_fn = _jax_parts()
    opt = optax.adam(LR)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, (x, y))
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    # The loop's best case: microbatches already on the device, sliced outside the clock.
    batches = [(jnp.asarray(a), jnp.asarray(b)) for a, b in zip(x, y)]

    def once():
        params = [jnp.asarray(w) for w in init]
        state = opt.init(params)
        for e in range(epochs):
            for i in np.random.default_rng(e).permutation(len(batches)):
                params, state = step(params, state, *batches[i])
        return jax.block_until_ready(params)

    return once


def _keras(x, y, init, epochs, steps_per_execution):
    os.environ["KERAS_BACKEND"] = "jax"  # before the import; the parent sets it too
    import keras

    xs, ys = x.reshape(-1, F), y.reshape(-1)
    model = keras.Sequential(
        [keras.Input((F,)), keras.layers.Dense(H, activation="relu"), keras.layers.Dense(C)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=len(x) if steps_per_execution == "epoch" else 1,
    )

    def once():
        # Weights are reset; the optimizer's moments carry over into the warm runs, which
        # changes no work. The final loss is taken from the first (fresh) run.
        model.set_weights(init)
        model.fit(xs, ys, batch_size=B, epochs=epochs, shuffle=True, verbose=0)
        return [np.asarray(w) for w in model.get_weights()]

    return once


def run_keras_fit_spe1(x, y, init, epochs):
    return _keras(x, y, init, epochs, 1)


def run_keras_fit_spe_epoch(x, y, init, epochs):
    return _keras(x, y, init, epochs, "epoch")


def _torch(x, y, init, epochs, threads):
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    def once():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(F, H), torch.nn.ReLU(), torch.nn.Linear(H, C))
        with torch.no_grad():  # torch stores Linear weights as (out, in)
            model[0].weight.copy_(torch.from_numpy(init[0].T))
            model[0].bias.copy_(torch.from_numpy(init[1]))
            model[2].weight.copy_(torch.from_numpy(init[2].T))
            model[2].bias.copy_(torch.from_numpy(init[3]))
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        loss_fn = torch.nn.CrossEntropyLoss()
        done, t0 = 0, time.perf_counter()
        for _ in range(epochs):
            for i in torch.randperm(len(xs)).tolist():
                opt.zero_grad()
                loss_fn(model(xs[i]), ys[i]).backward()
                opt.step()
                done += 1
                if done % 100 == 0 and time.perf_counter() - t0 > EAGER_RUN_CAP_S:
                    break
            else:
                continue
            break
        layers = (model[0], model[2])
        weights = [(m.weight.detach().numpy().T, m.bias.detach().numpy()) for m in layers]
        return [a for pair in weights for a in pair], done

    return once, {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def run_torch_eager(x, y, init, epochs):
    return _torch(x, y, init, epochs, None)


def run_torch_eager_1t(x, y, init, epochs):
    return _torch(x, y, init, epochs, 1)


def _time(fn, reps: int) -> list[float]:
    """Wall times of reps calls of fn() after one untimed call; fn must block."""
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_limit(x, y, init, epochs, cfg) -> dict:
    """The ceiling (matmuls only) and, in this one process, where an update's time goes."""
    jax, jnp, optax, loss_fn = _jax_parts()
    import scanfit

    length, reps = cfg["chain"], cfg["chain_reps"]
    rng = np.random.default_rng(1)

    def mat(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    def chain_time(body, *args) -> dict:
        """Seconds per iteration of a scan whose body's input depends on the carry (a
        scalar c added to the lhs), so XLA can hoist nothing out of the loop; the body's
        result feeds c through one element (XLA keeps the full matmul: checked in its HLO)."""
        f = jax.jit(
            lambda *a: jax.lax.scan(
                lambda c, _: (c + 1e-9 * body(c, *a), None), jnp.float32(0), None, length=length
            )[0]
        )
        ts = _time(lambda: jax.block_until_ready(f(*args)), reps)
        return {"median_s": statistics.median(ts) / length, "min_s": min(ts) / length}

    ops = {
        "nn": lambda a, b: a @ b,
        "nt": lambda a, b: a @ b.T,
        "tn": lambda a, b: a.T @ b,
    }
    shapes = {}
    for label, lhs, rhs, op in MATMULS:
        t = chain_time(lambda c, a, b, f=ops[op]: f(a + c, b)[0, 0], mat(*lhs), mat(*rhs))
        shapes[label] = {**t, "flops": _flops(lhs, rhs, op)}
        shapes[label]["gflops"] = shapes[label]["flops"] / t["median_s"] / 1e9

    def whole_update(c, xb, w1, w2):  # the five matmuls in an update's own dependency order
        x = xb + c
        h = x @ w1
        out = h @ w2
        dh = out @ w2.T
        dw2 = h.T @ out
        dw1 = x.T @ dh
        return dw1[0, 0] + dw2[0, 0]

    whole = chain_time(whole_update, mat(B, F), mat(F, H), mat(H, C))
    per_shape_sum = sum(s["median_s"] for s in shapes.values())
    # The limit: the faster of the two ways XLA ran this update's matmuls.
    matmul_s = min(whole["median_s"], per_shape_sum)

    big = mat(1024, 1024)
    mm = jax.jit(lambda a: a @ a)
    big_s = statistics.median(_time(lambda: jax.block_until_ready(mm(big)), 3))

    # Ablations on the real workload, same data and shuffling, all in this process.
    n = len(x)
    data = (jnp.asarray(x), jnp.asarray(y))
    params = [jnp.asarray(w) for w in init]
    key = jax.random.key(0)
    sgd = _hand_scan_train(jax, jnp, optax, loss_fn, n, epochs, adam=False)
    adam = _hand_scan_train(jax, jnp, optax, loss_fn, n, epochs)
    opt = optax.adam(LR)
    runs = {
        "scan_sgd": lambda: jax.block_until_ready(sgd(params, *data, key)),
        "scan_adam": lambda: jax.block_until_ready(adam(params, *data, key)),
        "scanfit_fit": lambda: jax.block_until_ready(
            scanfit.fit(loss_fn, params, opt, data, epochs=epochs, key=key).params
        ),
    }
    for fn in runs.values():
        fn()  # compile all before timing any
    times = {k: [] for k in runs}
    for _ in range(max(3, cfg["warm_runs"])):  # interleaved
        for k, fn in runs.items():
            times[k].append(_timed_once(fn))
    updates = n * epochs
    per_update = {k: statistics.median(v) / updates for k, v in times.items()}
    hlo = adam.lower(params, *data, key).compile().as_text()
    return {
        "matmul_shapes": shapes,
        "whole_update_matmuls": whole,
        "per_shape_sum_s": per_shape_sum,
        "matmul_s_per_update": matmul_s,
        "matmul_gflops": FLOPS_PER_UPDATE / matmul_s / 1e9,
        "ceiling_updates_per_s": 1 / matmul_s,
        "large_matmul_gflops": 2 * 1024**3 / big_s / 1e9,
        "ablation_s_per_update": per_update,
        "chain_length": length,
        "kernels_per_update": _kernels_in_update_body(hlo),
    }


def _kernels_in_update_body(hlo: str) -> dict:
    """Ops XLA runs per update in the compiled hand-written scan: the top-level computation
    (not a fusion's own body) with the most ops that run as kernels, counted by kind."""
    free = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}
    best: dict = {}
    for comp in re.split(r"\n(?=\S)", hlo):
        if comp.startswith(("%fused", "%wrapped")) or "dot(" not in comp and "fusion(" not in comp:
            continue
        kinds: dict[str, int] = {}
        for op in re.findall(r"^\s+(?:ROOT )?%\S+ = .*? ([a-z][\w-]*)\(", comp, re.M):
            if op not in free:
                kinds[op] = kinds.get(op, 0) + 1
        if "while" not in kinds and sum(kinds.values()) > sum(best.values()):
            best = kinds
    return best


def _timed_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def worker(name: str, n: int, epochs: int, cfg: dict) -> dict:
    x, y, init = problem(n)
    t = time.perf_counter()
    try:
        if name == "limit":
            return {"name": name, **run_limit(x, y, init, epochs, cfg)}
        built = globals()[f"run_{name}"](x, y, init, epochs)
    except ImportError as err:
        return {"name": name, "skipped": f"{type(err).__name__}: {err}"}
    once, extra = built if isinstance(built, tuple) else (built, {})
    setup = time.perf_counter() - t  # imports and building the model, not timed as cold
    total = n * epochs

    def run() -> tuple[float, list, int]:
        t = time.perf_counter()
        out = once()
        weights, done = out if isinstance(out, tuple) else (out, total)  # eager: maybe capped
        return time.perf_counter() - t, weights, done

    cold, weights, cold_done = run()
    warm, warm_all, capped = [], [], cold_done < total  # s per update; s per run
    while len(warm) < cfg["warm_runs"] and (not warm or sum(warm_all) < WARM_BUDGET_S):
        seconds, _, done = run()
        warm.append(seconds / done)
        warm_all.append(seconds)
        capped |= done < total
    return {
        "name": name,
        "setup_s": setup,
        "cold_s": cold * total / cold_done,  # a capped cold run scaled to the whole run
        "cold_updates_run": cold_done,
        "warm_s": statistics.median(warm) * total,  # as for the whole run of `total` updates
        "warm_all_s": warm_all,
        "capped": capped,
        "updates": total,
        # Only a complete run did equal work; a capped one has no comparable final loss.
        "final_loss": numpy_loss(weights, x, y) if cold_done == total else None,
        **extra,
    }


# ---------------------------------------------------------------------------- parent


def spawn(name: str, n: int, epochs: int, quick: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    cmd += ["--n", str(n), "--epochs", str(epochs)] + (["--quick"] if quick else [])
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env
        )
    except subprocess.TimeoutExpired:
        return {"name": name, "failed": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {"name": name, "failed": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="300 updates, one repetition (<60 s)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of every worker")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    n, epochs = args.n or cfg["n"], args.epochs or cfg["epochs"]
    if args.worker:
        print(json.dumps(worker(args.worker, n, epochs, cfg)))
        return 0
    reps = args.reps or cfg["reps"]

    t0 = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)
    print(
        f"peers benchmark{' (quick)' if args.quick else ''}: MLP {F}-{H}-{C} (relu), batch {B},"
        f" adam({LR:g}), float32, {n} microbatches x {epochs} epochs = {n * epochs} updates;"
        f" {len(WORKERS)} workers x {reps} repetition(s), each in a fresh process "
        f"(load {load_start})",
        flush=True,
    )
    results: dict[str, list[dict]] = {w: [] for w in WORKERS}
    for rep in range(reps):
        for name in WORKERS:
            results[name].append(spawn(name, n, epochs, args.quick))
        print(f"  repetition {rep + 1}/{reps} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return report(results, cfg, n, epochs, reps, args.quick, t0, load_start)


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    rows = {}
    for name, runs in results.items():
        if name == "limit":
            continue
        failed = [r["failed"] for r in runs if "failed" in r]
        if failed:
            rows[name] = {"failed": failed[0]}
        elif any("skipped" in r for r in runs):
            rows[name] = {"skipped": next(r["skipped"] for r in runs if "skipped" in r)}
        else:
            warm = statistics.median(r["warm_s"] for r in runs)
            extra = {k: runs[0][k] for k in ("torch_threads", "torch") if k in runs[0]}
            rows[name] = {
                "label": LABELS[name],
                "warm_updates_per_s": runs[0]["updates"] / warm,
                "warm_s": warm,
                "us_per_update": 1e6 * warm / runs[0]["updates"],
                "cold_s": statistics.median(r["cold_s"] for r in runs),
                "setup_s": statistics.median(r["setup_s"] for r in runs),
                "final_loss": next(
                    (r["final_loss"] for r in runs if r["final_loss"] is not None), None
                ),
                "capped": any(r["capped"] for r in runs),
                "warm_s_per_process": [r["warm_s"] for r in runs],
                "cold_s_per_process": [r["cold_s"] for r in runs],
                **extra,
            }
    return rows


def summarize_limit(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "ceiling_updates_per_s" in r]
    if not ok:
        return None
    med = lambda f: statistics.median(f(r) for r in ok)  # noqa: E731
    return {
        "ceiling_updates_per_s": med(lambda r: r["ceiling_updates_per_s"]),
        "matmul_s_per_update": med(lambda r: r["matmul_s_per_update"]),
        "matmul_gflops": med(lambda r: r["matmul_gflops"]),
        "whole_update_matmuls_s": med(lambda r: r["whole_update_matmuls"]["median_s"]),
        "per_shape_sum_s": med(lambda r: r["per_shape_sum_s"]),
        "large_matmul_gflops": med(lambda r: r["large_matmul_gflops"]),
        "matmul_shapes": {
            label: {
                "s": med(lambda r, k=label: r["matmul_shapes"][k]["median_s"]),
                "gflops": med(lambda r, k=label: r["matmul_shapes"][k]["gflops"]),
                "flops": ok[0]["matmul_shapes"][label]["flops"],
            }
            for label in ok[0]["matmul_shapes"]
        },
        "ablation_s_per_update": {
            k: med(lambda r, k=k: r["ablation_s_per_update"][k])
            for k in ok[0]["ablation_s_per_update"]
        },
        "kernels_per_update": ok[0].get("kernels_per_update", {}),
        "per_process": ok,
    }


def profile(rows: dict, lim: dict | None, updates: int) -> tuple[list[str], dict]:
    """Where the time per update goes, from the 'limit' worker's one-process ablations and
    the peers' own per-update times."""
    if lim is None:
        return ["profile: the limit worker failed; no ceiling"], {}
    us = lambda s: 1e6 * s  # noqa: E731
    ab = lim["ablation_s_per_update"]
    mm, sgd = lim["matmul_s_per_update"], ab["scan_sgd"]
    adam, fit = ab["scan_adam"], ab["scanfit_fit"]
    kernels = lim.get("kernels_per_update", {})
    out = {
        "scanfit_us_per_update_same_process": us(fit),
        "matmuls_us": us(mm),
        "rest_of_forward_backward_us": us(sgd - mm),
        "adam_us": us(adam - sgd),
        "scanfit_over_hand_scan_us": us(fit - adam),
        "matmul_share_of_scanfit": mm / fit,
        "scanfit_fixed_ms_per_call": 1e3 * (fit - adam) * updates,
        "kernels_per_update": kernels,
    }
    w = 48
    lines = [
        "where scanfit's time per update goes (the 'limit' worker: one process, ablations of"
        " the same scanned loop):",
        f"  {'the 5 matmuls, at the rate XLA reaches for them':<{w}}{us(mm):6.2f} us  "
        f"{100 * mm / fit:3.0f}%  ({FLOPS_PER_UPDATE / 1e3:.0f} kFLOP at "
        f"{lim['matmul_gflops']:.0f} GFLOP/s)",
        f"  {'rest of fwd+bwd+SGD (gather, bias, relu, CE)':<{w}}{us(sgd - mm):6.2f} us"
        f"  {100 * (sgd - mm) / fit:3.0f}%  (scan with SGD: {us(sgd):.2f} us)",
        f"  {'Adam instead of SGD':<{w}}{us(adam - sgd):6.2f} us  {100 * (adam - sgd) / fit:3.0f}%"
        f"  (hand-written scan: {us(adam):.2f} us)",
        f"  {'scanfit.fit over the hand-written scan':<{w}}{us(fit - adam):6.2f} us"
        f"  {100 * (fit - adam) / fit:3.0f}%  (= {out['scanfit_fixed_ms_per_call']:.1f} ms per"
        " call of fit: its host work, ~1-2 ms in fit.py, and what its compiled chunks"
        " do beyond the hand scan: loss history, finite flag)",
        f"  {'scanfit.fit, this process':<{w}}{us(fit):6.2f} us",
    ]
    if kernels:
        n_k = sum(kernels.values())
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]))
        small = max(1, n_k - len(MATMULS))
        lines.append(
            f"  XLA runs {n_k} ops per update in the compiled loop body ({kinds}); the"
            f" {us(adam - mm):.1f} us that are not\n  matmuls are spread over the ~{small}"
            f" small elementwise ones, {us(adam - mm) / small:.2f} us each on average"
        )
    lines.append(
        f"  matmul rate: {lim['matmul_gflops']:.0f} GFLOP/s at these shapes vs"
        f" {lim['large_matmul_gflops']:.0f} GFLOP/s for a 1024x1024 matmul; each shape"
        " chained alone (us, GFLOP/s):"
    )
    for label, sh in lim["matmul_shapes"].items():
        lines.append(f"    {label:<24}{us(sh['s']):6.2f} {sh['gflops']:6.1f}")
    lines.append(
        f"    sum {us(lim['per_shape_sum_s']):.2f} us; all five in one scan body"
        f" {us(lim['whole_update_matmuls_s']):.2f} us (the ceiling takes the faster)"
    )
    per = {k: r["us_per_update"] for k, r in rows.items() if "us_per_update" in r}
    hand = per.get("hand_scan")
    if hand and "python_loop" in per:
        d = out["python_loop_dispatch_us"] = per["python_loop"] - hand
        lines.append(
            f"peers: the Python loop of a jitted step costs {per['python_loop']:.1f} us per"
            f" update, {d:.1f} us of it dispatch (over the hand-written scan's {hand:.1f})."
        )
    if hand and "keras_fit_spe_epoch" in per:
        d = out["keras_spe_epoch_overhead_us"] = per["keras_fit_spe_epoch"] - hand
        lines.append(
            f"  Keras fit with steps_per_execution=epoch: {per['keras_fit_spe_epoch']:.1f} us"
            f" per update, {d:.1f} us over the scan: Keras' JAX\n  backend runs"
            " steps_per_execution as a Python for-loop over a jitted train_step"
            " (keras/src/backend/jax/trainer.py),\n  so every step is still dispatched, and"
            " each batch is sliced on the host and transferred."
        )
    torch_rows = {k: per[k] for k in ("torch_eager", "torch_eager_1t") if k in per}
    if torch_rows:
        lines.append(
            "  PyTorch eager: "
            + ", ".join(f"{LABELS[k].split(', ')[1]} {v:.0f} us" for k, v in torch_rows.items())
            + " per update (about 10 small ops forward, backward and Adam, each dispatched"
            " from Python)."
        )
    return lines, out


def goal_lines(rows: dict, lim: dict | None) -> tuple[list[str], list[dict]]:
    ours = rows.get("scanfit_fit", {}).get("warm_updates_per_s")
    lines, recs = [], []
    for label, names, goal in GOALS:
        avail = [rows[k] for k in names if "warm_updates_per_s" in rows.get(k, {})]
        if ours is None or not avail:
            lines.append(f"SKIP  scanfit warm >= {goal:g}x {label}: not measured")
            recs.append({"goal": label, "target": goal, "verdict": "SKIP"})
            continue
        best = max(r["warm_updates_per_s"] for r in avail)
        got = ours / best
        verdict = "PASS" if got >= goal else "MISS"
        line = f"{verdict}  scanfit warm >= {goal:g}x {label}: got {got:.1f}x"
        rec = {"goal": label, "target": goal, "got": got, "verdict": verdict}
        if lim is not None:
            bound = lim["ceiling_updates_per_s"] / best  # scanfit at the matmul limit
            rec["bound_at_matmul_ceiling"] = bound
            line += f" (at the matmul ceiling it would be {bound:.1f}x"
            line += ": out of reach on this machine)" if bound < goal else ")"
        lines.append(line)
        recs.append(rec)
    return lines, recs


def table(rows: dict, lim: dict | None) -> str:
    ours = rows.get("scanfit_fit", {}).get("warm_updates_per_s")
    body = []
    for name, r in rows.items():
        if "warm_updates_per_s" not in r:
            why = "skipped" if "skipped" in r else "FAILED"
            body.append([LABELS[name], why, "", "", "", ""])
            continue
        ratio = f"{ours / r['warm_updates_per_s']:.1f}x" if ours else "-"
        body.append(
            [
                LABELS[name],
                f"{r['warm_updates_per_s']:,.0f}",
                f"{r['us_per_update']:.1f}",
                f"{r['cold_s']:.2f}" + ("*" if r.get("capped") else ""),
                ratio,
                "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}",
            ]
        )
    if lim is not None:
        c = lim["ceiling_updates_per_s"]
        body.append(
            [
                "machine limit: the update's matmuls only (XLA)",
                f"{c:,.0f}",
                f"{1e6 / c:.1f}",
                "",
                f"at {100 * ours / c:.0f}%" if ours else "-",
                "",
            ]
        )
    headers = ["implementation", "warm upd/s", "us/upd", "cold s", "scanfit/peer", "final loss"]
    text = format_table(headers, body)
    if any(r.get("capped") for r in rows.values()):
        text += (
            f"\n* runs stopped at {EAGER_RUN_CAP_S:g} s (an eager loop's time per update is flat):"
            " rates from the updates done, cold scaled\n  to the whole run, final loss only"
            " from a complete run"
        )
    return text


def report(results, cfg, n, epochs, reps, quick, t0, load_start) -> int:
    rows = summarize(results)
    lim = summarize_limit(results["limit"])
    limit_failed = [r["failed"] for r in results["limit"] if "failed" in r]
    for name, r in rows.items():
        if "failed" in r:
            print(f"worker {name} FAILED: {r['failed']}", file=sys.stderr)
    if limit_failed:
        print(f"worker limit FAILED: {limit_failed[0]}", file=sys.stderr)

    prof_lines, prof = profile(rows, lim, n * epochs)
    goals, goal_recs = goal_lines(rows, lim)
    print()
    print("\n".join(prof_lines))
    initial = numpy_loss(problem(n)[2], *problem(n)[:2])
    fit_row, hand_row = rows.get("scanfit_fit", {}), rows.get("hand_scan", {})
    notes = [
        f"\nwarm: median over {reps} process(es) of each process's median of up to "
        f"{cfg['warm_runs']} runs after its cold run; cold: the first run, compilation "
        "included, imports not.",
        f"final loss: mean cross-entropy over all {n * B} training rows at the cold run's "
        f"weights (initial {initial:.4f}).",
    ]
    if "final_loss" in fit_row and "final_loss" in hand_row:
        same = abs(fit_row["final_loss"] - hand_row["final_loss"]) / hand_row["final_loss"]
        notes.append(
            f"scanfit.fit and the hand-written scan use the same shuffling: rel diff of their "
            f"final losses {same:.1e}."
        )
    threads = {r["torch_threads"] for r in rows.values() if "torch_threads" in r}
    if threads:
        default = rows.get("torch_eager", {}).get("torch_threads")
        notes.append(
            f"PyTorch threads: default = torch.get_num_threads() = {default} here; the 1-thread "
            "row calls torch.set_num_threads(1)."
        )
    print("\n".join(notes))
    print()
    print("\n".join(goals))

    ours = fit_row.get("warm_updates_per_s")
    info = machine()
    payload = {
        "benchmark": "peers",
        "quick": quick,
        "machine": info,
        "loadavg_1min_start": load_start,
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "workload": {
            "mlp": [F, H, C],
            "activation": "relu",
            "batch": B,
            "optimizer": f"adam({LR:g})",
            "dtype": "float32",
            "microbatches": n,
            "epochs": epochs,
            "initial_loss": initial,
        },
        "updates": n * epochs,
        "reps": reps,
        "config": cfg,
        "rows": rows,
        "ceiling_updates_per_s": lim["ceiling_updates_per_s"] if lim else None,
        "scanfit_fraction_of_ceiling": (ours / lim["ceiling_updates_per_s"])
        if lim and ours
        else None,
        "flops_per_update": FLOPS_PER_UPDATE,
        "forward_flops_per_update": FORWARD_FLOPS,
        "limit": lim,
        "profile": prof,
        "goals": goal_recs,
        "wall_s": time.perf_counter() - t0,
    }
    path = write_json(RESULTS_DIR / "peers.json", payload)
    png = chart(rows, lim, RESULTS_DIR / "peers.png", n * epochs)
    print(f"\n{describe_machine(info)}")
    print(f"wrote {path}" + (f" and {png}" if png else "") + f" ({payload['wall_s']:.0f} s)\n")
    print(table(rows, lim))
    failed = any("failed" in r for r in rows.values()) or bool(limit_failed)
    return 1 if failed else 0


def chart(rows: dict, lim: dict | None, path: Path, updates: int) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [k for k, r in rows.items() if "warm_updates_per_s" in r]
    values = [rows[k]["warm_updates_per_s"] for k in names]
    colors = ["tab:blue" if k == "scanfit_fit" else "tab:gray" for k in names]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.6))
    bars = ax.barh([LABELS[k] for k in names], values, color=colors)
    ours = rows.get("scanfit_fit", {}).get("warm_updates_per_s")
    for bar, v in zip(bars, values):
        note = f" {v:,.0f}" + (f"  (scanfit {ours / v:.1f}x)" if ours and v != ours else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
    if lim is not None:
        ax.axvline(lim["ceiling_updates_per_s"], color="tab:red", ls="--", label="matmul limit")
        ax.legend(loc="lower right", fontsize=8)
    top = max(values + ([lim["ceiling_updates_per_s"]] if lim else []))
    ax.set_xlim(0, top * 1.35)
    ax.set(
        xlabel="updates/s, warm (higher is better)",
        title=f"64-64-10 MLP, batch 32, Adam, {updates} updates, CPU",
    )
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
