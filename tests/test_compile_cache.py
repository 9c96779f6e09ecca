"""fit(compile_cache=DIR): JAX's persistent compilation cache for the run, and only the run."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scanfit
from scanfit import _compile_cache

sys.path.insert(0, str(Path(__file__).parent))
import _cache_worker  # noqa: E402

SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_enable_compilation_cache",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def run_worker(cache, out):
    proc = subprocess.run(
        [sys.executable, _cache_worker.__file__, str(cache), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def test_a_second_process_reads_the_programs_back_and_gets_the_same_bits(tmp_path):
    cache = tmp_path / "cache"
    first = run_worker(cache, tmp_path / "first.npz")
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_run_chunk-") for name in entries), entries
    assert first["cache_hits"] == 0 and first["cache_misses"] >= 2  # the chunk, the first state
    second = run_worker(cache, tmp_path / "second.npz")
    assert second["cache_misses"] == 0 and second["cache_hits"] == first["cache_misses"]
    for name in ("losses", "w1", "w2"):  # the executable read back computes the same bits
        np.testing.assert_array_equal(second[name], first[name])
    # ... as an uncached run does (this process: nothing of that shape compiled yet)
    plain = _cache_worker.train(None)
    np.testing.assert_array_equal(plain.losses, first["losses"])
    np.testing.assert_array_equal(plain.params["w1"], first["w1"])


def test_settings_are_restored_and_later_compilations_not_cached(tmp_path):
    before = {name: getattr(jax.config, name) for name in SETTINGS}
    cache = tmp_path / "cache"
    x = np.ones((6, 3, 11), np.float32)  # a shape of its own: fit compiles here
    scanfit.fit(lambda p, b: jnp.mean((b @ p) ** 2), np.zeros(11, np.float32), 0.1, x,
                compile_cache=cache, progress=False)  # fmt: skip
    assert {name: getattr(jax.config, name) for name in SETTINGS} == before
    written = set(cache.iterdir())
    assert written
    jax.block_until_ready(jax.jit(lambda a: jnp.cos(a) * 3)(np.ones(17, np.float32)))
    assert set(cache.iterdir()) == written  # JAX's cache object was reset too


def test_a_cache_the_process_had_is_used_again_afterwards(tmp_path):
    mine, run = tmp_path / "mine", tmp_path / "run"
    with _compile_cache.persistent(mine):  # as a process that set its own cache
        with _compile_cache.persistent(run):
            jax.block_until_ready(jax.jit(lambda a: jnp.sin(a) + 19)(np.ones(19, np.float32)))
        jax.block_until_ready(jax.jit(lambda a: jnp.tan(a) + 23)(np.ones(23, np.float32)))
    assert len(list(run.iterdir())) == 1 and len(list(mine.iterdir())) == 1


@pytest.mark.parametrize(
    "value, error, match",
    [
        (3, TypeError, "compile_cache must be a directory path or None, got 3"),
        ("", TypeError, "compile_cache must be a directory path or None, got ''"),
        (__file__, ValueError, "exists and is not a directory"),
    ],
)
def test_bad_compile_cache_is_a_clear_error(value, error, match):
    with pytest.raises(error, match=match):
        scanfit.fit(lambda p, b: jnp.sum(p * b), np.zeros(2), 0.1, np.ones((3, 2)),
                    compile_cache=value, progress=False)  # fmt: skip
