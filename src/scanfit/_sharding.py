"""Sharded parameters (FSDP / ZeRO-3): which device holds which part of each leaf.

``fit(param_sharding=...)`` names a ``NamedSharding`` for every leaf of the
params, on the run's mesh; the optimizer state takes the params' shardings
leaf by leaf (``optax.tree_map_params``), and the first carry is built in
those shardings inside one compiled call, so no device ever holds a replicated
copy. As in Levanter and MaxText, params are sharded over the same devices as
the batch (an ``"fsdp"`` axis, or ``"data"`` where the mesh has none) and XLA
inserts the all-gathers before use and the reduce-scatters of the gradients.

Everything here is pure: shardings are computed from shapes, nothing is
transferred except by ``place``. Fingerprints of sharded state are digests
computed where the shards live (``digest``): nothing is gathered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scanfit._checks import describe
from scanfit._fingerprint import treedef_text

PyTree = Any
DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)  # mesh axes the batch is sharded over, where the mesh has them
# "fsdp" leaves with fewer elements than this stay replicated (biases, norm scales): an
# all-gather per use costs more than the bytes it saves.
MIN_SHARDED_SIZE = 1024


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that shard the batch: those of ``BATCH_AXES`` the mesh has."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def fsdp_axis(mesh: Mesh) -> str:
    """The axis params are sharded over by ``param_sharding="fsdp"``."""
    return FSDP if FSDP in mesh.axis_names else DATA


def fsdp_spec(shape: tuple[int, ...], parts: int, axis: str) -> PartitionSpec:
    """``axis`` on the largest dimension that ``parts`` divides; replicated if none does or
    the leaf is small (fewer than ``MIN_SHARDED_SIZE`` elements)."""
    if parts <= 1 or math.prod(shape) < MIN_SHARDED_SIZE:
        return PartitionSpec()
    order = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
    for dim in order:
        if shape[dim] % parts == 0:
            return PartitionSpec(*([None] * dim), axis)
    return PartitionSpec()


def mesh_of(tree: PyTree) -> Mesh | None:
    """The mesh of the ``NamedSharding``-placed arrays in ``tree`` (None if there are none).

    Raises:
      ValueError: they lie on several meshes.
    """
    meshes = {
        x.sharding.mesh
        for x in jax.tree.leaves(tree)
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
    }
    if len(meshes) > 1:
        raise ValueError(
            f"params lie on {len(meshes)} different meshes: place them all on one mesh, or "
            "pass mesh= with param_sharding=."
        )
    return next(iter(meshes), None)


def _on(mesh: Mesh, x: Any) -> NamedSharding | None:
    """x's sharding if it is a NamedSharding on ``mesh`` (placed by the user), else None."""
    s = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
    return s if isinstance(s, NamedSharding) and s.mesh == mesh else None


def kept_or_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """Each leaf's own sharding where it is on ``mesh``; replicated over it otherwise."""
    return jax.tree.map(lambda x: _on(mesh, x) or NamedSharding(mesh, PartitionSpec()), tree)


