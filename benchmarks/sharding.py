"""Sharded params (FSDP) on 8 fake CPU devices: bytes per device, speed, checkpoints.

    python benchmarks/sharding.py [--quick]

The workload is issue 21's: a 4-layer 1024-wide MLP (4 MiB per weight, 48
MiB of params + Adam state in all; --quick: 256 wide) trained by ``fit`` on a
mesh of 8 devices, batch 64, with the params replicated (``param_sharding=
None``) against sharded (``"fsdp"``), alternated, warm, median of several
runs. Reported: the bytes of params + optimizer state held per device (the
point: 1/8 of them sharded) and updates per second (on a CPU, where the 8
"devices" share 2 cores, collectives cost more than they save: speed is not
the point here). Then the checkpoint of the sharded state: scanfit's own
format (each shard fetched to the host into one ``.npz``, restored shard by
shard into the run's shardings) against ``orbax-checkpoint`` (each shard
written by the process that holds it; optional), save and restore seconds.

The 8 devices must exist before JAX starts: run from ``benchmarks/run.py``
(which has started JAX already), the suite runs itself in a child process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS_DIR, describe_machine, machine, write_json

DEVICES = 8
QUICK = {"width": 256, "updates": 40, "reps": 3}
FULL = {"width": 1024, "updates": 100, "reps": 5}


def _child(argv: list[str]) -> int:
    """This suite in a fresh process with 8 CPU devices."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(DEVICES), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    return subprocess.run(cmd, env=env, check=False).returncode


def workload(width: int, updates: int):
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from fsdp import loss, make_params

    rng = np.random.default_rng(0)
    x = rng.normal(size=(updates, 64, 32)).astype(np.float32)
    return loss, make_params(width), (x, np.sin(x[..., :8]))


def per_device(tree) -> int:
    from scanfit import _sharding

    return max(_sharding.per_device_bytes(tree).values())


def train(cfg: dict) -> tuple[dict, dict, object]:
    """updates/s and bytes per device, replicated vs fsdp; the sharded state for saving."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import Mesh

    import scanfit

    loss, params, data = workload(cfg["width"], cfg["updates"])
    mesh = Mesh(np.array(jax.devices()), ("data",))
    runs = {
        name: lambda s=sharding: scanfit.fit(
            loss, params, optax.adam(1e-3), data, mesh=mesh, param_sharding=s, progress=False
        )
        for name, sharding in (("replicated", None), ("fsdp", "fsdp"))
    }
    results = {name: jax.block_until_ready(run()) for name, run in runs.items()}  # warm
    times: dict = {name: [] for name in runs}
    for _ in range(cfg["reps"]):
        for name, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run().params)
            times[name].append(time.perf_counter() - t0)
    rows = {}
    for name, res in results.items():
        state = (res.params, res.opt_state)
        rows[name] = {
            "state_bytes": sum(a.nbytes for a in jax.tree.leaves(state)),
            "bytes_per_device": per_device(state),
            "updates_per_s": cfg["updates"] / statistics.median(times[name]),
        }
    return rows, {"params": results["fsdp"].params, "opt_state": results["fsdp"].opt_state}, mesh


def checkpoints(state: dict, reps: int) -> dict:
    """Save and restore seconds of the sharded state: scanfit's format against orbax."""
    import jax

    from scanfit import _checkpoint, _sharding

    rows, tmp = {}, Path(tempfile.mkdtemp())
    try:

        def own_save():
            return _checkpoint.write(tmp, 1, state, {})

        def own_restore():
            _, arrays = _checkpoint.read(_checkpoint.path_for(tmp, 1))
            saved = {k: _checkpoint.unflatten(k, v, arrays) for k, v in state.items()}
            return _sharding.restore_like(state, saved)

        rows["scanfit_npz"] = _timed(own_save, own_restore, reps)
        try:
            import orbax.checkpoint as ocp
        except ImportError:
            rows["orbax"] = None
            return rows
        ckptr = ocp.StandardCheckpointer()
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
        )
        where = tmp / "orbax"

        def orbax_save():
            shutil.rmtree(where, ignore_errors=True)
            ckptr.save(where, state)
            ckptr.wait_until_finished()

        rows["orbax"] = _timed(orbax_save, lambda: ckptr.restore(where, target), reps)
        ckptr.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _timed(save, restore, reps: int) -> dict:
    import jax

    saves, restores = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        save()
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = jax.block_until_ready(restore())
        restores.append(time.perf_counter() - t0)
    held = per_device(out)
    return {"save_s": statistics.median(saves), "restore_s": statistics.median(restores),
            "restored_bytes_per_device": held}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 256-wide MLP, fewer repeats")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for sharding.json")
    args = p.parse_args(argv)
    import jax

    if len(jax.devices()) < DEVICES:
        return _child(sys.argv[1:] if argv is None else argv)
    cfg = QUICK if args.quick else FULL
    info = machine()
    print(f"sharding benchmark{' (quick)' if args.quick else ''}: {describe_machine(info)}")
    rows, state, _ = train(cfg)
    total = rows["fsdp"]["state_bytes"]
    print(f"  {cfg['width']}-wide 4-layer MLP, adam, batch 64, {cfg['updates']} updates, "
          f"{DEVICES} devices; params + Adam state {total / 2**20:.1f} MiB")  # fmt: skip
    for name, row in rows.items():
        print(f"    {name:>10}: {row['bytes_per_device'] / 2**20:6.2f} MiB per device "
              f"({row['bytes_per_device'] / total:.3f} of the state), "
              f"{row['updates_per_s']:8.1f} updates/s")  # fmt: skip
    saves = checkpoints(state, cfg["reps"])
    for name, row in saves.items():
        if row is None:
            print(f"    {name:>12}: not installed (pip install orbax-checkpoint)")
            continue
        held = row["restored_bytes_per_device"] / total
        print(f"    {name:>12}: save {row['save_s'] * 1e3:7.1f} ms, restore "
              f"{row['restore_s'] * 1e3:7.1f} ms (restored into the shardings: "
              f"{held:.3f} of the state per device)")  # fmt: skip
    payload = {
        "benchmark": "sharding",
        "quick": args.quick,
        "machine": info,
        "config": {**cfg, "devices": DEVICES, "batch": 64},
        "rows": rows,
        "checkpoints": saves,
        "fsdp_bytes_ratio": rows["fsdp"]["bytes_per_device"] / total,
    }
    path = write_json(args.out / "sharding.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
