"""CNNs on CPU (issue 12): scanfit against a loop of jitted steps, the NNX tutorial and Keras.

    python benchmarks/conv.py [--quick] [--reps R] [--epochs E]

Workloads, on scikit-learn's 8x8 digits (standardised, batch 32, float32, adamw(5e-3)):
1. cnn: the Flax NNX MNIST tutorial's CNN (conv 32 and conv 64, 3x3 SAME, relu, 2x2
   average pools, dense 256, dense 10), channels-last (NHWC / HWIO).
2. nchw: the same layers written channels-first with lax.conv (NCHW / OIHW), pure JAX.

Rows, all training the same loss on the same microbatches in the same order:
- scan_train / fit: scanfit as shipped, the NNX model in the functional form
  ``graphdef, params = nnx.split(model, nnx.Param)`` (like the jit loop), and
  scan_train given the NNX module as it is;
- scan without the rewrite: scanfit's own program compiled without canonical_convs,
  i.e. what XLA:CPU makes of convolutions in a loop body (jax-ml/jax#12868);
- jit loop: a Python loop of a ``jax.jit`` step (optax);
- NNX loop: the tutorial's loop, an ``nnx.jit`` step with
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (metrics left out);
- Keras fit: Keras 3 (jax backend) ``fit`` with ``steps_per_execution`` = one epoch
  (skipped, with the reason, when keras is not installed).
Rows alternate within one process (A B C ... A B C), warm (compilation excluded), and
the median of the repetitions is reported as updates/s and as a ratio to the jit loop.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported, if it is

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, describe_machine, format_table, machine, write_json  # noqa: E402

import scanfit  # noqa: E402
from scanfit import _loop  # noqa: E402

BATCH, LR = 32, 5e-3
GOALS = {  # (workload, row, baseline row): the least ratio that issue 12 asks for
    ("cnn", "scan_train", "jit loop"): 1.0,
    ("cnn", "scan_train", "NNX loop"): 1.2,
    ("nchw", "scan_train", "jit loop"): 1.0,
}


def digits() -> tuple[np.ndarray, np.ndarray]:
    """x (N, 32, 8, 8, 1) float32 standardised, y (N, 32) int32: all full microbatches."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data - d.data.mean(0)) / np.where(d.data.std(0) > 0, d.data.std(0), 1.0)
    n = len(x) // BATCH * BATCH
    x = x[:n].reshape(-1, BATCH, 8, 8, 1).astype(np.float32)
    return x, d.target[:n].reshape(-1, BATCH).astype(np.int32)


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def nnx_cnn():
    """The Flax NNX MNIST tutorial's CNN, sized for 8x8 inputs."""
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
            self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = nnx.Linear(2 * 2 * 64, 256, rngs=rngs)
            self.linear2 = nnx.Linear(256, 10, rngs=rngs)

        def __call__(self, x):
            x = self.avg_pool(nnx.relu(self.conv1(x)))
            x = self.avg_pool(nnx.relu(self.conv2(x)))
            x = x.reshape(x.shape[0], -1)
            return self.linear2(nnx.relu(self.linear1(x)))

    return CNN(rngs=nnx.Rngs(0))


def nchw_model():
    """The same layers channels-first: params dict, loss(params, (x NHWC, y))."""
    ks = jax.random.split(jax.random.key(0), 4)
    he = lambda k, shape, fan_in: jax.random.normal(k, shape) * (2 / fan_in) ** 0.5  # noqa: E731
    params = {
        "c1": he(ks[0], (32, 1, 3, 3), 9),
        "c2": he(ks[1], (64, 32, 3, 3), 288),
        "d1": he(ks[2], (256, 256), 256),
        "d2": he(ks[3], (256, 10), 256),
        "b": [jnp.zeros(32), jnp.zeros(64), jnp.zeros(256), jnp.zeros(10)],
    }
    dn = ("NCHW", "OIHW", "NCHW")

    def pool(h):  # 2x2 average pool over H, W of NCHW
        return lax.reduce_window(h, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4

    def loss(p, batch):
        x, y = batch
        h = jnp.transpose(x, (0, 3, 1, 2))  # the data is NHWC; the model computes NCHW
        for w, b in ((p["c1"], p["b"][0]), (p["c2"], p["b"][1])):
            h = lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=dn)
            h = pool(jax.nn.relu(h + b[:, None, None]))
        h = jax.nn.relu(h.reshape(h.shape[0], -1) @ p["d1"] + p["b"][2])
        return xent(h @ p["d2"] + p["b"][3], y)

    return params, loss


def nnx_functional(model):
    """scanfit today with an NNX model: its Params as the pytree, merged in the loss."""
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, batch):
        x, y = batch
        return xent(nnx.merge(graphdef, p)(x), y)

    return params, loss


def scanfit_rows(params, loss, data, epochs: int, opt) -> dict:
    """scan_train, fit and scanfit's program without the rewrite: each returns the losses."""
    settings = dict(epochs=epochs, accumulate=1, has_aux=False, unroll=1, skip_nonfinite=False)
    plain = jax.jit(lambda p, d: _loop.train(loss, p, opt, d, None, None, **settings).losses)
    return {
        "scan_train": lambda: scanfit.scan_train(loss, params, opt, data, epochs=epochs).losses,
        "fit": lambda: scanfit.fit(loss, params, opt, data, epochs=epochs, progress=False).losses,
        "scan without the rewrite": lambda: plain(params, data),
    }


def jit_loop(params, loss, data, epochs: int, opt):
    @jax.jit
    def step(p, o, x, y):
        value, grads = jax.value_and_grad(loss)(p, (x, y))
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, value

    batches = list(zip(*data))  # sliced once: the loop times the steps, not the slicing
    state = opt.init(params)

    def once():
        p, o, losses = params, state, []
        for _ in range(epochs):
            for x, y in batches:
                p, o, value = step(p, o, x, y)
                losses.append(value)
        return losses

    return once


