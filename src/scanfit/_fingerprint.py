"""Fingerprints of a training run: a hash of everything that decides its result.

A fingerprint is a JSON-able dict with one entry per named input of the run:

- ``program``: the text of the update program as JAX lowers it. The learning
  rate and every other setting the loss function and the optimizer close over
  are constants in it, so it changes with any of them. Symbol names are
  renumbered, so renaming a Python function changes nothing.
- trees (params, optimizer state, data, a PRNG key, ...): structure, shape and
  dtype of each leaf, and a SHA-256 of all their bytes. Every byte is hashed,
  not a sample; a 1 GiB dataset costs about 0.8 s here (SHA-NI), paid once per
  ``fit`` call and only when it checkpoints.
- settings (``accumulate``, ``has_aux``, ...): plain JSON values.

``epochs`` is not an entry: update ``u`` of a run depends on the epoch it falls
in, never on how many epochs follow, so a longer run continues a shorter one
bitwise (a checkpoint past the end of a shorter run is refused by ``fit``).

Adding an input is one more keyword: ``fingerprint(program=..., rng=key, ...)``;
give it a human name in ``DESCRIPTIONS`` for error messages. Nothing here
touches files: it hashes what it is given and compares two fingerprints.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import jax
import numpy as np

# How a difference in each entry reads in an error message ("... differs").
DESCRIPTIONS = {
    "program": "the update program (loss_fn or optimizer settings, e.g. the learning rate)",
    "params": "the initial params",
    "opt_state": "the initial optimizer state",
    "data": "the data contents",
    "key": "the key (microbatch order)",
    "accumulate": "accumulate",
    "has_aux": "has_aux",
    "nan_policy": "the non-finite policy (nan_policy, skip_nonfinite)",
    "model_state": "the initial model state",
    "rng": "the rng (dropout and other randomness)",
}

_BLOCK = 16 * 2**20  # bytes hashed at a time: a memmap is read in pieces, not all at once
_SETTING = (type(None), bool, int, float, str)
_SAME_SHAPES = "same shapes, other contents"
_SYMBOL = re.compile(r"@([\w$.-]+)")


def fingerprint(*, program: str, **entries: Any) -> dict[str, Any]:
    """The fingerprint of a run.

    Args:
      program: the text of the compiled update (``jax.jit(f).lower(...).as_text()``).
      **entries: each a setting (None, bool, int, float or str), kept as it is,
        or a pytree of arrays (JAX, NumPy, memmaps, PRNG keys), hashed.

    Returns:
      A JSON-able dict, one entry per argument.
    """
    out: dict[str, Any] = {"program": program_digest(program)}
    for name, value in entries.items():
        out[name] = value if isinstance(value, _SETTING) else tree_digest(value)
    return out


def program_digest(text: str) -> str:
    """SHA-256 of a lowered program's text, with its symbols renumbered in order of use."""
    names: dict[str, str] = {"main": "main"}

    def rename(match: re.Match) -> str:
        return "@" + names.setdefault(match.group(1), f"f{len(names)}")

    return hashlib.sha256(_SYMBOL.sub(rename, text).encode()).hexdigest()


def tree_digest(tree: Any) -> dict[str, Any]:
    """Structure, leaf specs (``[[20, 5, 3], "float32"]``) and SHA-256 of all bytes of a pytree."""
    h = hashlib.sha256()
    leaves = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)  # the key's impl stays in its dtype name
        leaf = leaf if isinstance(leaf, np.ndarray) else np.asarray(leaf)
        spec = [list(leaf.shape), str(dtype or leaf.dtype)]
        leaves[jax.tree_util.keystr(path)] = spec
        h.update(repr(spec).encode())
        _hash_bytes(h, leaf)
    return {"treedef": treedef_text(tree), "leaves": leaves, "sha256": h.hexdigest()}


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def treedef_text(tree: Any) -> str:
    """The pytree's structure as text, without the memory addresses in the reprs of its
    static fields (flax's ``TrainState`` holds ``tx`` and ``apply_fn``: functions
    whose addresses differ in every process, so a resumed run would never match)."""
    return _ADDRESS.sub("", str(jax.tree.structure(tree)))


