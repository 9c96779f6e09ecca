"""One of two JAX processes training together (CPU, gloo), for the preemption test.

Usage: python _dist_preempt_worker.py PROCESS_ID PORT OUT_DIR MODE

MODE ``service``: JAX's preemption service (on by default) catches SIGTERM and
sets the sync point; ``allgather``: the service is off and scanfit all-gathers
each process's flag at every chunk boundary. Process 0 prints ``ready`` after
its first chunk. On ``scanfit.Preempted`` each process writes its step to
OUT_DIR/stop-PID and exits 3; a run that ends writes OUT_DIR/result-PID.npz.
"""

import sys
import time

import jax
import numpy as np
import optax

import scanfit

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _dist_worker import join  # noqa: E402

EPOCHS, CHUNK = 10, 4  # 240 updates, 60 chunks


def train(loss, params, data, mesh, checkpoint_dir, on_chunk=None):
    return scanfit.fit(
        loss, params, optax.adam(0.01), data, epochs=EPOCHS, key=jax.random.key(0),
        chunk_steps=CHUNK, checkpoint_every=5 * CHUNK, mesh=mesh, progress=False,
        checkpoint_dir=checkpoint_dir, on_chunk=on_chunk,
    )  # fmt: skip


def main() -> None:
    pid, port, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.config.update("jax_enable_preemption_service", mode == "service")
    loss, params, local, mesh = join(pid, port)

    start = []  # where this run began: 0, or the checkpoint it resumed

    def on_chunk(info):
        if not start:
            start.append(info.step - len(info.losses))
            if pid == 0:
                print("ready", flush=True)
        time.sleep(0.03)

    try:
        res = train(loss, params, local, mesh, f"{out}/ckpt", on_chunk)
    except scanfit.Preempted as err:
        with open(f"{out}/stop-{pid}", "w") as f:
            f.write(f"{err.step} {start[0]}")
        jax.distributed.shutdown()
        sys.exit(3)
    np.savez(
        f"{out}/result-{pid}.npz",
        losses=np.asarray(res.losses),
        w=np.asarray(res.params["w"].addressable_data(0)),
        start=start[0],
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
