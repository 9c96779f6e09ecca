"""Checkpoint files: one ``.npz`` per checkpoint, leaves keyed by tree path, every byte checked.

A checkpoint holds the training state (params, optimizer state, counters), the
loss (and aux) history up to its step, and JSON metadata: the step, the scanfit
version, the run's fingerprint, and the dtype, shape and SHA-256 of every
array. The metadata's own SHA-256 is a member of its own. ``read`` checks all
of them: ``np.load`` reads a member only as far as its header says and never
reaches the zip CRC, so a flipped header byte would otherwise load a shifted
array without a word.

Each array is hashed as it is written (one pass over its bytes). A file is
written to a temporary name in the same directory, flushed, fsynced and
renamed over, so a kill at any moment leaves either the old set or the new
one, never a torn file under a checkpoint's name. Files are read with
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scanfit._parallel import to_host

_NAME = re.compile(r"^ckpt-(\d{10})\.npz$")
TMP_PREFIX = ".tmp-ckpt-"
_META = "__meta__"
_META_SHA = "__meta_sha256__"


class Unusable(ValueError):
    """A checkpoint file that must not be loaded; the message says which and why."""


def _flatten(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    """The leaves by key; those split over other processes' devices are left out: each
    process writes its own shards of them (``write_local_shards``)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    whole = [(p, x) for p, x in leaves if not spans_processes(x)]
    return {f"{prefix}{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in to_host(whole)}


def spans_processes(x: Any) -> bool:
    """A sharded array whose shards lie on several processes' devices."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated


def shards_path(directory: Path, step: int, process: int) -> Path:
    """Process ``process``'s shards of checkpoint ``step`` (not listed as a checkpoint)."""
    return directory / f"ckpt-{step:010d}.process-{process}.npz"


def _shard_key(key: str, index: tuple) -> str:
    return key + "@" + ",".join(f"{s.start}:{s.stop}" for s in index)


def local_shards(trees: dict[str, Any]) -> dict[str, np.ndarray]:
    """This process's shards of every leaf that spans processes, keyed by leaf and index
    (one copy of each: replicas are left to the process that holds replica 0)."""
    out = {}
    for name, tree in trees.items():
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            if spans_processes(x):
                key = name + jax.tree_util.keystr(path)
                for shard in x.addressable_shards:
                    if shard.replica_id == 0:
                        out[_shard_key(key, shard.index)] = np.asarray(shard.data)
    return out


def write_local_shards(directory: Path, step: int, trees: dict[str, Any]) -> bool:
    """Writes this process's shards (checksummed, atomically) if any leaf spans processes,
    and removes its shard files of checkpoints that no longer exist. Returns whether any
    leaf spans processes (then every process must pass a barrier before the main file)."""
    if not any(spans_processes(x) for x in jax.tree.leaves(trees)):
        return False
    process = jax.process_index()
    write_arrays(directory, step, local_shards(trees), {"process": process},
                 final=shards_path(directory, step, process))  # fmt: skip
    kept = {s for s, _ in list_checkpoints(directory)}
    for old in directory.glob(f"ckpt-*.process-{process}.npz"):
        saved = int(old.name[5:15])
        if saved < step and saved not in kept:
            old.unlink(missing_ok=True)
    return True


def read_local_shards(checkpoint: Path, step: int) -> dict[str, np.ndarray]:
    """This process's shards of a checkpoint (verified), {} if it has none.

    Raises:
      Unusable: the file is damaged.
    """
    path = shards_path(checkpoint.parent, step, jax.process_index())
    return read(path)[1] if path.exists() else {}


def unflatten_sharded(prefix: str, like: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``unflatten`` where the leaves of ``like`` that span processes are assembled, in
    their shardings, from this process's shards; the others are host arrays as saved.

    Raises:
      Unusable: a shard is missing or of another shape or dtype.
    """
    if not any(spans_processes(x) for x in jax.tree.leaves(like)):
        return unflatten(prefix, like, arrays)
    leaves = []
    for path, want in jax.tree_util.tree_leaves_with_path(like):
        key = prefix + jax.tree_util.keystr(path)
        leaves.append(_from_shards(key, want, arrays) if spans_processes(want)
                      else unflatten(key, want, arrays))  # fmt: skip
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _from_shards(key: str, like: jax.Array, arrays: dict[str, np.ndarray]) -> jax.Array:
    pieces = []
    for device, index in like.sharding.addressable_devices_indices_map(like.shape).items():
        got = arrays.get(_shard_key(key, index))
        want = tuple(len(range(*s.indices(n))) for s, n in zip(index, like.shape))
        if got is None or got.shape != want or got.dtype != like.dtype:
            raise Unusable(f"this process's shard {_shard_key(key, index)!r} is missing or "
                           f"not {like.dtype}{list(want)}")  # fmt: skip
        pieces.append(jax.device_put(got, device))
    return jax.make_array_from_single_device_arrays(like.shape, like.sharding, pieces)


def path_for(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:010d}.npz"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Entries named like checkpoints in ``directory`` (files or not), oldest first."""
    found = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _checksum(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype name, shape and bytes."""
    h = hashlib.sha256(f"{a.dtype.name}{list(a.shape)}".encode())
    h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1))
    return h.hexdigest()


def write(directory: Path, step: int, trees: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Writes ``trees`` (name -> pytree) and ``meta`` atomically as ``ckpt-<step>.npz``.

    Raises:
      OSError: the disk is full, read-only, ... (the temporary file is removed).
    """
    arrays: dict[str, np.ndarray] = {}
    for name, tree in trees.items():
        arrays.update(_flatten(name, tree))
    return write_arrays(directory, step, arrays, meta)


def write_arrays(
    directory: Path,
    step: int,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    final: Path | None = None,
) -> Path:
    """``write`` for arrays already flat, keyed as they are stored; ``final``: the file's
    name, if not the checkpoint's.

    Thread-safe (it touches only its own temporary file): ``_checkpoint_dir`` calls
    it on a host thread while the next chunk computes.
    """
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_zip(f, arrays, {**meta, "step": step})
            f.flush()
            os.fsync(f.fileno())
        final = final or path_for(directory, step)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return final


# Hashed and written a block at a time: the block is still in cache when it is written.
_BLOCK = 2**20


def _write_zip(f, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """The ``.npz`` (a zip of ``.npy`` members, as ``np.savez`` writes it) in one pass over
    each array's bytes: each block is hashed, then written. The metadata, which holds
    the checksums, is the last member; readers find members by name."""
    sums = {}
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, a in arrays.items():
            a = np.asarray(a, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
            sums[key] = [a.dtype.name, list(a.shape), _write_member(zf, key, a)]
        text = json.dumps({**meta, "arrays": sums})
        for key, value in ((_META, text), (_META_SHA, hashlib.sha256(text.encode()).hexdigest())):
            with zf.open(key + ".npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


def _write_member(zf: zipfile.ZipFile, key: str, a: np.ndarray) -> str:
    """Writes ``a`` (C-contiguous) as the member ``key.npy``; returns its ``_checksum``."""
    h = hashlib.sha256(f"{a.dtype.name}{list(a.shape)}".encode())
    raw = a.reshape(-1).view(np.uint8)
    with zf.open(key + ".npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(a))
        for start in range(0, raw.size, _BLOCK):
            block = raw[start : start + _BLOCK]
            h.update(block)
            member.write(block)
    return h.hexdigest()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads and verifies one checkpoint: (meta, arrays by key).

    Raises:
      Unusable: anything wrong with the file, whatever the library underneath
        raised (zip, npy header and JSON parsers raise a dozen types on damage).
    """
    try:
        return _read(path)
    except Unusable:
        raise
    except Exception as err:  # any failure of a damaged file means one thing: do not load it
        raise Unusable(f"{type(err).__name__}: {err}") from err


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not path.is_file():
        raise Unusable("not a regular file")
    with zipfile.ZipFile(path) as zf:
        members = {n.removesuffix(".npy") for n in zf.namelist()}
        text = str(_member(zf, _META))
        if str(_member(zf, _META_SHA)) != hashlib.sha256(text.encode()).hexdigest():
            raise Unusable("its metadata does not match its checksum")
        meta = json.loads(text)
        sums = meta.get("arrays")
        if not isinstance(sums, dict):
            raise Unusable("it holds no checksums (written by an older scanfit?)")
        if members != {*sums, _META, _META_SHA}:
            odd = sorted(members.symmetric_difference({*sums, _META, _META_SHA}))
            raise Unusable(f"missing or extra arrays {odd}")
        arrays = {}
        for key, (dtype, shape, digest) in sums.items():
            a = _member(zf, key)
            if a.dtype.kind == "V":  # NumPy saves ml_dtypes types (bfloat16, ...) as raw bytes
                a = a.view(jnp.dtype(dtype))
            if a.dtype.name != dtype or list(a.shape) != shape or _checksum(a) != digest:
                raise Unusable(f"array {key!r} does not match its checksum")
            arrays[key] = a
    return meta, arrays


def _member(zf: zipfile.ZipFile, key: str) -> np.ndarray:
    # zf.read checks the zip CRC-32 (it reads the member to its end); np.load would not.
    raw = zf.read(key + ".npy")
    return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)


def unflatten(
    prefix: str, like: Any, arrays: dict[str, np.ndarray], rows: int | None = None
) -> Any:
    """Rebuilds a pytree shaped like ``like`` from the arrays saved under ``prefix``.

    ``rows``: the leaves' leading axis has this length instead of ``like``'s (histories).

    Raises:
      Unusable: an array is missing or has another shape or dtype than in ``like``.
    """
    leaves = []
    for path, want in jax.tree_util.tree_leaves_with_path(like):
        key = prefix + jax.tree_util.keystr(path)
        shape = list(np.shape(want)) if rows is None else [rows, *np.shape(want)[1:]]
        got = arrays.get(key)
        if got is None or list(got.shape) != shape or got.dtype != want.dtype:
            spec = None if got is None else f"{got.dtype}{list(got.shape)}"
            raise Unusable(f"array {key!r} is {spec}, this run needs {want.dtype}{shape}")
        leaves.append(got)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)
