"""A logged, checkpointed training run for the log durability tests, killed as a subprocess.

Usage: python _log_worker.py LOG_DIR CHECKPOINT_DIR [--die-at STEP] [--tear-at STEP]
                             [--die-in-rewrite] [--slow]

- ``--die-at STEP``: SIGKILL right after the chunk ending at STEP is logged, before
  its checkpoint is saved (the log then runs past the newest checkpoint).
- ``--tear-at STEP``: SIGKILL halfway through appending the record of the chunk
  ending at STEP, to ``metrics.jsonl`` and to the event file (torn last records).
- ``--die-in-rewrite``: SIGKILL when a resume's rewrite of a log file is written
  aside and fsynced, just before it is renamed over the original.
- ``--slow``: sleep a little after each chunk, so that a kill from outside lands
  anywhere in the run.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

import scanfit
from scanfit import _event_files, _metrics_log

N, B, D = 12, 8, 3  # microbatches per epoch, batch, features
CHUNK, EVERY = 4, 8  # updates per chunk, updates between checkpoints


def problem():
    rng = np.random.default_rng(77)
    x = rng.normal(size=(N, B, D)).astype(np.float32)
    y = (x @ rng.normal(size=(D,)) + 0.1 * rng.normal(size=(N, B))).astype(np.float32)
    params = {"w": np.zeros(D, np.float32), "b": np.zeros((), np.float32)}
    return params, (x, y)


def loss(p, batch):
    xb, yb = batch
    err = xb @ p["w"] + p["b"] - yb
    return jnp.mean(err**2), {"abs_err": jnp.mean(jnp.abs(err))}


def eval_fn(p, batch):
    return {"val_loss": loss(p, batch)[0]}


def train(log_dir, checkpoint_dir, on_chunk=None, lr=0.05, **kwargs):
    params, data = problem()
    return scanfit.fit(
        loss,
        params,
        optax.inject_hyperparams(optax.adam)(learning_rate=lr),
        data,
        epochs=4,
        has_aux=True,
        eval_fn=eval_fn,
        eval_data=(data[0][:3], data[1][:3]),
        eval_every=2,
        chunk_steps=CHUNK,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=EVERY,
        log_dir=log_dir,
        progress=False,
        on_chunk=on_chunk,
        **kwargs,
    )


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _tear_at(step: int) -> None:
    """Makes MetricsLog.write SIGKILL halfway through the chunk record at ``step``."""
    write = _metrics_log.MetricsLog.write

    def tearing(self, at, kind, scalars):
        if at == step and kind == "chunk":
            line = json.dumps({"step": at, "kind": kind, "loss": 0.0}) + "\n"
            self._file.write(line[: len(line) // 2])
            self._file.flush()
            if self._tb is not None:
                record = _event_files.frame(b"x" * 40)
                self._tb._file.write(record[: len(record) // 2])
                self._tb._file.flush()
            _die()
        write(self, at, kind, scalars)

    _metrics_log.MetricsLog.write = tearing


def _die_in_rewrite() -> None:
    """Makes the log's atomic rewrite SIGKILL just before its rename."""
    replace = os.replace

    def dying(src, dst, *args, **kwargs):
        if Path(src).name.startswith(_metrics_log._TMP_PREFIX):
            _die()
        replace(src, dst, *args, **kwargs)

    os.replace = dying


def main() -> None:
    log_dir, checkpoint_dir, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    die_at = int(flags[flags.index("--die-at") + 1]) if "--die-at" in flags else None
    if "--tear-at" in flags:
        _tear_at(int(flags[flags.index("--tear-at") + 1]))
    if "--die-in-rewrite" in flags:
        _die_in_rewrite()

    def on_chunk(info):
        if info.step == die_at:
            _die()
        if "--slow" in flags:
            time.sleep(0.03)

    train(log_dir, checkpoint_dir, on_chunk=on_chunk)


if __name__ == "__main__":
    main()
