"""scanfit against what a user would write instead, each in its own fresh process.

    python benchmarks/peers.py [--quick] [--reps R]

Workload: a 64-64-10 MLP (64 features, one relu hidden layer of 64, 10 classes),
softmax cross-entropy, batch 32, Adam(1e-3), float32, N microbatches x E epochs
with the microbatch order reshuffled every epoch (full: 1000 x 5 = 5000 updates).
Every implementation starts from the same initial weights and data and is timed
in its own process (with JAX loaded beside it a PyTorch CPU loop ran 3x slower:
the two runtimes' thread pools fight over the cores); the processes run in turn,
A B C ... A B C ..., and the median is reported. In each process the first run
is 'cold' (compilation included) and gives the final loss; a second identical
run is 'warm'. The final loss is computed by this script, in NumPy, from each
implementation's final weights, so the comparison is of equal work.

A last worker measures the machine's limit for this model: the rate XLA reaches
on the update's own matmul shapes inside a lax.scan (no dispatch), turned into
an updates/s ceiling from the model's FLOPs per update.
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

F, H, C, B, LR = 64, 64, 10, 32, 1e-3
FLOPS_PER_UPDATE = 2 * B * (F * H + H * C) + 2 * (H * B * C + B * C * H + F * B * H)
WORKERS = [
    "scanfit_fit",
    "hand_scan",
    "python_loop",
    "keras_fit_spe_epoch",
    "keras_fit_spe1",
    "torch_eager",
    "ceiling",
]
LABELS = {
    "scanfit_fit": "scanfit.fit",
    "hand_scan": "hand-written lax.scan",
    "python_loop": "Python loop of a jitted optax step",
    "keras_fit_spe_epoch": "Keras 3 fit, steps_per_execution=epoch",
    "keras_fit_spe1": "Keras 3 fit, steps_per_execution=1",
    "torch_eager": "PyTorch eager loop",
}


def problem(n: int):
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(F, C))
    x = rng.normal(size=(n, B, F)).astype(np.float32)
    y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(n, B, C)), -1).astype(np.int32)
    w1 = (rng.normal(size=(F, H)) * np.sqrt(2 / F)).astype(np.float32)
    w2 = (rng.normal(size=(H, C)) * np.sqrt(2 / H)).astype(np.float32)
    return x, y, [w1, np.zeros(H, np.float32), w2, np.zeros(C, np.float32)]


def numpy_loss(weights, x, y) -> float:
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in weights)
    logits = np.maximum(x.reshape(-1, F) @ w1 + b1, 0) @ w2 + b2
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(logp)), y.reshape(-1)].mean())


# ---------------------------------------------------------------- workers (one per process)


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
        res = scanfit.fit(
            loss_fn,
            [jnp.asarray(w) for w in init],
            opt,
            data,
            epochs=epochs,
            key=jax.random.key(0),
            progress=False,
        )
        return jax.block_until_ready(res.params)

    return once


def run_hand_scan(x, y, init, epochs):
    jax, jnp, optax, loss_fn = _jax_parts()
    opt = optax.adam(LR)
    n = len(x)

    @jax.jit
    def train(params, x, y, key):
        def update(carry, i):
            params, state = carry
            grads = jax.grad(loss_fn)(params, (x[i], y[i]))
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        def epoch(carry, e):
            order = jax.random.permutation(jax.random.fold_in(key, e), n)
            return jax.lax.scan(update, carry, order)[0], None

        return jax.lax.scan(epoch, (params, opt.init(params)), jnp.arange(epochs))[0][0]

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

    batches = [(jnp.asarray(a), jnp.asarray(b)) for a, b in zip(x, y)]  # outside the clock
    orders = [np.random.default_rng(e).permutation(len(x)) for e in range(epochs)]

    def once():
        params = [jnp.asarray(w) for w in init]
        state = opt.init(params)
        for order in orders:
            for i in order:
                params, state = step(params, state, *batches[i])
        return jax.block_until_ready(params)

    return once


def _keras(x, y, init, epochs, steps_per_execution):
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    xs, ys = x.reshape(-1, F), y.reshape(-1)
    spe = len(x) if steps_per_execution == "epoch" else 1
    model = keras.Sequential(
        [keras.Input((F,)), keras.layers.Dense(H, activation="relu"), keras.layers.Dense(C)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        steps_per_execution=spe,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def once():
        model.set_weights(init)
        model.fit(xs, ys, batch_size=B, epochs=epochs, shuffle=True, verbose=0)
        return [np.asarray(w) for w in model.get_weights()]

    return once


def run_keras_fit_spe1(x, y, init, epochs):
    return _keras(x, y, init, epochs, 1)


def run_keras_fit_spe_epoch(x, y, init, epochs):
    return _keras(x, y, init, epochs, "epoch")


def run_torch_eager(x, y, init, epochs):
    import torch

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
        for _ in range(epochs):
            for i in torch.randperm(len(xs)).tolist():
                opt.zero_grad()
                loss_fn(model(xs[i]), ys[i]).backward()
                opt.step()
        return [
            model[0].weight.detach().numpy().T,
            model[0].bias.detach().numpy(),
            model[2].weight.detach().numpy().T,
            model[2].bias.detach().numpy(),
        ]

    return once


def run_ceiling(reps: int) -> dict:
    """Matmul FLOP/s XLA reaches at one update's shapes, dispatch excluded."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    xb, w1, w2 = (
        jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((B, F), (F, H), (H, C))
    )

    @jax.jit
    def matmuls(xb, w1, w2):
        def body(c, _):
            x = xb + c  # depends on the carry, so nothing is hoisted out of the loop
            h = x @ w1
            out = h @ w2
            dh = out @ w2.T  # backward: input gradient of layer 2
            dw2 = h.T @ out  # weight gradients
            dw1 = x.T @ dh
            return c + 1e-9 * (dw1[0, 0] + dw2[0, 0]), None

        return jax.lax.scan(body, jnp.float32(0), None, length=2000)[0]

    jax.block_until_ready(matmuls(xb, w1, w2))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(matmuls(xb, w1, w2))
        times.append(time.perf_counter() - t)
    per = statistics.median(times) / 2000
    return {
        "seconds_per_update_matmuls": per,
        "gflops": FLOPS_PER_UPDATE / per / 1e9,
        "ceiling_updates_per_s": 1 / per,
    }


