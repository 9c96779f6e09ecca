"""A training run for the preemption tests, started as a subprocess and sent SIGTERM.

Usage: python _preempt_worker.py CHECKPOINT_DIR OUT.npz [--policy P] [--again]

Trains ``train()`` with its own SIGTERM handler installed around ``fit`` (it
counts the signals that land outside ``fit``; ``fit`` must put it back). Prints
``ready`` on each run's first chunk. On ``scanfit.Preempted`` it writes what it
saw to OUT.npz and exits 3; with ``--again`` it instead runs ``fit`` again at
once (a resume), as many times as it is preempted, and writes the final result
to OUT.npz with exit 0.
"""

import signal
import sys
import time

import jax
import numpy as np

import scanfit

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _fault_worker import problem  # noqa: E402

CHUNK = 6


def train(checkpoint_dir, *, policy="raise", on_chunk=None):
    loss, params, data = problem()
    return scanfit.fit(
        loss,
        params,
        0.02,
        data,
        epochs=10,  # 600 updates, 100 chunks
        key=jax.random.key(3),
        chunk_steps=CHUNK,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=4 * CHUNK,  # a preemption between saves must save itself
        nan_policy=policy,
        progress=False,
        on_chunk=on_chunk,
    )


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    policy = sys.argv[sys.argv.index("--policy") + 1] if "--policy" in sys.argv else "raise"
    outside = []  # SIGTERMs that arrived while fit was not running

    def count(signum, frame):
        outside.append(time.monotonic())

    signal.signal(signal.SIGTERM, count)
    starts, stops, restored = [], [], []

    def on_chunk(info):
        if len(starts) == len(stops):  # this run's first chunk (each run before it stopped)
            starts.append(info.step - len(info.losses))  # where it resumed
            print("ready", flush=True)
        time.sleep(0.02)

    while True:
        try:
            res = train(ckpt, policy=policy, on_chunk=on_chunk)
        except scanfit.Preempted as err:
            restored.append(signal.getsignal(signal.SIGTERM) is count)
            stops.append(err.step)
            assert err.checkpoint_dir == ckpt, err.checkpoint_dir
            if "--again" in sys.argv:
                continue
            np.savez(out, stops=stops, starts=starts, restored=restored, outside=len(outside))
            sys.exit(3)
        restored.append(signal.getsignal(signal.SIGTERM) is count)
        break
    np.savez(
        out,
        losses=np.asarray(res.losses),
        w=np.asarray(res.params["w"]),
        b=np.asarray(res.params["b"]),
        stops=np.asarray(stops, np.int64),
        starts=np.asarray(starts, np.int64),
        restored=restored,
        outside=len(outside),
    )


if __name__ == "__main__":
    main()