def _hash_bytes(h, a: np.ndarray) -> None:
    if a.ndim == 0 or a.nbytes <= _BLOCK:
        h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1))
        return
    rows = max(1, _BLOCK // (a.nbytes // len(a)))
    for i in range(0, len(a), rows):
        h.update(np.ascontiguousarray(a[i : i + rows]).view(np.uint8).reshape(-1))


def differences(saved: dict[str, Any], current: dict[str, Any], ignore=()) -> list[str]:
    """What differs between two fingerprints, one phrase per entry, for an error message.

    Args:
      saved: the fingerprint stored in a checkpoint.
      current: this run's.
      ignore: entry names not to compare.

    Returns:
      Phrases such as ``"the data contents differ"``; empty when they match.
    """
    out, by_contents = {}, set()
    for name in [*current, *(n for n in saved if n not in current)]:
        a, b = saved.get(name), current.get(name)
        if name in ignore or a == b:
            continue
        what = DESCRIPTIONS.get(name, name)
        if isinstance(a, dict) and isinstance(b, dict):
            out[name] = f"{what}: {_tree_difference(a, b)}"
            by_contents.update([name] if out[name].endswith(_SAME_SHAPES) else [])
        elif name == "program":
            out[name] = f"{what} differs"
        else:
            out[name] = f"{what}: {_short(a)} in the checkpoint, {_short(b)} in this run"
    if "program" in out and set(out) - by_contents - {"program"}:
        del out["program"]  # other shapes or settings make another program: no news
    return list(out.values())


def _tree_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    if "microbatches_per_epoch" in a or "microbatches_per_epoch" in b:
        return _stream_difference(a, b)
    axes = ("number of microbatches N", "batch size")
    changed = _leaves_difference(a.get("leaves", {}), b.get("leaves", {}), axes)
    if changed:
        return changed
    if a.get("treedef") != b.get("treedef"):
        return f"another structure ({_short(a.get('treedef'))} in the checkpoint)"
    return _SAME_SHAPES


def _stream_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How the fingerprints of two iterables differ (one of them may be arrays')."""
    if "microbatches_per_epoch" not in a or "microbatches_per_epoch" not in b:
        kinds = ["an iterable of microbatches" if "microbatches_per_epoch" in x else "arrays"
                 for x in (a, b)]  # fmt: skip
        return f"{kinds[0]} in the checkpoint, {kinds[1]} in this run"
    out = []
    ma, mb = a.get("microbatch", {}), b.get("microbatch", {})
    changed = _leaves_difference(ma.get("leaves", {}), mb.get("leaves", {}), ("batch size",))
    if changed:
        out.append(f"each microbatch: {changed}")
    elif ma.get("treedef") != mb.get("treedef"):
        out.append(f"each microbatch: another structure ({_short(ma.get('treedef'))} in the "
                   "checkpoint)")  # fmt: skip
    na, nb = a["microbatches_per_epoch"], b["microbatches_per_epoch"]
    if na != nb:
        out.append(f"another epoch length: {na} microbatches per epoch in the checkpoint, "
                   f"{nb} in this run")  # fmt: skip
    return "; ".join(out) or _SAME_SHAPES


def _leaves_difference(la: dict, lb: dict, axes: tuple[str, ...]) -> str | None:
    """The leaves whose specs differ, led by what changed when it is one axis of them all
    (``axes`` names the leading ones: e.g. the batch size); None if none differ."""
    paths = [*lb, *(p for p in la if p not in lb)]
    changed = [p for p in paths if la.get(p) != lb.get(p)]
    if not changed:
        return None
    listing = "; ".join(
        f"{p or '(root)'} is {_spec(la.get(p))} in the checkpoint, {_spec(lb.get(p))} in this run"
        for p in changed[:3]
    ) + (f" (and {len(changed) - 3} more)" if changed[3:] else "")
    axis = _one_axis([(la.get(p), lb.get(p)) for p in changed])
    if axis is None or axis >= len(axes):
        return listing
    old = sorted({la[p][0][axis] for p in changed})
    new = sorted({lb[p][0][axis] for p in changed})
    what = f"{_sizes(old)} in the checkpoint, {_sizes(new)} in this run"
    return f"another {axes[axis]} ({what}): {listing}"


def _one_axis(pairs: list) -> int | None:
    """The one axis in which every pair of leaf specs differs (same dtype and rank), or None."""
    axes = set()
    for a, b in pairs:
        if a is None or b is None or a[1] != b[1] or len(a[0]) != len(b[0]):
            return None
        axes.update(i for i, (m, n) in enumerate(zip(a[0], b[0])) if m != n)
    return axes.pop() if len(axes) == 1 else None


def _sizes(values: list[int]) -> str:
    return " and ".join(map(str, values))


def _spec(spec: Any) -> str:
    if isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], list):
        return f"{spec[1]}{spec[0]}"  # "float32[20, 5, 3]"
    return "absent" if spec is None else repr(spec)


def _short(value: Any, limit: int = 120) -> str:
    text = "given" if isinstance(value, dict) else repr(value)  # a digest: say only that
    return text if len(text) <= limit else text[: limit - 3] + "..."