def worker(name: str, n: int, epochs: int) -> dict:
    if name == "ceiling":
        return {"name": name, **run_ceiling(5)}
    x, y, init = problem(n)
    try:
        once = globals()[f"run_{name}"](x, y, init, epochs)
    except ImportError as err:
        return {"name": name, "skipped": f"{type(err).__name__}: {err}"}
    t = time.perf_counter()
    weights = once()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    once()
    warm = time.perf_counter() - t
    return {
        "name": name,
        "cold_s": cold,
        "warm_s": warm,
        "updates": n * epochs,
        "final_loss": numpy_loss(weights, x, y),
    }


# ---------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="300 updates, one repetition")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.epochs)))
        return 0
    n, epochs, reps = (100, 3, 1) if args.quick else (1000, 5, 3)
    reps = args.reps or reps
    results: dict[str, list[dict]] = {w: [] for w in WORKERS}
    t0 = time.perf_counter()
    for rep in range(reps):
        for name in WORKERS:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    "--n",
                    str(n),
                    "--epochs",
                    str(epochs),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode:
                print(f"worker {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"repetition {rep + 1}/{reps} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return report(results, n, epochs, reps, args.quick)


def report(results, n, epochs, reps, quick) -> int:
    ceiling = statistics.median(r["ceiling_updates_per_s"] for r in results.pop("ceiling"))
    rows = {}
    for name, runs in results.items():
        if "skipped" in runs[0]:
            rows[name] = {"skipped": runs[0]["skipped"]}
            continue
        warm = statistics.median(r["warm_s"] for r in runs)
        rows[name] = {
            "warm_updates_per_s": runs[0]["updates"] / warm,
            "warm_s": warm,
            "cold_s": statistics.median(r["cold_s"] for r in runs),
            "final_loss": runs[0]["final_loss"],
        }
    ours = rows["scanfit_fit"]["warm_updates_per_s"]
    print(
        f"\n{n} microbatches x {epochs} epochs = {n * epochs} updates, median of {reps}; "
        "each implementation in its own process"
    )
    print(
        f"{'implementation':<42}{'warm upd/s':>12}{'cold s':>9}{'scanfit x':>11}{'final loss':>12}"
    )
    for name, row in rows.items():
        if "skipped" in row:
            print(f"{LABELS[name]:<42}{'skipped (' + row['skipped'][:40] + ')':>44}")
            continue
        row["scanfit_speedup"] = ours / row["warm_updates_per_s"]
        print(
            f"{LABELS[name]:<42}{row['warm_updates_per_s']:>12,.0f}{row['cold_s']:>9.2f}"
            f"{row['scanfit_speedup']:>10.1f}x{row['final_loss']:>12.4f}"
        )
    fraction = ours / ceiling
    print(
        f"{'machine limit (matmuls only, XLA)':<42}{ceiling:>12,.0f}"
        f"   scanfit reaches {100 * fraction:.0f}% of it "
        f"({FLOPS_PER_UPDATE / 1e3:.0f} kFLOP per update)"
    )
    goals = [
        ("Python loop of a jitted step", "python_loop", 15),
        ("PyTorch eager loop", "torch_eager", 15),
        ("Keras fit, steps_per_execution=epoch", "keras_fit_spe_epoch", 5),
    ]
    for label, name, goal in goals:
        row = rows[name]
        if "skipped" in row:
            print(f"SKIP  scanfit vs {label}: peer not installed")
            continue
        verdict = "PASS" if row["scanfit_speedup"] >= goal else "MISS"
        print(f"{verdict}  scanfit warm >= {goal}x {label}: got {row['scanfit_speedup']:.1f}x")
    out = {
        "quick": quick,
        "updates": n * epochs,
        "reps": reps,
        "rows": rows,
        "ceiling_updates_per_s": ceiling,
        "scanfit_fraction_of_ceiling": fraction,
        "flops_per_update": FLOPS_PER_UPDATE,
        "machine": machine(),
    }
    write_json(RESULTS_DIR / "peers.json", out)
    chart(rows, ceiling, RESULTS_DIR / "peers.png")
    return 0


def chart(rows, ceiling, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [n for n, r in rows.items() if "skipped" not in r]
    values = [rows[n]["warm_updates_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh(
        [LABELS[n] for n in names], values, color=["tab:blue"] + ["tab:gray"] * (len(names) - 1)
    )
    ax.axvline(ceiling, color="tab:red", ls="--", label="matmul limit (XLA)")
    ax.set(
        xlabel="updates/s (warm, higher is better)",
        title="64-64-10 MLP, batch 32, Adam, 2-core CPU",
    )
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