def _annotated(params: PyTree) -> PyTree | None:
    """The PartitionSpecs of an NNX state made under ``nnx.with_partitioning``, or None."""
    variables = jax.tree.leaves(params, is_leaf=lambda v: hasattr(v, "get_metadata"))
    if not any(
        v.get_metadata().get("out_sharding") for v in variables if hasattr(v, "get_metadata")
    ):
        return None
    from flax import nnx

    return nnx.get_partition_spec(params)


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def param_shardings(param_sharding: Any, params: PyTree, mesh: Mesh) -> PyTree:
    """A ``NamedSharding`` on ``mesh`` for every leaf of ``params``.

    Args:
      param_sharding: ``None`` (each leaf's own sharding where it is on
        ``mesh``, an NNX state's ``nnx.with_partitioning`` annotations, else
        replicated), ``"fsdp"``, a pytree of ``PartitionSpec`` (or None:
        replicated) matching ``params``, or ``(path, leaf) -> PartitionSpec``.
      params: the params (arrays or shape/dtype structs).
      mesh: the run's mesh.

    Raises:
      ValueError, TypeError: a spec tree of another structure, a spec naming an axis the
        mesh lacks, or one whose axes do not divide the leaf's dimension.
    """
    if param_sharding is None:
        annotated = _annotated(params)
        if annotated is None:
            return kept_or_replicated(params, mesh)
        param_sharding = annotated
    specs = _specs(param_sharding, params, mesh)
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(params), specs):
        _check_spec(path, np.shape(leaf), spec, mesh)
    flat = [NamedSharding(mesh, spec or PartitionSpec()) for spec in specs]
    return jax.tree.unflatten(jax.tree.structure(params), flat)


def _specs(param_sharding: Any, params: PyTree, mesh: Mesh) -> list:
    """One PartitionSpec (or None) per leaf of ``params``, in order."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if isinstance(param_sharding, str):
        if param_sharding != "fsdp":
            raise ValueError(
                f"param_sharding must be None, 'fsdp', a pytree of PartitionSpec matching "
                f"params or a function (path, leaf) -> PartitionSpec, got {param_sharding!r}."
            )
        axis = fsdp_axis(mesh)
        return [fsdp_spec(np.shape(x), mesh.shape[axis], axis) for _, x in leaves]
    if callable(param_sharding) and not isinstance(param_sharding, PartitionSpec):
        return [param_sharding(path, x) for path, x in leaves]
    spec_def = jax.tree.structure(param_sharding, is_leaf=_is_spec)
    if spec_def != jax.tree.structure(params):
        raise ValueError(
            "param_sharding must be a pytree of PartitionSpec with the structure of params "
            f"(or 'fsdp', or a function (path, leaf) -> PartitionSpec), got "
            f"{describe(param_sharding)} with structure {spec_def}; params have "
            f"{jax.tree.structure(params)}."
        )
    return jax.tree.leaves(param_sharding, is_leaf=_is_spec)


def _check_spec(path, shape: tuple[int, ...], spec: Any, mesh: Mesh) -> None:
    where = f"param_sharding{jax.tree_util.keystr(path)}"
    if spec is None:
        return
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"{where} must be a jax.sharding.PartitionSpec, got {describe(spec)}.")
    if len(spec) > len(shape):
        raise ValueError(f"{where} is {spec}, more entries than the leaf's shape {shape}.")
    for dim, names in enumerate(spec):
        names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
        missing = [a for a in names if a not in mesh.axis_names]
        if missing:
            raise ValueError(
                f"{where} is {spec}: the mesh has no axis {missing[0]!r} (its axes are "
                f"{mesh.axis_names})."
            )
        parts = math.prod(mesh.shape[a] for a in names)
        if shape[dim] % parts:
            raise ValueError(
                f"{where} is {spec}: dimension {dim} of the leaf's shape {shape} does not "
                f"divide into the {parts} parts of mesh axes {names}."
            )


def opt_shardings(optimizer, opt_state: PyTree, params: PyTree, shardings: PyTree, mesh: Mesh):
    """The optimizer state's shardings: each leaf that mirrors a param (Adam's ``mu`` and
    ``nu``, momentum) takes that param's sharding; every other leaf (counts, factored
    statistics of another shape) is replicated. ``opt_state``: arrays or shape structs."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def same(leaf, param, sharding):
        return sharding if np.shape(leaf) == np.shape(param) else replicated

    try:
        return optax.tree_map_params(
            optimizer, same, opt_state, params, shardings,
            transform_non_params=lambda _: replicated,
        )  # fmt: skip
    except (ValueError, TypeError):  # a state optax cannot map (a user's own init): by shape
        return jax.tree.map(lambda _: replicated, opt_state)


