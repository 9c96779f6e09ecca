"""JAX's persistent compilation cache for the length of one run: ``fit(compile_cache=DIR)``.

A restarted run lowers its programs again, but XLA's compilation of them, the
slow part, is read back from DIR. The cache is JAX's, and what turns it on
is global to the process, so it is set for the run and restored afterwards.
How jax 0.10.2 behaves (``jax/_src/compilation_cache.py`` and ``compiler.py``):

- The cache object is created once, at the first compilation after
  ``jax_compilation_cache_dir`` is set, and keeps that directory until
  ``compilation_cache.reset_cache()``: changing the setting alone neither
  moves nor stops it. Hence a reset on entry and on exit.
- A program is written only if it took ``jax_persistent_cache_min_compile_time_secs``
  (1 s by default) to compile and its entry has
  ``jax_persistent_cache_min_entry_size_bytes``; only process 0 writes,
  every process reads. Programs with host callbacks are never written.
- A hit is the monitoring event ``/jax/compilation_cache/cache_hits``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache


def check_dir(compile_cache: Any) -> Path | None:
    """``compile_cache`` as a Path (None stays None); the error a user can act on if not."""
    if compile_cache is None:
        return None
    if not isinstance(compile_cache, (str, os.PathLike)) or not str(compile_cache):
        raise TypeError(f"compile_cache must be a directory path or None, got {compile_cache!r}.")
    path = Path(compile_cache)
    if path.exists() and not path.is_dir():
        raise ValueError(f"compile_cache {str(path)!r} exists and is not a directory.")
    return path


def _settings(path: Path) -> dict[str, Any]:
    """JAX's settings while a run uses ``path``: every program it compiles is written,
    however fast it compiled (a restart pays for all of them)."""
    return {
        "jax_enable_compilation_cache": True,
        "jax_compilation_cache_dir": str(path),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": -1,  # no minimum size
    }


@contextlib.contextmanager
def persistent(path: Path | None) -> Iterator[None]:
    """JAX's persistent compilation cache in ``path`` while the block runs (nothing if None).

    JAX creates ``path`` at the first compilation, so a run refused before it leaves none.

    Global while it runs: every compilation in the process, from any thread, reads
    and writes ``path``. The four settings of ``_settings`` are restored afterwards
    and JAX's cache object reset, so a cache the process used before (its own
    ``jax_compilation_cache_dir``) is found again at its next compilation.
    """
    if path is None:
        yield
        return
    wanted = _settings(path)
    saved = {name: getattr(jax.config, name) for name in wanted}
    try:
        for name, value in wanted.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
