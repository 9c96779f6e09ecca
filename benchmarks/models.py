"""Models with state: the NNX tutorial CNN with BatchNorm and Dropout, and the cost of state.

    python benchmarks/models.py [--quick]

1. The Flax NNX MNIST tutorial's CNN (conv 32 and 64 3x3, average pools, dense
   256, dense 10) with BatchNorm after each conv and Dropout before the last
   layer, on scikit-learn's 8x8 digits, batch 32, adamw: ``scanfit.fit`` with
   the module passed as it is against the NNX tutorial loop (``nnx.jit`` step,
   ``nnx.Optimizer(model, tx, wrt=nnx.Param)``), alternated in one process,
   each from a fresh clone of the same module, warm (compiled beforehand),
   median of several runs; held-out accuracy of each (``model.eval()``).
2. The cost of carrying model state: ``scan_train`` on the loop suite's MLP
   with a BatchNorm-sized state passed through untouched, against the same
   MLP without it (goal: within 1.05x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from _common import RESULTS_DIR, describe_machine, format_table, machine, write_json

import scanfit

QUICK = {"epochs": 1, "reps": 3, "mlp_updates": 2000, "mlp_reps": 5}
FULL = {"epochs": 5, "reps": 5, "mlp_updates": 20000, "mlp_reps": 9}


def digits():
    """Standardised 8x8 digits as NHWC images, split 80/20 as examples/digits_mlp.py does."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from digits_mlp import load_digits, microbatches, split_and_standardise

    (xt, yt), (xv, yv) = split_and_standardise(*load_digits())
    xb, yb = microbatches(xt, yt)
    return (xb.reshape(*xb.shape[:2], 8, 8, 1), yb), (xv.reshape(-1, 8, 8, 1), yv)


def make_cnn():
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 32, (3, 3), use_bias=False, rngs=rngs)
            self.bn1 = nnx.BatchNorm(32, rngs=rngs)
            self.conv2 = nnx.Conv(32, 64, (3, 3), use_bias=False, rngs=rngs)
            self.bn2 = nnx.BatchNorm(64, rngs=rngs)
            self.linear1 = nnx.Linear(2 * 2 * 64, 256, rngs=rngs)
            self.dropout = nnx.Dropout(0.2, rngs=rngs)
            self.linear2 = nnx.Linear(256, 10, rngs=rngs)

        def __call__(self, x):
            pool = lambda h: nnx.avg_pool(h, window_shape=(2, 2), strides=(2, 2))  # noqa: E731
            x = pool(nnx.relu(self.bn1(self.conv1(x))))
            x = pool(nnx.relu(self.bn2(self.conv2(x))))
            x = x.reshape(x.shape[0], -1)
            return self.linear2(self.dropout(nnx.relu(self.linear1(x))))

    return CNN(nnx.Rngs(params=0, dropout=1))


def cnn_loss(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def held_out_accuracy(model, x, y) -> float:
    model.eval()
    acc = float(jnp.mean(jnp.argmax(model(jnp.asarray(x)), -1) == y))
    model.train()
    return acc


def cnn_rows(cfg: dict) -> dict:
    from flax import nnx

    train, (xv, yv) = digits()
    train = jax.tree.map(jnp.asarray, train)
    n = len(train[0])
    tx = optax.adamw(1e-3)
    template = make_cnn()

    def run_scanfit():
        model = nnx.clone(template)
        res = scanfit.fit(cnn_loss, model, tx, train, epochs=cfg["epochs"], progress=False)
        jax.block_until_ready(res.params)
        return model

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(cnn_loss)(model, batch)
        optimizer.update(model, grads)
        return loss

    batches = [(train[0][i], train[1][i]) for i in range(n)]

    def run_tutorial():
        model = nnx.clone(template)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        for _ in range(cfg["epochs"]):
            for batch in batches:
                loss = step(model, optimizer, batch)
        jax.block_until_ready(loss)
        return model

    runs = {"scanfit_fit": run_scanfit, "nnx_tutorial_loop": run_tutorial}
    times = {name: [] for name in runs}
    models = {name: run() for name, run in runs.items()}  # warm-up: compile both
    for _ in range(cfg["reps"]):  # alternated, so drifting machine load hits both
        for name, run in runs.items():
            t0 = time.perf_counter()
            models[name] = run()
            times[name].append(time.perf_counter() - t0)
    updates = cfg["epochs"] * n
    return {
        name: {
            "updates": updates,
            "median_s": statistics.median(ts),
            "warm_updates_per_s": updates / statistics.median(ts),
            "held_out_accuracy": held_out_accuracy(models[name], xv, yv),
        }
        for name, ts in times.items()
    }


def state_overhead(cfg: dict) -> dict:
    from loop import HIDDEN, init_params, make_data, make_loss

    xs, ys = (jnp.asarray(a) for a in make_data(cfg["mlp_updates"]))
    params, loss = init_params(), make_loss()
    stats = {"mean": jnp.zeros(HIDDEN), "var": jnp.ones(HIDDEN)}

    def with_state(p, s, batch, rng):
        return loss(p, batch), s

    opt = optax.adam(1e-3)
    runs = {
        "plain": lambda: scanfit.scan_train(loss, params, opt, (xs, ys)).params,
        "with_state": lambda: (
            scanfit.scan_train(with_state, params, opt, (xs, ys), model_state=stats).params
        ),
    }
    times = {name: [] for name in runs}
    for run in runs.values():
        jax.block_until_ready(run())
    for _ in range(cfg["mlp_reps"]):
        for name, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"median_s": med, "ratio": med["with_state"] / med["plain"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one epoch, fewer repeats")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for models.json")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    info = machine()
    print(f"models benchmark{' (quick)' if args.quick else ''}: {describe_machine(info)}")
    payload = {"benchmark": "models", "quick": args.quick, "machine": info, "config": cfg}
    try:
        import flax.nnx  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as err:
        print(f"  NNX CNN: skipped ({err.name} is not installed: pip install -e '.[examples]')")
    else:
        rows = cnn_rows(cfg)
        base = rows["nnx_tutorial_loop"]["warm_updates_per_s"]
        print(f"  NNX CNN with BatchNorm + Dropout, digits 8x8, batch 32, adamw, {cfg['epochs']} "
              f"epoch(s), median of {cfg['reps']}, alternated")  # fmt: skip
        print(format_table(
            ["implementation", "updates/s", "vs NNX loop", "held-out acc"],
            [[n, f"{r['warm_updates_per_s']:,.0f}", f"{r['warm_updates_per_s'] / base:.2f}x",
              f"{r['held_out_accuracy']:.4f}"] for n, r in rows.items()],
        ))  # fmt: skip
        payload["cnn"] = rows
    overhead = state_overhead(cfg)
    print(f"  MLP scan_train carrying an unused BatchNorm state / without: "
          f"{overhead['ratio']:.3f}x (goal <= 1.05x), {cfg['mlp_updates']} updates, "
          f"median of {cfg['mlp_reps']}")  # fmt: skip
    payload["state_overhead"] = overhead
    path = write_json(args.out / "models.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