def state_shardings(params: PyTree, opt_state: PyTree, model_state: PyTree, *, optimizer,
                    shardings: PyTree, mesh: Mesh) -> tuple[PyTree, PyTree]:  # fmt: skip
    """(opt_state, model_state) shardings that follow the params' ``shardings``. Model state
    with the structure of params (an EMA of them) is sharded like them; other model state
    keeps its own sharding on ``mesh`` or is replicated."""
    opt = opt_shardings(optimizer, opt_state, params, shardings, mesh)
    if model_state is not None and jax.tree.structure(model_state) == jax.tree.structure(params):
        replicated = NamedSharding(mesh, PartitionSpec())
        model = jax.tree.map(
            lambda m, p, s: s if np.shape(m) == np.shape(p) else replicated,
            model_state, params, shardings,
        )  # fmt: skip
    else:
        model = kept_or_replicated(model_state, mesh)
    return opt, model


@dataclasses.dataclass(frozen=True)
class Shardings:
    """The shardings of a pytree, flat and hashable (not itself a pytree): a static
    argument of a compiled call that makes its outputs in them (``constrain``)."""

    treedef: Any
    leaves: tuple  # NamedSharding, one per leaf

    @classmethod
    def of(cls, tree: PyTree) -> Shardings:
        leaves, treedef = jax.tree.flatten(tree)
        return cls(treedef, tuple(leaves))

    @classmethod
    def of_arrays(cls, tree: PyTree) -> Shardings | None:
        """The shardings ``tree``'s arrays have, where all are ``NamedSharding``s (else None)."""
        leaves, treedef = jax.tree.flatten(tree)
        shardings = tuple(getattr(x, "sharding", None) for x in leaves)
        if not leaves or not all(isinstance(s, NamedSharding) for s in shardings):
            return None
        return cls(treedef, shardings)

    def constrain(self, tree: PyTree) -> PyTree:
        """``tree`` (traced, of this structure) laid out in these shardings."""
        return jax.lax.with_sharding_constraint(tree, jax.tree.unflatten(self.treedef, self.leaves))


def keeping_shardings(fn):
    """``fn(state, ...) -> (state, *rest)`` with a static keyword ``shardings``: the
    ``Shardings`` of the state it is given, where its new state is made. Left free, XLA
    may pick other output shardings for some leaves (it splits a replicated bias), and
    the next call would compile for them and round otherwise than a resumed run."""

    @functools.wraps(fn)
    def kept(*args, shardings: Shardings | None = None, **kwargs):
        state, *rest = fn(*args, **kwargs)
        return (state if shardings is None else shardings.constrain(state), *rest)

    signature = inspect.signature(fn)
    extra = inspect.Parameter("shardings", inspect.Parameter.KEYWORD_ONLY, default=None)
    kept.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    return kept


