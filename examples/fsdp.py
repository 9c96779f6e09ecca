"""A model sharded over 8 devices (FSDP): each holds 1/8 of the params and Adam state.

    python examples/fsdp.py [--quick]

On a CPU, 8 devices are faked (``jax_num_cpu_devices``, set before JAX starts
its backend). A 4-layer MLP is trained with ``fit(mesh=..., param_sharding=
"fsdp")``: each weight is split along its largest dimension over the mesh's
``"data"`` axis, the same axis that splits the batch, as Levanter and MaxText
do; Adam's ``mu`` and ``nu`` are created in the same shards, and XLA gathers
each weight for its use and reduce-scatters its gradient. The script prints
the bytes of params + optimizer state held per device against the total.
"""

from __future__ import annotations

import argparse

import jax

DEVICES = 8


def _fake_devices() -> None:
    """8 CPU devices, if the backend has not started yet (as when run as a script)."""
    try:
        jax.config.update("jax_num_cpu_devices", DEVICES)
    except RuntimeError:  # already started (imported by a test with its own devices)
        pass


def make_params(width: int, depth: int = 4, seed: int = 0):
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), depth)
    sizes = [32] + [width] * (depth - 1) + [8]
    return [
        {"w": jax.random.normal(k, (a, b)) / a**0.5, "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def loss(params, batch):
    import jax.numpy as jnp

    x, y = batch
    for layer in params[:-1]:
        x = jax.nn.gelu(x @ layer["w"] + layer["b"])
    return jnp.mean((x @ params[-1]["w"] + params[-1]["b"] - y) ** 2)


def main(quick: bool = False) -> dict:
    """Trains sharded and returns what it measured (per-device and total state bytes)."""
    import numpy as np
    import optax
    from jax.sharding import Mesh

    import scanfit

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    width, updates = (256, 20) if quick else (1024, 200)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(updates, 64, 32)).astype(np.float32)
    y = np.sin(x[..., :8])  # a smooth target the MLP can fit
    params = make_params(width)
    res = scanfit.fit(
        loss, params, optax.adam(1e-3), (x, y), mesh=mesh, param_sharding="fsdp",
        chunk_steps=updates // 4, progress=False,
    )  # fmt: skip
    state = (res.params, res.opt_state)
    total = sum(a.nbytes for a in jax.tree.leaves(state))
    held = {}
    for a in jax.tree.leaves(state):
        for shard in a.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    out = {
        "devices": len(devices),
        "state_bytes": total,
        "max_bytes_per_device": max(held.values()),
        "first_loss": float(res.losses[0]),
        "final_loss": float(res.losses[-1]),
        "weight_sharding": str(res.params[1]["w"].sharding.spec),
    }
    print(
        f"{len(devices)} devices: params + Adam state {total / 2**20:.2f} MiB in all, "
        f"{out['max_bytes_per_device'] / 2**20:.2f} MiB per device "
        f"({out['max_bytes_per_device'] / total:.3f} of it); a hidden weight is sharded "
        f"{out['weight_sharding']}; loss {out['first_loss']:.4f} -> {out['final_loss']:.4f}"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, short run")
    _fake_devices()
    main(quick=parser.parse_args().quick)
