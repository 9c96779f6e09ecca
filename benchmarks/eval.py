"""Evaluation inside the compiled program: what early stopping saves, what evaluating costs.

    python benchmarks/eval.py [--quick]

The workload is the 64-64-10 MLP of the sweep suite (adam, batch 32), trained
with ``scan_train`` for T updates; the held-out set is 10 microbatches of 32.
Every variant runs in one process, alternated, warm (compiled beforehand),
median of several runs.

1. Early stopping saves time (goal: <= 0.45x). A run that stops at T/3 against
   the same run without patience, both evaluating every 100 updates. The stop
   is made to fall at exactly T/3 by a metric that stops improving after the
   first evaluation (``best=("plateau", "min")``, ``patience=T/300 - 1``); the
   real validation loss is computed alongside, as in any run. Also shown: a run
   of exactly T/3 updates, the floor.
2. Evaluation overhead (goal: <= the eval compute itself + 5% of the run).
   ``eval_every=100`` on the 10 held-out microbatches against no evaluation;
   the eval compute itself is the same T/100 evaluations run alone in one
   program.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import RESULTS_DIR, alternated_medians, describe_machine, machine, write_json

import scanfit
from scanfit import _eval

QUICK = {"updates": 1200, "reps": 5}
FULL = {"updates": 6000, "reps": 9}
EVERY, M, BATCH = 100, 10, 32


def mlp_loss(p, batch):
    x, y = batch
    logits = jax.nn.relu(x @ p[0] + p[1]) @ p[2] + p[3]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def eval_fn(p, batch):
    # "plateau" never improves after the first evaluation: it places the stop exactly.
    return {"val_loss": mlp_loss(p, batch), "plateau": jnp.zeros(())}


def workload(updates: int):
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(64, 10))
    x = rng.normal(size=(updates + M, BATCH, 64)).astype(np.float32)
    y = np.argmax(x @ proj, -1).astype(np.int32)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = [
        jax.random.normal(k1, (64, 64)) * 0.17,
        jnp.zeros(64),
        jax.random.normal(k2, (64, 10)) * 0.17,
        jnp.zeros(10),
    ]
    data = (jnp.asarray(x[:updates]), jnp.asarray(y[:updates]))
    held_out = (jnp.asarray(x[updates:]), jnp.asarray(y[updates:]))
    return params, data, held_out


def variants(updates: int):
    """name -> a function running one warm scan_train (or the evals alone)."""
    params, data, held_out = workload(updates)
    opt = optax.adam(1e-3)
    evaluation = dict(eval_fn=eval_fn, eval_data=held_out, eval_every=EVERY)
    third = jax.tree.map(lambda a: a[: updates // 3], data)
    patience = updates // 3 // EVERY - 1
    spec = _eval.EvalSpec(eval_fn, False, EVERY, None, None)

    @jax.jit
    def evals_alone(p):
        # The run's T/100 evaluations, each on params that depend on the last one's
        # result, so XLA cannot hoist the evaluation out of the loop.
        def one(p, _):
            val = _eval.evaluate(spec, p, None, held_out)["val_loss"]
            return jax.tree.map(lambda a: a + 1e-30 * val, p), val

        return jax.lax.scan(one, p, None, length=updates // EVERY)[1]

    return {
        "no_eval": lambda: scanfit.scan_train(mlp_loss, params, opt, data).params,
        "eval_every_100": lambda: (
            scanfit.scan_train(
                mlp_loss, params, opt, data, best=("plateau", "min"), **evaluation
            ).params
        ),
        "eval_stop_at_third": lambda: (
            scanfit.scan_train(
                mlp_loss,
                params,
                opt,
                data,
                best=("plateau", "min"),
                patience=patience,
                **evaluation,
            ).params
        ),
        "third_no_eval": lambda: scanfit.scan_train(mlp_loss, params, opt, third).params,
        "evals_alone": lambda: evals_alone(params),
    }


def check_stop(updates: int) -> int:
    """The stopping variant really stops at T/3 (else the timing means nothing)."""
    params, data, held_out = workload(updates)
    res = scanfit.scan_train(
        mlp_loss, params, optax.adam(1e-3), data, eval_fn=eval_fn, eval_data=held_out,
        eval_every=EVERY, best=("plateau", "min"), patience=updates // 3 // EVERY - 1,
    )  # fmt: skip
    return int(res.stopped_at)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer updates and repeats")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for eval.json")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    info = machine()
    print(f"eval benchmark{' (quick)' if args.quick else ''}: {describe_machine(info)}")
    t_updates = cfg["updates"]
    stopped_at = check_stop(t_updates)
    assert stopped_at == t_updates // 3, stopped_at
    secs = alternated_medians(variants(t_updates), cfg["reps"])
    stop_ratio = secs["eval_stop_at_third"] / secs["eval_every_100"]
    extra = (secs["eval_every_100"] - secs["no_eval"] - secs["evals_alone"]) / secs["no_eval"]
    print(f"  64-64-10 MLP, adam, batch 32, {t_updates} updates, held-out {M} microbatches, "
          f"eval every {EVERY}, median of {cfg['reps']}, alternated")  # fmt: skip
    for name, s in secs.items():
        print(f"    {name:>20}: {s * 1e3:8.2f} ms")
    print(f"  early stop at update {stopped_at} / full run with eval: {stop_ratio:.3f}x "
          f"(goal <= 0.45x; a run of exactly T/3 without eval: "
          f"{secs['third_no_eval'] / secs['eval_every_100']:.3f}x)")  # fmt: skip
    print(f"  eval every {EVERY}: {secs['eval_every_100'] / secs['no_eval']:.3f}x of no eval; "
          f"the evals alone are {secs['evals_alone'] / secs['no_eval']:.3f}x; beyond them: "
          f"{extra:+.1%} (goal <= +5%)")  # fmt: skip
    payload = {
        "benchmark": "eval",
        "quick": args.quick,
        "machine": info,
        "config": {**cfg, "eval_every": EVERY, "eval_microbatches": M, "batch": BATCH},
        "seconds": secs,
        "stopped_at": stopped_at,
        "early_stop_ratio": stop_ratio,
        "early_stop_goal_met": stop_ratio <= 0.45,
        "eval_overhead_beyond_eval_compute": extra,
        "eval_overhead_goal_met": extra <= 0.05,
    }
    path = write_json(args.out / "eval.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