def carry(params: PyTree, opt_state: PyTree, model_state: PyTree, *, optimizer, mesh,
          param_sharding) -> tuple[PyTree, Shardings | None]:  # fmt: skip
    """Params placed in their shardings (straight from the host into their shards) and
    the ``Shardings`` of ``(params, opt_state, model_state)`` to build the first carry in;
    ``(params, None)`` where nothing is on a mesh. Without ``mesh``, params the user
    placed on one keep their shardings.

    Raises:
      ValueError, TypeError: ``param_sharding`` without a mesh, or not fitting params.
    """
    on = mesh if mesh is not None else mesh_of(params)
    if on is None:
        if param_sharding is not None:
            raise ValueError(
                f"param_sharding needs a mesh to shard over, got {describe(param_sharding)} "
                "without one: pass mesh= (a jax.sharding.Mesh with a 'data' and/or 'fsdp' "
                "axis) or devices=."
            )
        return params, None
    shardings = param_shardings(param_sharding, params, on)
    params = place(params, shardings)
    opt_like = opt_state if opt_state is not None else jax.eval_shape(optimizer.init, params)
    opt, model = state_shardings(
        params, opt_like, model_state, optimizer=optimizer, shardings=shardings, mesh=on
    )
    return params, Shardings.of((shardings, opt, model))


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """``tree``'s leaves in ``shardings`` (no transfer for a leaf already there). Host arrays
    go straight to their shards: no device ever holds a whole sharded leaf."""

    def put(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        return from_host(np.asarray(x), sharding)

    return jax.tree.map(put, tree, shardings)


def from_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array as a global array in ``sharding``: each addressable device gets its
    shard only (across hosts, every process passes the same whole ``x``)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def restore_like(like: PyTree, saved: PyTree) -> PyTree:
    """Host arrays ``saved`` on the device(s), each in the sharding of its counterpart in
    ``like`` where that is a ``NamedSharding`` (only each device's shard is transferred),
    else as ``jnp.asarray`` places it."""

    def put(old, x):
        if isinstance(x, jax.Array):  # assembled from this process's shards already
            return x
        sharding = getattr(old, "sharding", None) if isinstance(old, jax.Array) else None
        return from_host(x, sharding) if isinstance(sharding, NamedSharding) else jnp.asarray(x)

    return jax.tree.map(put, like, saved)


def per_device_bytes(tree: PyTree) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays held on each (addressable) device."""
    held: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in getattr(x, "addressable_shards", ()):
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


# -- digests of sharded arrays, computed where the shards live ----------------------------


def _words(x: jax.Array) -> jax.Array:
    """A leaf's bits as uint32 words (one or more per element), in row-major order."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = x.dtype.itemsize
    if width < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[width]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finalizer: every input bit flips each output bit with p ~ 1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


_SEEDS = (0x9E3779B9, 0x7F4A7C15, 0x94D049BB, 0xBF58476D)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """Four uint32 sums over the words of ``x`` of ``mix(word ^ mix(position + seed))``.

    A sum does not depend on the order it is added in, so it is the same bitwise
    whatever the sharding and device count: XLA reduces each shard where it lies and
    adds the partial sums. A changed word changes each lane by a pseudo-random amount."""
    words = _words(x)
    position = jnp.arange(words.shape[0], dtype=jnp.uint32)
    lanes = [
        jnp.sum(_mix(words ^ _mix(position + jnp.uint32(s))), dtype=jnp.uint32) for s in _SEEDS
    ]
    return jnp.stack(lanes)


@jax.jit
def _digests(leaves: list) -> list:
    return [_leaf_digest(x) for x in leaves]


def digest(tree: PyTree) -> dict[str, Any]:
    """Structure, leaf specs and a digest of the contents of a pytree of arrays, computed
    on the devices that hold them (nothing is gathered; across hosts each adds its shards
    and the sums meet in XLA's all-reduce). The same for any sharding of the same values.

    Returns:
      ``{"treedef": str, "leaves": {path: [shape, dtype]}, "sha256": hex}``, as
      ``_fingerprint.tree_digest``, with the digest named ``"digest"`` instead of ``"sha256"``.
    """
    paths, arrays, leaves = [], [], {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        spec = [list(leaf.shape), str(leaf.dtype)]
        leaves[jax.tree_util.keystr(path)] = spec
        paths.append(repr(spec))
        arrays.append(leaf)
    h = hashlib.sha256()
    for spec, lanes in zip(paths, _host_digests(arrays)):
        h.update(spec.encode())
        h.update(np.asarray(lanes, np.uint32).tobytes())
    return {"treedef": treedef_text(tree), "leaves": leaves, "digest": h.hexdigest()}


def _host_digests(arrays: list) -> list[np.ndarray]:
    """The leaves' digests on the host (each is replicated: any local copy will do)."""
    if not arrays:
        return []
    out = _digests(arrays)
    return [np.asarray(d.addressable_data(0)) for d in out]
