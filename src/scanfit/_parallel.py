"""Data parallelism through JAX's own SPMD engine: a mesh with a "data" axis.

Each microbatch's batch axis is sharded over "data" (and "fsdp" where the mesh
has it), params and optimizer state are replicated or sharded (``_sharding``),
and XLA's partitioner inserts the gradient all-reduce (or the all-gathers and
reduce-scatters of sharded params). Nothing here implements a collective. Many
hosts run the same program after ``jax.distributed.initialize()``; each process
feeds its share of every microbatch.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scanfit import _sharding
from scanfit._checks import describe

AXIS = "data"


def make_mesh(mesh: Any, devices: Any) -> Mesh | None:
    """The mesh to train on: ``mesh`` as given, or a 1-D mesh over the first ``devices``."""
    if mesh is not None and devices is not None:
        raise ValueError("pass mesh= or devices=, not both.")
    if mesh is not None:
        if not isinstance(mesh, Mesh) or not _sharding.batch_axes(mesh):
            raise ValueError(
                f"mesh must be a jax.sharding.Mesh with a {AXIS!r} axis, got {describe(mesh)}"
                + (f" with axes {mesh.axis_names}" if isinstance(mesh, Mesh) else "")
                + f". (An {_sharding.FSDP!r} axis does too: the batch is sharded over both.)"
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
    """How many parts of the batch axis this process holds.

    Raises:
      ValueError: the mesh's batch axes do not split into one share per process.
    """
    sharding = NamedSharding(mesh, PartitionSpec(_sharding.batch_axes(mesh)))
    parts = math.prod(mesh.shape[a] for a in _sharding.batch_axes(mesh))
    indices = sharding.addressable_devices_indices_map((parts,)).values()
    mine = {(i[0].start, i[0].stop) for i in indices}  # slices are unhashable before 3.12
    processes = _processes(mesh)
    if parts % processes or len(mine) * processes != parts:
        raise ValueError(
            f"mesh has axes {dict(mesh.shape)}: {_axes_text(mesh)} split the batch into "
            f"{parts} part(s), but each of the {processes} processes needs an equal share of "
            f"its own (this one holds {len(mine)}): make the product of the batch axes a "
            "multiple of the process count, with each process's devices together along them "
            "(jax.make_mesh does that)."
        )
    return len(mine)


def _axes_text(mesh: Mesh) -> str:
    """The batch axes in words: "the 'data' axis", "the 'data' and 'fsdp' axes"."""
    names = _sharding.batch_axes(mesh)
    return (
        f"the {names[0]!r} axis" if len(names) == 1 else f"the {names[0]!r} and {names[1]!r} axes"
    )


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
                f"divide by the {parts} devices of {_axes_text(mesh)} on this process; pick a "
                f"batch size that is a multiple of {parts}."
            )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, batch_axis: int) -> NamedSharding:
    """Axis ``batch_axis`` sharded over every batch axis of the mesh ("data", "fsdp")."""
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), _sharding.batch_axes(mesh)))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def put_on_mesh(tree: Any, mesh: Mesh) -> Any:
    """``tree`` on ``mesh``: leaves already placed on it stay as they are (sharded params
    are never replicated), the others are replicated."""
    return _sharding.place(tree, _sharding.kept_or_replicated(tree, mesh))


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
