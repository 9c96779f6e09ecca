"""Any training step: PureJaxRL's PPO on CartPole through scan_steps and fit_steps.

    python benchmarks/steps.py [--quick]

The workload is examples/ppo_cartpole.py at PureJaxRL's defaults (5e5
timesteps: 976 updates of 4 envs x 128 steps, 4 epochs of 4 minibatches).
Every variant runs in one process, warm (compiled beforehand), alternated
rep by rep, median of several runs; each computes the whole run from the seed.

1. ``scan_steps`` (goal >= 0.97x) and ``fit_steps`` in chunks of 100 updates
   with a checkpoint after every chunk (goal >= 0.93x) against PureJaxRL's
   plain ``jax.jit(train)(rng)``: speed = the reference's time / the variant's.
2. 4 seeds in one program, ``jax.vmap`` of ``scan_steps`` (goal >= 2x) against
   4 sequential ``jit(train)`` runs. Shown for PureJaxRL's update as it is and
   with ``SHUFFLE_INFO=False`` (the rollout's info left out of the minibatch
   shuffle: the same numbers; under vmap on XLA:CPU its batched gathers
   dominate).
3. A Python loop of a jitted ``_update_step`` (what a user without a scan
   writes): reported against ``jit(train)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import jax
from _common import RESULTS_DIR, alternated_medians, describe_machine, machine, write_json

import scanfit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

SEEDS = 4
QUICK = {"timesteps": 4 * 16 * 8, "num_steps": 16, "chunk": 4, "reps": 2}
FULL = {"timesteps": 5e5, "num_steps": 128, "chunk": 100, "reps": 3}


def variants(ex, config: dict, chunk: int, tmp: Path, quick: bool) -> dict:
    """name -> a function running one whole warm PPO run (or 4 of them); fit_steps
    checkpoints into a fresh directory under ``tmp`` each run."""
    ppo = ex.make_ppo(config)
    n = ppo.num_updates
    rng = jax.random.PRNGKey(30)
    rngs = jax.random.split(rng, SEEDS)
    train = jax.jit(ex.make_train(config))
    init = jax.jit(ppo.init)
    update = jax.jit(ppo.update_step)
    runs = iter(range(10**6))

    def fit_steps():
        return scanfit.fit_steps(
            ppo.update_step, init(rng), steps=n, chunk_steps=chunk,
            checkpoint_dir=tmp / f"run-{next(runs)}", checkpoint_every=chunk, progress=False,
        ).state  # fmt: skip

    def python_loop():
        state, metrics = init(rng), []
        for _ in range(n):
            state, m = update(state, None)
            metrics.append(m)
        return state, metrics

    def seeds(cfg):
        p = ex.make_ppo(cfg)
        states = jax.jit(jax.vmap(p.init))(rngs)
        one = jax.jit(ex.make_train(cfg))
        vmapped = jax.vmap(lambda s: scanfit.scan_steps(p.update_step, s, steps=n))
        return (lambda: vmapped(states).state), (lambda: [one(r) for r in rngs])

    vmap4, seq4 = seeds(config)
    fns = {
        "jit_train": lambda: train(rng),
        "scan_steps": lambda: scanfit.scan_steps(ppo.update_step, init(rng), steps=n).state,
        "fit_steps": fit_steps,
        "python_loop": python_loop,
        "vmap_4_seeds": vmap4,
        "sequential_4": seq4,
    }
    if not quick:  # two more compiles of the whole run
        fns["vmap_4_seeds_no_info"], fns["sequential_4_no_info"] = seeds(
            {**config, "SHUFFLE_INFO": False}
        )
    return fns


def report(secs: dict, n: int, timesteps: float) -> dict:
    """Speeds against the references (higher is faster) and whether each goal is met."""
    ref = secs["jit_train"]
    speed = {
        "scan_steps": ref / secs["scan_steps"],
        "fit_steps": ref / secs["fit_steps"],
        "python_loop": ref / secs["python_loop"],
        "vmap_4_seeds": secs["sequential_4"] / secs["vmap_4_seeds"],
    }
    if "vmap_4_seeds_no_info" in secs:
        no_info = secs["sequential_4_no_info"] / secs["vmap_4_seeds_no_info"]
        speed["vmap_4_seeds_no_info"] = no_info
    goals = {"scan_steps": 0.97, "fit_steps": 0.93, "vmap_4_seeds": 2.0}
    for name, s in secs.items():
        print(f"    {name:>22}: {s:8.3f} s")
    print(f"  jit(train): {timesteps / ref:,.0f} env steps/s ({n} updates)")
    for name, x in speed.items():
        goal = f" (goal >= {goals[name]}x)" if name in goals else ""
        print(f"  {name:>22}: {x:.3f}x{goal}")
    return {
        "speed": speed,
        "goals": goals,
        "goals_met": {k: speed[k] >= g for k, g in goals.items()},
        "env_steps_per_s": timesteps / ref,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny PPO, fewer repeats")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for steps.json")
    args = p.parse_args(argv)
    try:
        import ppo_cartpole as ex
    except ImportError as e:  # gymnax, flax: the examples extra
        print(f"steps benchmark skipped: {e} (pip install -e '.[examples]')")
        write_json(args.out / "steps.json", {"benchmark": "steps", "skipped": str(e)})
        return 0
    cfg = QUICK if args.quick else FULL
    config = {**ex.CONFIG, "NUM_STEPS": cfg["num_steps"], "TOTAL_TIMESTEPS": cfg["timesteps"]}
    info = machine()
    info["allocator"] = os.environ.get("LD_PRELOAD") or "glibc malloc"
    print(f"steps benchmark{' (quick)' if args.quick else ''}: {describe_machine(info)}, "
          f"allocator {info['allocator']}")  # fmt: skip
    n = ex.make_ppo(config).num_updates
    print(f"  PureJaxRL PPO, CartPole-v1, {cfg['timesteps']:.0f} timesteps = {n} updates, "
          f"fit_steps chunks of {cfg['chunk']} with a checkpoint each, "
          f"median of {cfg['reps']}, alternated")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="scanfit-bench-steps-") as tmp:
        secs = alternated_medians(
            variants(ex, config, cfg["chunk"], Path(tmp), args.quick), cfg["reps"]
        )
    figures = report(secs, n, cfg["timesteps"])
    payload = {
        "benchmark": "steps",
        "quick": args.quick,
        "machine": info,
        "config": {**cfg, "updates": n, "seeds": SEEDS},
        "seconds": secs,
        **figures,
    }
    path = write_json(args.out / "steps.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
