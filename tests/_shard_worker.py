"""One of two JAX processes training a sharded MLP (FSDP over both) with checkpoints.

Usage: python _shard_worker.py PROCESS_ID PORT OUT_DIR STOP_AT

Each process has 2 CPU devices and feeds its half of every microbatch; the
params and Adam state are sharded over the 4 devices of both processes, so each
process holds half of them and checkpoints only its shards. ``STOP_AT`` > 0
stops the run cleanly after that update (``on_chunk``); 0 runs to the end.
Process 0 writes the final params (gathered) and losses to OUT_DIR/result.npz.
"""

import sys

import jax
import numpy as np
import optax
from jax.sharding import Mesh

import scanfit

sys.path.insert(0, __file__.rsplit("/", 1)[0])


def main() -> None:
    # Set here, not at import: pytest imports this module when it collects doctests.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    pid, port, out, stop_at = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60
    )
    from jax.experimental import multihost_utils
    from test_sharding import loss, problem

    params, (x, y) = problem()
    half = x.shape[1] // 2
    local = (x[:, pid * half : (pid + 1) * half], y[:, pid * half : (pid + 1) * half])
    res = scanfit.fit(
        loss, params, optax.adam(1e-2), local, chunk_steps=4, progress=False,
        mesh=Mesh(np.array(jax.devices()), ("data",)), param_sharding="fsdp",
        checkpoint_dir=f"{out}/ckpt",
        on_chunk=lambda info: stop_at == 0 or info.step < stop_at,
    )  # fmt: skip
    w = res.params[0]["w"]
    assert not w.is_fully_addressable and not w.is_fully_replicated, w.sharding
    whole = multihost_utils.process_allgather(res.params, tiled=True)
    if pid == 0:
        flat = {f"p{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(whole))}
        np.savez(f"{out}/result.npz", losses=np.asarray(res.losses), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
