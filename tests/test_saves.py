"""Checkpoints written on a host thread: overlapped with the next chunk, correct under a
donated carry, errors raised in the caller, and a SIGKILL at any moment loads nothing torn."""

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import scanfit
from scanfit import _checkpoint, _checkpointer

sys.path.insert(0, str(Path(__file__).parent))
import _fault_worker  # noqa: E402
from _linear_problem import mse, problem  # noqa: E402


def assert_same(a, b):
    np.testing.assert_array_equal(a.losses, b.losses)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_save_overlaps_the_next_chunk_and_holds_its_own_step(tmp_path, monkeypatch, policy):
    # The save of update 4 cannot finish before chunk 8 has run: saving in the loop's
    # own thread would wait forever (60 s here). Meanwhile chunk 8 reuses (under
    # "skip": donates) the carry the save reads; the file must still hold update 4.
    params, data = problem(1)
    chunk_done, waited = threading.Event(), []
    real = _checkpoint._write_zip

    def slow_write(f, arrays, meta):
        if meta["step"] == 4:
            waited.append(chunk_done.wait(timeout=60))
        real(f, arrays, meta)

    monkeypatch.setattr(_checkpoint, "_write_zip", slow_write)
    res = scanfit.fit(
        mse, params, optax.adam(0.05), data, chunk_steps=4, progress=False, nan_policy=policy,
        checkpoint_dir=tmp_path, keep=3,
        on_chunk=lambda info: chunk_done.set() if info.step == 8 else None,
    )  # fmt: skip
    assert waited == [True]
    skip = policy == "skip"  # another program, which rounds differently: its own reference
    assert_same(res, scanfit.scan_train(mse, params, optax.adam(0.05), data, skip_nonfinite=skip))
    four = jax.tree.map(lambda a: a[:4], data)
    first = scanfit.scan_train(mse, params, optax.adam(0.05), four, skip_nonfinite=skip)
    _, arrays = _checkpoint.read(_checkpoint.path_for(tmp_path, 4))
    np.testing.assert_array_equal(arrays["params['w']"], first.params["w"])
    np.testing.assert_array_equal(arrays["losses"], first.losses)
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path)] == [4, 8, 12]  # all landed


def test_a_failed_save_on_the_thread_is_raised_at_the_next_boundary_with_the_state(
    tmp_path, monkeypatch
):
    params, data = problem(2)
    real = os.replace

    def refuse(src, dst):
        if str(dst).endswith("ckpt-0000000004.npz"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(_checkpoint.os, "replace", refuse)
    with pytest.raises(
        scanfit.CheckpointWriteError,
        match=r"cannot save checkpoint '.*ckpt-0000000004.npz': No space left on device "
        r"\(ENOSPC\)\. The checkpoints saved before are intact; the trained state \(update 8\) "
        r"is attached as \.state\.",
    ) as err:
        scanfit.fit(mse, params, optax.adam(0.05), data, chunk_steps=4, progress=False,
                    nan_policy="skip", checkpoint_dir=tmp_path)  # fmt: skip
    assert err.value.errno == errno.ENOSPC
    eight = jax.tree.map(lambda a: a[:8], data)
    want = scanfit.scan_train(mse, params, optax.adam(0.05), eight, skip_nonfinite=True)
    assert_same(err.value.state, want)
    assert _checkpoint.list_checkpoints(tmp_path) == []
    assert not list(tmp_path.glob(".tmp-ckpt-*"))


def _worker(ckpt, out, *extra):
    proc = subprocess.Popen(
        [sys.executable, _fault_worker.__file__, str(ckpt), str(out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


class _References(dict):
    """The uninterrupted worker runs, by nan_policy "skip" or not, each trained when first asked."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def __missing__(self, skip: bool):
        self[skip] = _fault_worker.train(self.path / str(skip), skip=skip)
        return self[skip]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _References(tmp_path_factory.mktemp("reference"))


def _kill_and_resume(tmp_path, uninterrupted, *, skip: bool, in_save=None, delay=0.0):
    """A worker killed mid-save (``in_save``: (which save, fraction of its bytes on
    disk)) or from outside ``delay`` s after its first checkpoint; every file named
    like a checkpoint must then verify, and the rerun equal the uninterrupted run bitwise."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    extra = ["--skip"] if skip else []
    if in_save is not None:
        proc = _worker(
            ckpt, out, *extra, "--kill-in-save", str(in_save[0]), "--at", str(in_save[1])
        )
    else:
        proc = _worker(ckpt, out, *extra)
        deadline = time.monotonic() + 120
        while not _checkpoint.list_checkpoints(ckpt):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    if proc.returncode == 0:  # it finished before the kill: nothing to resume
        return
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    for _, path in _checkpoint.list_checkpoints(ckpt):
        _checkpoint.read(path)  # raises Unusable for anything torn
    proc = _worker(ckpt, out, *extra)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err
    want = uninterrupted[skip]
    with np.load(out) as got:
        np.testing.assert_array_equal(got["losses"], want.losses)
        np.testing.assert_array_equal(got["w"], want.params["w"])
        np.testing.assert_array_equal(got["b"], want.params["b"])


def test_sigkill_during_a_save_loads_nothing_torn_and_resumes_bitwise(tmp_path, uninterrupted):
    _kill_and_resume(tmp_path, uninterrupted, skip=True, in_save=(3, 0.5))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24))
def test_sigkill_during_saves_many_trials(tmp_path, uninterrupted, seed):
    rng = random.Random(seed)
    skip = rng.random() < 0.5
    if seed % 3:  # in the save thread, at a random save and byte
        _kill_and_resume(
            tmp_path, uninterrupted, skip=skip, in_save=(rng.randint(1, 8), round(rng.random(), 3))
        )
    else:  # from outside, at a random moment
        _kill_and_resume(tmp_path, uninterrupted, skip=skip, delay=rng.random() * 0.4)


@pytest.mark.parametrize("on_cpu", [True, False])
def test_what_the_save_thread_reads_survives_the_carry_being_donated(monkeypatch, on_cpu):
    # On an accelerator the fetcher copies the carry on the device before the next chunk
    # donates it; forced here on CPU devices, where donation really deletes the buffers.
    monkeypatch.setattr(_checkpointer, "_on_cpu", lambda leaves: on_cpu)
    want = {"w": np.arange(6.0, dtype=np.float32), "n": np.int32(3)}
    carry = jax.device_put(want)
    fetch = _checkpointer._fetcher({"params": carry, "losses": np.ones(2)}, donated=True)
    jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(carry)
    got = fetch()
    jax.tree.map(np.testing.assert_array_equal, got["params"], want)
    np.testing.assert_array_equal(got["losses"], np.ones(2))
