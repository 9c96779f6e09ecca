"""Sources benchmark: scanfit.fit over an iterable of NumPy microbatches against in-memory data.

    python benchmarks/sources.py [--quick] [--out benchmarks/results]

Workload: loop.py's 64-64-10 MLP (tanh), softmax cross-entropy over a batch of 32,
optax.adam(1e-3), float32, N microbatches, one update each, chunk_steps=1000 (250 quick).

Compared in one process, alternated (A B C ... A B C ...) over several repetitions after
one untimed call each (compiles excluded), medians reported:

* ``fit`` on the data as device arrays (the baseline);
* ``fit`` over a plain generator yielding ``(x[i], y[i])`` NumPy views, the next chunk
  stacked on fit's thread right after the current one is dispatched (scanfit's default),
  and stacked on a producer thread instead (``_sources.PRODUCER_THREAD``);
* ``fit`` over a grain ``DataLoader`` (worker_count=0, no read threads, no shuffle), when
  grain is installed, both ways: grain's own cost per record shows here.

Every variant's losses and final params are checked bitwise equal to the baseline first.
Goal: the generator's throughput >= 0.9x the in-memory one (the faster of the two ways).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported
from _common import RESULTS_DIR, describe_machine, format_table, machine, write_json  # noqa: E402
from loop import BATCH, CLASSES, FEATURES, HIDDEN, CheckFailed, init_params, make_data, make_loss  # noqa: E402, E501

import scanfit  # noqa: E402
from scanfit import _sources  # noqa: E402

LR = 1e-3
FULL = {"n": 20_000, "chunk": 1000, "reps": 7}
QUICK = {"n": 2_000, "chunk": 250, "reps": 3}
GOAL = 0.9  # generator throughput / in-memory throughput

loss_fn = make_loss()


class _Rows:
    """A grain data source: microbatch i of the stacked arrays (repr fixed for its state)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __repr__(self):
        return f"_Rows(n={len(self.x)})"


def iterables(x, y) -> dict[str, Callable[[], object]]:
    """name -> a function returning a fresh iterable of microbatches."""

    def generator():
        for i in range(len(x)):
            yield x[i], y[i]

    out = {"generator": generator}
    try:
        import grain.python as gp
    except ImportError:
        return out

    def loader():
        sampler = gp.IndexSampler(
            len(x), shard_options=gp.NoSharding(), shuffle=False, num_epochs=1
        )
        # Read threads cost more than they save on 2 cores: 47 us a microbatch without
        # them, 300 us with grain's default 16 (measured here, grain 0.2.18).
        options = gp.ReadOptions(num_threads=0)
        return gp.DataLoader(
            data_source=_Rows(x, y), sampler=sampler, worker_count=0, read_options=options
        )

    out["grain_loader"] = loader
    return out


def variants(cfg: dict, x, y) -> dict[str, tuple[str, bool | None, Callable]]:
    """name -> (label, producer thread or None for arrays, thunk returning a TrainResult)."""
    params, opt, n, chunk = init_params(), optax.adam(LR), cfg["n"], cfg["chunk"]
    mem = jax.block_until_ready(jax.device_put((x, y)))

    def fit(data, **kw):
        return scanfit.fit(loss_fn, params, opt, data, chunk_steps=chunk, progress=False, **kw)

    out = {"memory": ("device arrays (baseline)", None, lambda: fit(mem))}
    for name, make in iterables(x, y).items():
        for thread in (False, True):
            label = f"{name}, {'producer thread' if thread else 'main thread'}"
            thunk = lambda make=make: fit(make(), steps_per_epoch=n)  # noqa: E731
            out[f"{name}_{'thread' if thread else 'main'}"] = (label, thread, thunk)
    return out


def run(variant: tuple) -> tuple[float, object]:
    _, thread, thunk = variant
    _sources.PRODUCER_THREAD = bool(thread)
    try:
        t0 = time.perf_counter()
        out = jax.block_until_ready(thunk())
        return time.perf_counter() - t0, out
    finally:
        _sources.PRODUCER_THREAD = False


def verify(vs: dict) -> None:
    """One untimed call each (compiles included); bitwise equal to the baseline."""
    ref = run(vs["memory"])[1]
    for name, v in vs.items():
        res = run(v)[1]
        same = np.array_equal(np.asarray(res.losses), np.asarray(ref.losses)) and all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(ref.params))
        )
        if not same:
            raise CheckFailed(f"{name}: losses or params differ from fit on device arrays")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=2000, 3 repeats")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for sources.json")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    n, t_start, info = cfg["n"], time.perf_counter(), machine()
    print(f"sources benchmark{' (quick)' if args.quick else ''}: {describe_machine(info)}")
    print(
        f"  MLP {FEATURES}-{HIDDEN}-{CLASSES}, batch {BATCH}, adam({LR:g}), {n} updates, "
        f"chunk_steps={cfg['chunk']}; {cfg['reps']} alternated repetitions",
        flush=True,
    )
    x, y = make_data(n)
    vs = variants(cfg, x, y)
    try:
        verify(vs)
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {name: [] for name in vs}
    for _ in range(cfg["reps"]):
        for name, v in vs.items():
            times[name].append(run(v)[0])
    base = statistics.median(times["memory"])
    rows = {
        name: {
            "label": vs[name][0],
            "median_s": statistics.median(t),
            "all_s": t,
            "updates_per_s": n / statistics.median(t),
            "throughput_ratio": base / statistics.median(t),
        }
        for name, t in times.items()
    }
    print(
        format_table(
            ["variant", "median s", "updates/s", "x in-memory"],
            [
                [
                    r["label"],
                    f"{r['median_s']:.3f}",
                    f"{r['updates_per_s']:.0f}",
                    f"{r['throughput_ratio']:.2f}",
                ]
                for r in rows.values()
            ],
        )
    )
    best = max(("generator_main", "generator_thread"), key=lambda k: rows[k]["throughput_ratio"])
    ratio = rows[best]["throughput_ratio"]
    goal = f"{'PASS' if ratio >= GOAL else 'MISS'}  generator throughput / in-memory >= {GOAL}: "
    goal += f"got {ratio:.3f} ({rows[best]['label']})"
    print(goal)
    payload = {
        "benchmark": "sources",
        "quick": args.quick,
        "machine": info,
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "workload": {"mlp": [FEATURES, HIDDEN, CLASSES], "batch": BATCH, "n": n, **cfg},
        "rows": rows,
        "goal": goal,
        "wall_s": time.perf_counter() - t_start,
    }
    path = write_json(args.out / "sources.json", payload)
    print(f"wrote {path} ({payload['wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
