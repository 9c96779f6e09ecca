"""One of two JAX processes training together over 127.0.0.1 (CPU, gloo collectives).

Usage: python _dist_worker.py PROCESS_ID PORT OUT_DIR

Each process has 2 CPU devices and feeds its half of every microbatch; the
global mesh spans the 4 devices of both processes. Process 0 writes the final
params and losses to OUT_DIR/result.npz.
"""

import sys

import jax
import numpy as np
import optax
from jax.sharding import Mesh

import scanfit

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _parallel_problem import problem  # noqa: E402


def join(pid: int, port: int):
    """Joins the other process; returns (loss, params, this process's half of the data, the
    global mesh)."""
    # Set here, not at import: pytest imports this module when it collects doctests.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60
    )
    loss, params, (x, y) = problem()
    half = x.shape[1] // 2
    local = (x[:, pid * half : (pid + 1) * half], y[:, pid * half : (pid + 1) * half])
    return loss, params, local, Mesh(np.array(jax.devices()), ("data",))


def main() -> None:
    pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    loss, params, local, mesh = join(pid, port)
    res = scanfit.fit(
        loss,
        params,
        optax.adam(0.01),
        local,
        epochs=2,
        key=jax.random.key(0),
        chunk_steps=10,
        mesh=mesh,
        progress=False,
        checkpoint_dir=f"{out}/ckpt",
    )
    if pid == 0:
        np.savez(
            f"{out}/result.npz",
            losses=np.asarray(res.losses),
            w=np.asarray(res.params["w"].addressable_data(0)),
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
