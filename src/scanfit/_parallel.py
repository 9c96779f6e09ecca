"""Data parallelism through JAX's own SPMD engine: a mesh with a "data" axis.

Each microbatch's batch axis is sharded over "data", params and optimizer state
are replicated, and XLA's partitioner inserts the gradient all-reduce. Nothing
here implements a collective. Many hosts run the same program after
``jax.distributed.initialize()``; each process feeds its share of every
microbatch.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scanfit._checks import describe

AXIS = "data"


def make_mesh(mesh: Any, devices: Any) -> Mesh | None:
    """The mesh to train on: ``mesh`` as given, or a 1-D mesh over the first ``devices``."""
    if mesh is not None and devices is not None:
        raise ValueError("pass mesh= or devices=, not both.")
    if mesh is not None:
        if not isinstance(mesh, Mesh) or AXIS not in mesh.axis_names:
            raise ValueError(
                f"mesh must be a jax.sharding.Mesh with a {AXIS!r} axis, got {describe(mesh)}"
                + (f" with axes {mesh.axis_names}" if isinstance(mesh, Mesh) else "")
                + "."
            )
        return mesh
    if devices is None:
        return None
    available = jax.local_devices()
    if (
        isinstance(devices, bool)
        or not isinstance(devices, numbers.Integral)
        or not (1 <= devices <= len(available))
    ):
        raise ValueError(
            f"devices must be an integer from 1 to the {len(available)} local devices, got "
            f"{devices!r}. (On a CPU, more devices come from XLA_FLAGS="
            "--xla_force_host_platform_device_count=N or jax_num_cpu_devices.)"
        )
    return Mesh(np.array(available[:devices]), (AXIS,))


def local_shards(mesh: Mesh) -> int:
    """How many parts of the batch axis this process holds."""
    return mesh.shape[AXIS] // max(1, _processes(mesh))


def _processes(mesh: Mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


def check_batch(data: Any, mesh: Mesh) -> None:
    """Every data leaf's batch axis (axis 1) must split evenly over this process's devices."""
    parts = local_shards(mesh)
    for path, leaf in jax.tree_util.tree_leaves_with_path(data):
        shape = tuple(leaf.shape)
        if len(shape) < 2 or shape[1] % parts:
            raise ValueError(
                f"data{jax.tree_util.keystr(path)} has shape {shape}: its batch axis (axis 1) must "
                f"divide by the {parts} devices of the {AXIS!r} axis on this process; pick a batch "
                f"size that is a multiple of {parts}."
            )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, batch_axis: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), AXIS))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def put_batches(tree: Any, mesh: Mesh, batch_axis: int) -> Any:
    """This process's share of every batch, assembled into global arrays sharded over "data"."""
    sharding = batch_sharded(mesh, batch_axis)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), tree)


def to_host(tree: Any) -> Any:
    """NumPy copies of a pytree's arrays, fetched in one round trip (every copy starts
    before the first wait), also of replicated arrays that span other processes' devices."""

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and x.is_fully_replicated:
            return x.addressable_data(0)
        return x

    tree = jax.tree.map(local, tree)
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            x.copy_to_host_async()
    return jax.tree.map(np.asarray, tree)