def nnx_module_row(data, epochs: int, opt):
    """scan_train given the module itself; it keeps training across repetitions."""
    model = nnx_cnn()

    def loss(m, batch):
        return xent(m(batch[0]), batch[1])

    return lambda: scanfit.scan_train(loss, model, opt, data, epochs=epochs).losses


def nnx_loop(data, epochs: int, opt):
    """The NNX tutorial's training loop; the model keeps training across repetitions."""
    from flax import nnx

    model = nnx_cnn()
    optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        value, grads = nnx.value_and_grad(lambda m: xent(m(x), y))(model)
        optimizer.update(model, grads)
        return value

    batches = list(zip(*data))

    def once():
        return [train_step(model, optimizer, x, y) for _ in range(epochs) for x, y in batches]

    return once


def keras_fit(data, epochs: int):
    """Keras 3 fit of the same CNN, steps_per_execution = one epoch."""
    import keras

    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.AveragePooling2D(2),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.AveragePooling2D(2),
            layers.Flatten(),
            layers.Dense(256, activation="relu"),
            layers.Dense(10),
        ]
    )
    n = len(data[0])
    model.compile(
        optimizer=keras.optimizers.AdamW(LR, weight_decay=1e-4),  # optax.adamw's default
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=n,
    )
    x, y = (np.asarray(a).reshape(-1, *a.shape[2:]) for a in data)

    def once():
        history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
        return [history.history["loss"][-1]]  # an epoch mean, not the last update's loss

    return once


def workload_rows(name: str, data, epochs: int) -> tuple[dict, dict]:
    """The rows of one workload, and {row: reason} for those skipped."""
    opt = optax.adamw(LR)
    skipped = {}
    if name == "nchw":
        params, loss = nchw_model()
        return {
            **scanfit_rows(params, loss, data, epochs, opt),
            "jit loop": jit_loop(params, loss, data, epochs, opt),
        }, skipped
    params, loss = nnx_functional(nnx_cnn())
    rows = {
        **scanfit_rows(params, loss, data, epochs, opt),
        "scan_train, NNX module as is": nnx_module_row(data, epochs, opt),
        "jit loop": jit_loop(params, loss, data, epochs, opt),
        "NNX loop": nnx_loop(data, epochs, opt),
    }
    try:
        rows["Keras fit"] = keras_fit(data, epochs)
    except ImportError as err:
        skipped["Keras fit"] = f"{type(err).__name__}: {err}"
    return rows, skipped


def measure(rows: dict, reps: int, updates: int) -> dict[str, dict]:
    """Per row: first call (compiles) in s, warm updates/s (median), last loss of call 1."""
    out = {}
    for name, once in rows.items():
        t = time.perf_counter()
        losses = jax.block_until_ready(once())
        out[name] = {"first_call_s": time.perf_counter() - t, "final_loss": float(losses[-1])}
    times = {name: [] for name in rows}
    for _ in range(reps):  # alternated, so a busy moment on the machine hits every row
        for name, once in rows.items():
            t = time.perf_counter()
            jax.block_until_ready(once())
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        out[name]["updates_per_s"] = updates / statistics.median(ts)
        out[name]["runs_s"] = ts
    return out


def table(results: dict) -> str:
    rows = []
    for workload, res in results.items():
        base = res["rows"]["jit loop"]["updates_per_s"]
        for name, r in res["rows"].items():
            rows.append(
                [
                    workload,
                    name,
                    f"{r['updates_per_s']:,.0f}",
                    f"{r['updates_per_s'] / base:.2f}x",
                    f"{r['first_call_s']:.2f}",
                    f"{r['final_loss']:.4f}",
                ]
            )
        rows += [[workload, name, "skipped", why, "", ""] for name, why in res["skipped"].items()]
    headers = ["workload", "row", "updates/s", "vs jit loop", "first call s", "final loss"]
    return format_table(headers, rows)


def goal_lines(results: dict) -> list[str]:
    lines = []
    for (workload, row, base), least in GOALS.items():
        rows = results[workload]["rows"]
        ratio = rows[row]["updates_per_s"] / rows[base]["updates_per_s"]
        verdict = "PASS" if ratio >= least else "MISS"
        lines.append(f"{verdict}  {workload}: {row} >= {least}x {base}: got {ratio:.2f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 microbatches, 1 epoch, 1 repetition")
    p.add_argument("--reps", type=int, default=None, help="warm repetitions (default 7)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 5)")
    args = p.parse_args(argv)
    reps = args.reps or (1 if args.quick else 7)
    epochs = args.epochs or (1 if args.quick else 5)
    x, y = digits()
    if args.quick:  # compiling dominates; a few microbatches exercise every row
        x, y = x[:16], y[:16]
    data = (jnp.asarray(x), jnp.asarray(y))
    updates = epochs * len(x)
    print(
        f"conv benchmark{' (quick)' if args.quick else ''}: 8x8 digits, batch {BATCH}, "
        f"adamw({LR:g}), {len(x)} microbatches x {epochs} epochs = {updates} updates per run, "
        f"{reps} alternated warm repetitions, median\n{describe_machine(machine())}",
        flush=True,
    )
    results = {}
    for workload in ("cnn", "nchw"):
        rows, skipped = workload_rows(workload, data, epochs)
        results[workload] = {"rows": measure(rows, reps, updates), "skipped": skipped}
    print(table(results))
    print("\n".join(goal_lines(results)))
    payload = {"quick": args.quick, "updates": updates, "reps": reps, **results}
    write_json(RESULTS_DIR / "conv.json", {**payload, "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
