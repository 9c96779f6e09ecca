"""Crash-safe checkpoints: one ``.npz`` per checkpoint, leaves keyed by tree path.

A checkpoint holds the training state (params, optimizer state, counters), the
loss (and aux) history up to its step, and JSON metadata: the step, the
scanfit version and a fingerprint of the run (tree structures, shapes and
dtypes, data shapes, settings) that a resumed run must match. It is written to
a temporary file in the same directory, flushed, fsynced and renamed over, so
a kill at any moment leaves either the old set or the new one, never a torn
file under a checkpoint's name. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from scanfit._parallel import to_host

_NAME = re.compile(r"^ckpt-(\d{10})\.npz$")
_TMP_PREFIX = ".tmp-ckpt-"
_META = "__meta__"


def _flatten(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(to_host(tree))
    return {f"{prefix}{jax.tree_util.keystr(p)}": x for p, x in leaves}


def spec(tree: Any) -> dict[str, Any]:
    """Structure, shapes and dtypes of a pytree, as JSON-able data."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        "treedef": str(jax.tree.structure(tree)),
        "leaves": {jax.tree_util.keystr(p): [list(np.shape(x)), str(x.dtype)] for p, x in leaves},
    }


def path_for(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:010d}.npz"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Checkpoints in ``directory``, oldest first."""
    found = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def clean_temporaries(directory: Path) -> None:
    """Removes half-written files left by a run that was killed while saving."""
    for entry in directory.glob(_TMP_PREFIX + "*"):
        entry.unlink(missing_ok=True)


def save(
    directory: Path, step: int, trees: dict[str, Any], meta: dict[str, Any], keep: int
) -> Path:
    """Writes ``trees`` (name -> pytree) and ``meta`` atomically, then prunes to ``keep`` newest."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for name, tree in trees.items():
        arrays.update(_flatten(name, tree))
    arrays[_META] = np.asarray(json.dumps({**meta, "step": step}))
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        final = path_for(directory, step)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads one checkpoint: (meta, arrays by key). Raises ValueError if it is unreadable."""
    try:
        # Our own handle: np.load leaks its file when the zip is torn.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop(_META)))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
    return meta, arrays


def unflatten(prefix: str, like: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Rebuilds a pytree shaped like ``like`` from the arrays saved under ``prefix``."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(like)]
    return jax.tree.unflatten(jax.tree.structure(like), [arrays[prefix + p] for p in paths])


def newest_valid(directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The newest readable checkpoint; unreadable newer ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            meta, arrays = read(path)
        except ValueError as err:
            warnings.warn(f"skipping {err}; trying an older checkpoint", stacklevel=3)
            continue
        if meta.get("step") != step:
            warnings.warn(
                f"skipping checkpoint {path}: its metadata says step {meta.get('step')}",
                stacklevel=3,
            )
            continue
        return meta, arrays
    return None


def differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints."""
    out = []
    for name in sorted(set(saved) | set(current)):
        a, b = saved.get(name), current.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{name}.")
        elif a != b:
            out.append(f"{prefix}{name}: checkpoint has {a!r}, this run has {b!r}")
    return out
