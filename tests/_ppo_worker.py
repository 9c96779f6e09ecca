"""PureJaxRL's PPO (examples/ppo_cartpole.py) through fit_steps, for the kill-and-resume test.

Usage: python _ppo_worker.py CHECKPOINT_DIR OUT.npz

Trains a tiny configuration with a checkpoint after every 2 updates, slowly
enough to be killed from outside (SIGKILL), resuming from CHECKPOINT_DIR when
it holds a checkpoint; at the end writes every leaf of the final runner state
(``leaf_<i>``) and every metric (``metric_<name>``) to OUT.npz.
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import ppo_cartpole  # noqa: E402

import scanfit  # noqa: E402

# 4 envs x 16 steps, 8 updates: about as fast as PPO compiles.
CONFIG = {**ppo_cartpole.CONFIG, "NUM_STEPS": 16, "TOTAL_TIMESTEPS": 4 * 16 * 8}
SEED = 30


def train(checkpoint_dir, on_chunk=None) -> scanfit.StepsResult:
    ppo = ppo_cartpole.make_ppo(CONFIG)
    return scanfit.fit_steps(
        ppo.update_step,  # PureJaxRL's scan body as it is: metrics = the rollout's info
        jax.jit(ppo.init)(jax.random.PRNGKey(SEED)),
        steps=ppo.num_updates,
        chunk_steps=2,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=2,
        progress=False,
        on_chunk=on_chunk,
    )


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    res = train(ckpt, on_chunk=lambda info: time.sleep(0.3))
    leaves = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(res.state))}
    metrics = {f"metric_{k}": np.asarray(v) for k, v in res.metrics.items()}
    np.savez(out, **leaves, **metrics)


if __name__ == "__main__":
    main()
