"""A training run for the fault tests, started as a subprocess and killed with SIGKILL.

Usage: python _fault_worker.py CHECKPOINT_DIR OUT.npz [--kill-in-save N [--at F]] [--stateful]
    [--evaluated] [--skip]

With --kill-in-save N the process SIGKILLs itself halfway through writing its
N-th checkpoint (after part of the temporary file is on disk; with --at F, the
first fraction F of the whole file), a crash at the worst moment. Without it,
it trains to the end, slowly enough to be killed from outside, and writes its
final params and losses to OUT.npz. --skip trains under nan_policy="skip" (a
donated carry).
"""

import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scanfit
from scanfit import _checkpoint

N, B, D = 60, 8, 4


def problem():
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(N, B, D)).astype(np.float32)
    y = (x @ rng.normal(size=(D,)) + 0.1 * rng.normal(size=(N, B))).astype(np.float32)
    params = {"w": np.zeros(D, np.float32), "b": np.zeros((), np.float32)}

    def loss(p, batch):
        xb, yb = batch
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    return loss, params, (x, y)


def train(checkpoint_dir, on_chunk=None, stateful=False, evaluated=False, skip=False):
    loss, params, data = problem()
    extended = {}
    if evaluated:  # in-graph evaluation on the first 10 microbatches, best state, patience
        extended = dict(
            eval_fn=lambda p, b: {"val_loss": loss(p, b)},
            eval_data=jax.tree.map(lambda a: a[:10] * 1.5, data),
            eval_every=14,
            best=("val_loss", "min"),
            patience=4,
        )
    if stateful:
        from _stateful_problem import problem as stateful_problem

        loss, params, state, data = stateful_problem(n=N, batch=B, features=D, seed=1234)
        extended = dict(model_state=state, rng=jax.random.key(11))
    return scanfit.fit(
        loss,
        params,
        optax.adam(0.05),
        data,
        epochs=4,
        key=jax.random.key(7),
        chunk_steps=7,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=7,
        keep=2,
        progress=False,
        on_chunk=on_chunk,
        nan_policy="skip" if skip else None,
        **extended,
    )


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    if "--kill-in-save" in sys.argv:
        nth = int(sys.argv[sys.argv.index("--kill-in-save") + 1])
        calls = {"n": 0}
        real_write = _checkpoint._write_zip

        at = float(sys.argv[sys.argv.index("--at") + 1]) if "--at" in sys.argv else None

        def dying_write(f, arrays, meta):  # runs on the save thread
            calls["n"] += 1
            if calls["n"] == nth:
                if at is None:  # the start of a zip, then death
                    f.write(b"PK\x03\x04 half a zip file")
                else:  # the whole file written, cut at a fraction of its bytes, then death
                    real_write(f, arrays, meta)
                    f.truncate(int(f.tell() * at))
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            real_write(f, arrays, meta)

        _checkpoint._write_zip = dying_write
    res = train(
        ckpt,
        on_chunk=lambda info: time.sleep(0.05),
        stateful="--stateful" in sys.argv,
        evaluated="--evaluated" in sys.argv,
        skip="--skip" in sys.argv,
    )
    np.savez(
        out,
        losses=np.asarray(res.losses),
        w=np.asarray(res.params["w"]),
        b=np.asarray(res.params["b"]),
        **({} if res.model_state is None else {"mean": np.asarray(res.model_state["mean"])}),
        **(
            {}
            if res.metrics is None
            else {
                "val_loss": np.asarray(res.metrics["val_loss"]),
                "best_w": np.asarray(res.best_params["w"]),
                "stopped_at": np.asarray(res.stopped_at),
            }
        ),  # fmt: skip
    )


if __name__ == "__main__":
    main()
