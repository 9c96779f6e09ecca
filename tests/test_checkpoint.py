"""Checkpoints under fault injection: other runs, damaged files, concurrent writers, bad disks.

Every case asserts what a user sees (an error naming the cause, a warning naming
the file) and that nothing wrong is ever loaded: a resumed result is bitwise
equal to an uninterrupted one.
"""

import errno
import io
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scanfit
from scanfit import _checkpoint, _checkpointer, _fingerprint, _fit
from scanfit._cli import main as cli_main
from scanfit._loop import OptaxStep

N, B, D = 8, 4, 3


def mse(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def l1(p, batch):
    x, y = batch
    return jnp.mean(jnp.abs(x @ p["w"] + p["b"] - y))


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, B, D)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
    params = {"w": np.zeros(D, np.float32), "b": np.zeros((), np.float32)}
    return params, (x, y)


PARAMS, DATA = make_problem()
ADAM = optax.adam(1e-3)


def _step(loss_fn):
    """The step factory fit builds for a plain loss and ADAM."""
    return OptaxStep(loss_fn, ADAM)


def train(ckpt, *, loss=mse, params=PARAMS, opt=ADAM, data=DATA, **kw):
    kw = {"chunk_steps": 4, "progress": False, **kw}
    return scanfit.fit(loss, params, opt, data, checkpoint_dir=ckpt, **kw)


def assert_same(a, b):
    np.testing.assert_array_equal(a.losses, b.losses)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A directory holding checkpoints at updates 4 and 8 of ``train`` with its defaults."""
    path = tmp_path_factory.mktemp("saved")
    return path, train(path)


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of ``saved``'s directory."""
    dest = tmp_path / "ckpt"
    shutil.copytree(saved[0], dest)
    return dest


# --- Identity: a checkpoint resumes only the run that wrote it -------------------------

_PROGRAM = r"the update program \(loss_fn or optimizer settings, e.g. the learning rate\) differs"
_SWAPPED = (DATA[0][[0, 1, 2, 3, 5, 4, 6, 7]], DATA[1][[0, 1, 2, 3, 5, 4, 6, 7]])
_MIDDLE = (DATA[0].copy(), DATA[1])
_MIDDLE[0][4, 1, 2] += 1e-3
_WARM = jax.tree.map(lambda a: a + 1, ADAM.init(PARAMS))  # same shapes, other values


@pytest.mark.parametrize(
    "change, match",
    [
        ({"opt": optax.adam(1e-2)}, _PROGRAM),
        ({"opt": optax.adam(1e-3, b1=0.8)}, _PROGRAM),
        ({"opt": optax.sgd(1e-3, momentum=0.9)}, r"optimizer state: \[0\]\.trace\['b'\] is ab"),
        ({"loss": l1}, _PROGRAM),
        ({"params": {"w": np.ones(D, np.float32), "b": PARAMS["b"]}}, "params: same shapes"),
        ({"params": {**PARAMS, "c": np.zeros(2, np.float32)}}, r"\['c'\] is absent in the c"),
        ({"opt_state": _WARM}, "the initial optimizer state: same shapes, other contents"),
        ({"data": _MIDDLE}, "the data contents: same shapes, other contents"),
        ({"data": _SWAPPED}, "the data contents: same shapes, other contents"),
        ({"data": (DATA[0][:, :2], DATA[1][:, :2])}, r"\[0\] is float32\[8, 4, 3\] in the"),
        (
            {"key": jax.random.key(0)},
            r"the key \(microbatch order\): None in the checkpoint, given",
        ),
        ({"accumulate": 2}, "accumulate: 1 in the checkpoint, 2 in this run"),
        ({"skip_nonfinite": True}, r"policy \(nan_policy, skip_nonfinite\): 'raise' in the"),
        ({"nan_policy": "skip"}, r"policy \(nan_policy, skip_nonfinite\): 'raise' in the"),
        ({"nan_policy": "ignore", "epochs": 2}, None),  # no non-finite update yet: the same
    ],
)
def test_a_changed_input_is_named_never_resumed_silently(ckpt, change, match):
    if match is None:
        assert_same(train(ckpt, **change), scanfit.scan_train(mse, PARAMS, ADAM, DATA, epochs=2))
        return
    with pytest.raises(scanfit.CheckpointMismatchError, match=match):
        train(ckpt, **change)
    assert train(ckpt).losses.shape == (8,)  # the lock was released: the right run resumes


def test_another_key_is_named(tmp_path):
    train(tmp_path, key=jax.random.key(1), epochs=2)
    with pytest.raises(
        scanfit.CheckpointMismatchError, match=r"key \(microbatch order\): same shapes, other"
    ):
        train(tmp_path, key=jax.random.key(2), epochs=2)


def test_more_or_fewer_epochs_continue_the_same_run_or_are_refused(ckpt):
    longer = train(ckpt, epochs=3)
    assert_same(longer, scanfit.scan_train(mse, PARAMS, ADAM, DATA, epochs=3))
    with pytest.raises(
        scanfit.CheckpointMismatchError, match="is at update 24, past the 16 updates of this run"
    ):
        train(ckpt, epochs=2)


def test_raise_and_ignore_are_one_run_until_an_update_is_non_finite(tmp_path):
    x, y = DATA[0].copy(), DATA[1]
    x[5, 0, 0] = np.nan
    with pytest.raises(scanfit.DivergenceError, match="diverged at update 5"):
        train(tmp_path, data=(x, y))
    # The good state saved before update 5 goes on under "ignore", through the NaN.
    ignored = train(tmp_path, data=(x, y), nan_policy="ignore")
    assert int(ignored.first_nonfinite) == 5
    assert_same(ignored, scanfit.scan_train(mse, PARAMS, ADAM, (x, y)))
    with pytest.raises(
        scanfit.CheckpointMismatchError,
        match=r"non-finite policy \(nan_policy, skip_nonfinite\): 'ignore' in the checkpoint, "
        "'raise' in this run",
    ):
        train(tmp_path, data=(x, y), epochs=2)


def test_data_digest_is_the_same_for_device_host_and_memmap_and_reads_in_blocks(
    tmp_path, monkeypatch
):
    x = np.random.default_rng(1).normal(size=(64, 5, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    memmap = np.load(tmp_path / "x.npy", mmap_mode="r")
    want = _fingerprint.tree_digest((x,))
    assert _fingerprint.tree_digest((jnp.asarray(x),)) == want
    monkeypatch.setattr(_fingerprint, "_BLOCK", 100)  # many small reads, same bytes
    assert _fingerprint.tree_digest((memmap,)) == want
    assert _fingerprint.tree_digest((np.asfortranarray(x),)) == want  # bytes in C order
    y = x.copy()
    y[63, 4, 6] = np.nextafter(y[63, 4, 6], np.inf)  # one ulp in the last block
    assert _fingerprint.tree_digest((y,))["sha256"] != want["sha256"]


def test_program_digest_ignores_function_names():
    def loss_a(p, batch):
        return mse(p, batch)

    def loss_b(p, batch):
        return mse(p, batch)

    state = _fit._fresh_state(PARAMS, None, None, optimizer=ADAM)
    texts = [
        _checkpointer._update_program(_step(jax.jit(f)), state, DATA, None)
        for f in (loss_a, loss_b)
    ]
    assert "@loss_a" in texts[0] and "@loss_b" in texts[1]
    assert _fingerprint.program_digest(texts[0]) == _fingerprint.program_digest(texts[1])


def test_tree_digest_of_static_functions_ignores_their_addresses():
    # As in flax's TrainState (tx, apply_fn): functions in the static part of a pytree.
    def make(scale):
        return lambda x: scale * x  # a new function object each time

    a = jax.tree_util.Partial(make(2.0), jnp.ones(3))
    b = jax.tree_util.Partial(make(2.0), jnp.ones(3))
    assert str(jax.tree.structure(a)) != str(jax.tree.structure(b))  # "at 0x..." differs
    assert _fingerprint.tree_digest(a) == _fingerprint.tree_digest(b)
    other = jax.tree_util.Partial(mse, jnp.ones(3))
    assert _fingerprint.tree_digest(a)["treedef"] != _fingerprint.tree_digest(other)["treedef"]


_DIGEST_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import test_checkpoint as t
    from scanfit import _checkpointer, _fingerprint, _fit
    state = _fit._fresh_state(t.PARAMS, None, None, optimizer=t.ADAM)
    print(_fingerprint.program_digest(
        _checkpointer._update_program(t._step(t.mse), state, t.DATA, None)))
    """
)


def test_program_digest_is_the_same_in_another_process():
    state = _fit._fresh_state(PARAMS, None, None, optimizer=ADAM)
    here = _fingerprint.program_digest(_checkpointer._update_program(_step(mse), state, DATA, None))
    script = _DIGEST_SCRIPT.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == here


def test_cli_with_a_changed_flag_on_a_checkpoint_dir_is_one_line_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=x.sum(1))
    argv = ["train", "--data", tmp_path / "d.npz", "--checkpoint-dir", tmp_path / "c", "--quiet"]
    assert cli_main([str(a) for a in [*argv, "--lr", "0.001"]]) == 0
    capsys.readouterr()
    assert cli_main([str(a) for a in [*argv, "--lr", "0.01"]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("scanfit: error: the newest checkpoint in") and "update program" in err


# --- Integrity: a damaged file is skipped with a warning, never loaded ----------------------


def _arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _read_or_none(path):
    """The arrays ``read`` returns, or None if it refused the file; anything else fails."""
    try:
        return _checkpoint.read(path)[1]
    except _checkpoint.Unusable:
        return None


def _local_data(data: bytes, info: zipfile.ZipInfo) -> int:
    """Offset of a member's bytes: after its local header, whose extra field may differ from
    the central directory's."""
    at = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
    return at + 30 + name_len + extra_len


def _central_entry(data: bytes, name: str) -> int:
    pos = data.index(b"PK\x01\x02")
    while data[pos + 46 : pos + 46 + len(name)] != name.encode():
        pos = data.index(b"PK\x01\x02", pos + 1)
    return pos


def _header_offsets(data: bytes) -> list[int]:
    """Byte offsets of zip headers, .npy headers and the central directory of a checkpoint."""
    offsets = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            offsets += range(info.header_offset, _local_data(data, info) + 128)
    offsets += range(data.index(b"PK\x01\x02"), len(data))
    return sorted(set(offsets))


def _flip_sweep(path, positions, tmp_path):
    """Flips each bit at ``positions`` in turn; returns (refused, identical): never different."""
    good = _read_or_none(path)
    data = path.read_bytes()
    victim = tmp_path / "victim.npz"
    refused = identical = 0
    for pos, bit in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << bit
        victim.write_bytes(bytes(flipped))
        got = _read_or_none(victim)
        if got is None:
            refused += 1
            continue
        assert got.keys() == good.keys(), (pos, bit)
        for k in good:  # a flip that reads back identical touched no content (e.g. a date)
            np.testing.assert_array_equal(got[k], good[k], err_msg=f"flip at {pos}.{bit}")
            assert got[k].dtype == good[k].dtype
        identical += 1
    return refused, identical


def test_sampled_bit_flips_are_refused_or_harmless(saved, tmp_path):
    path = _checkpoint.path_for(saved[0], 8)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    headers = _header_offsets(data)
    positions = [(int(p), int(rng.integers(8))) for p in rng.choice(headers, 200)]
    positions += [(int(p), int(rng.integers(8))) for p in rng.integers(0, len(data), 100)]
    refused, identical = _flip_sweep(path, positions, tmp_path)
    assert refused + identical == 300 and refused > 200


@pytest.mark.slow
def test_every_bit_flip_is_refused_or_harmless(saved, tmp_path):
    path = _checkpoint.path_for(saved[0], 8)
    size = path.stat().st_size
    positions = [(p, b) for p in range(size) for b in range(8)]
    refused, identical = _flip_sweep(path, positions, tmp_path)
    assert refused + identical == 8 * size


def test_npy_header_length_flip_that_numpy_loads_shifted_is_refused(tmp_path):
    opt = optax.sgd(0.01)
    train(tmp_path, loss=big_loss, params=BIG, opt=opt)
    path = _checkpoint.path_for(tmp_path, 8)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("params['w'].npy")
    npy = _local_data(bytes(data), info)
    data[npy + 8] ^= 0x10  # HEADER_LEN 16 bytes off: the array starts 16 bytes off
    path.write_bytes(bytes(data))
    with np.load(path, allow_pickle=False) as f:  # numpy alone: a wrong array, no error
        shifted = f["params['w']"]
    assert shifted.shape == BIG["w"].shape
    with (
        pytest.warns(scanfit.CheckpointWarning, match=r"to ckpt-0000000008.npz.set-aside"),
        pytest.warns(
            scanfit.CheckpointWarning,
            match=r"skipping checkpoint .*ckpt-0000000008.npz: BadZipFile: Bad CRC-32",
        ),
    ):
        res = train(tmp_path, loss=big_loss, params=BIG, opt=opt)  # resumes from update 4
    assert_same(res, scanfit.scan_train(big_loss, BIG, opt, DATA))
    assert not np.array_equal(shifted, res.params["w"])


@pytest.mark.parametrize(
    "where, bit, match",
    [
        ("central_flags", 0, "RuntimeError: File .* is encrypted"),
        ("central_version", 6, "NotImplementedError: zip file version"),
        ("local_name", 1, "BadZipFile"),
    ],
)
def test_zip_damage_of_any_kind_is_a_scanfit_error(ckpt, where, bit, match):
    path = _checkpoint.path_for(ckpt, 8)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("losses.npy")
    central = _central_entry(bytes(data), "losses.npy")
    offset = {
        "central_flags": central + 8,
        "central_version": central + 6,
        "local_name": info.header_offset + 30,
    }[where]
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))
    with pytest.raises(_checkpoint.Unusable, match=match):
        _checkpoint.read(path)


def test_edited_values_are_refused(ckpt, tmp_path):
    path = _checkpoint.path_for(ckpt, 8)
    original = _arrays(path)
    edits = 0
    for key, a in original.items():
        if key.startswith("__"):
            continue
        edited = dict(original)
        b = a.copy()
        b.reshape(-1)[0] = b.reshape(-1)[0] + 1 if b.dtype.kind != "b" else ~b.reshape(-1)[0]
        edited[key] = b
        np.savez(tmp_path / "edited.npz", **edited)
        with pytest.raises(_checkpoint.Unusable, match=f"array {re.escape(repr(key))} does not"):
            _checkpoint.read(tmp_path / "edited.npz")
        edits += 1
    meta = dict(original)
    meta["__meta__"] = np.asarray(str(original["__meta__"]).replace('"step": 8', '"step": 9'))
    np.savez(tmp_path / "edited.npz", **meta)
    with pytest.raises(_checkpoint.Unusable, match="metadata does not match its checksum"):
        _checkpoint.read(tmp_path / "edited.npz")
    extra = dict(original, more=np.zeros(1))
    np.savez(tmp_path / "edited.npz", **extra)
    with pytest.raises(_checkpoint.Unusable, match=r"missing or extra arrays \['more'\]"):
        _checkpoint.read(tmp_path / "edited.npz")
    assert edits >= 8


def test_truncations_are_refused(saved, tmp_path):
    data = _checkpoint.path_for(saved[0], 8).read_bytes()
    victim = tmp_path / "victim.npz"
    for length in [0, 1, 4, 100, *range(200, len(data), 97), len(data) - 1]:
        victim.write_bytes(data[:length])
        with pytest.raises(_checkpoint.Unusable):
            _checkpoint.read(victim)


def test_out_of_range_counters_with_valid_checksums_are_skipped(ckpt):
    meta, arrays = _checkpoint.read(_checkpoint.path_for(ckpt, 8))
    arrays["counters['first_nonfinite']"] = np.asarray(-1393, np.int32)
    meta = {k: v for k, v in meta.items() if k not in ("step", "arrays")}
    _checkpoint.write_arrays(ckpt, 8, arrays, meta)  # checksums that match the edit
    with (
        pytest.warns(scanfit.CheckpointWarning, match=r"to ckpt-0000000008.npz.set-aside"),
        pytest.warns(
            scanfit.CheckpointWarning,
            match=r"ckpt-0000000008.npz: its counters are out of range for update 8: "
            "skipped=0, first_nonfinite=-1393",
        ),
    ):
        res = train(ckpt, epochs=2)
    assert_same(res, scanfit.scan_train(mse, PARAMS, ADAM, DATA, epochs=2))


def test_bf16_optimizer_state_round_trips_bitwise(tmp_path):
    opt = optax.adam(0.1, mu_dtype=jnp.bfloat16)
    full = train(tmp_path / "full", opt=opt, epochs=2)
    train(tmp_path / "half", opt=opt, epochs=1)
    half = tmp_path / "half"
    with np.load(_checkpoint.path_for(half, 8), allow_pickle=False) as f:
        assert f["opt_state[0].mu['w']"].dtype == np.dtype("V2")  # how NumPy stores bf16
    _, arrays = _checkpoint.read(_checkpoint.path_for(half, 8))
    assert arrays["opt_state[0].mu['w']"].dtype == jnp.bfloat16
    assert_same(train(half, opt=opt, epochs=2), full)


# --- Pruning never removes this run's checkpoints in favour of unusable ones ---------------


def test_unusable_higher_steps_are_left_alone_and_never_counted(ckpt, tmp_path):
    foreign = tmp_path / "foreign"
    train(foreign, opt=optax.adam(0.5), epochs=4)
    shutil.copy(_checkpoint.path_for(foreign, 32), _checkpoint.path_for(ckpt, 32))
    _checkpoint.path_for(ckpt, 40).write_bytes(b"")
    edited = _arrays(_checkpoint.path_for(ckpt, 8))
    edited["losses"] = edited["losses"] * 2
    np.savez(_checkpoint.path_for(ckpt, 36), **edited)
    unusable = (
        pytest.warns(scanfit.CheckpointWarning, match="ckpt-0000000040.npz: BadZipFile"),
        pytest.warns(scanfit.CheckpointWarning, match="36.npz: array 'losses' does not match"),
    )
    with (
        unusable[0],
        unusable[1],
        pytest.raises(scanfit.CheckpointMismatchError, match=r"\(step 32\) belongs to another"),
    ):
        train(ckpt, epochs=3)  # skips 40 and 36, stops at another run's 32
    _checkpoint.path_for(ckpt, 32).unlink()
    unusable = (
        pytest.warns(scanfit.CheckpointWarning, match="ckpt-0000000040.npz: BadZipFile"),
        pytest.warns(scanfit.CheckpointWarning, match="36.npz: array 'losses' does not match"),
    )
    with unusable[0], unusable[1]:
        res = train(ckpt, epochs=3, keep=2)
    assert_same(res, scanfit.scan_train(mse, PARAMS, ADAM, DATA, epochs=3))
    names = sorted(p.name for p in ckpt.glob("ckpt-*"))
    assert names == [f"ckpt-00000000{s}.npz" for s in (20, 24, 36, 40)]


def test_resume_false_moves_other_checkpoints_aside_and_a_later_resume_finds_the_new_run(
    ckpt,
):
    other = train(ckpt, opt=optax.adam(0.5), epochs=3, resume=False, keep=5)
    assert sorted(p.name for p in (ckpt / "previous-1").iterdir()) == [
        "ckpt-0000000004.npz",
        "ckpt-0000000008.npz",
    ]
    calls = []
    again = train(ckpt, opt=optax.adam(0.5), epochs=3, on_chunk=calls.append)
    assert calls == [] and len(_checkpoint.list_checkpoints(ckpt)) == 5
    assert_same(again, other)
    first = train(ckpt / "previous-1", epochs=2)  # the first run, where it was moved
    assert_same(first, scanfit.scan_train(mse, PARAMS, ADAM, DATA, epochs=2))


# --- One writer per directory -------------------------------------------------------------


def test_a_second_fit_on_a_held_directory_fails_at_once_and_touches_nothing(tmp_path):
    errors = []

    def second(info):
        (tmp_path / ".tmp-ckpt-in-flight.npz").write_bytes(b"the first run's")
        with pytest.raises(scanfit.CheckpointLockedError) as err:
            train(tmp_path)
        errors.append(str(err.value))
        assert (tmp_path / ".tmp-ckpt-in-flight.npz").exists()

    train(tmp_path, on_chunk=second, chunk_steps=8)
    assert errors == [
        f"checkpoint_dir {str(tmp_path)!r} is in use by another run (process {os.getpid()} "
        f"holds {str(tmp_path / '.lock')!r}): one writer per directory. Wait for it to "
        "finish, or pass another checkpoint_dir."
    ]
    assert train(tmp_path).losses.shape == (8,)  # released at the end


_HOLDER = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "os.write(fd, b'%d' % os.getpid())\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_lock_held_by_another_process_blocks_until_that_process_dies(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / ".lock")], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline() == b"held\n"
        with pytest.raises(
            scanfit.CheckpointLockedError, match=rf"in use by another run \(process {proc.pid} "
        ):
            train(tmp_path)
        assert not list(tmp_path.glob("ckpt-*"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert train(tmp_path).losses.shape == (8,)  # the dead holder's lock does not block


# --- Bad paths and bad disks ---------------------------------------------------------------


def test_empty_path_file_path_and_checkpoint_named_directory_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint_dir must be a directory path, got ''"):
        train("")
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"checkpoint_dir '.*f' exists and is not a directory"):
        train(tmp_path / "f")
    (tmp_path / "d" / "ckpt-0000000004.npz").mkdir(parents=True)
    with pytest.raises(
        scanfit.CheckpointWriteError,
        match=r"holds 'ckpt-0000000004.npz', which is not a file: a checkpoint cannot be saved",
    ):
        train(tmp_path / "d")


@pytest.mark.parametrize(
    "code, reason",
    [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")],
)
def test_a_write_error_while_saving_keeps_the_last_checkpoint_and_attaches_the_state(
    tmp_path, monkeypatch, code, reason
):
    # Root ignores permissions, and a file system with a file open for writing (the
    # lock) cannot be remounted read-only: the error is injected where the save lands.
    real = os.replace

    def refuse(src, dst):
        if str(dst).endswith("ckpt-0000000008.npz"):
            raise OSError(code, reason)
        return real(src, dst)

    monkeypatch.setattr(_checkpoint.os, "replace", refuse)
    with pytest.raises(
        scanfit.CheckpointWriteError,
        match=rf"cannot save checkpoint '.*ckpt-0000000008.npz': {reason} "
        rf"\({errno.errorcode[code]}\)\. The checkpoints saved before are intact; the trained "
        r"state \(update 8\) is attached as \.state\.",
    ) as err:
        train(tmp_path)
    assert err.value.errno == code and isinstance(err.value, OSError)
    assert_same(err.value.state, scanfit.scan_train(mse, PARAMS, ADAM, DATA))
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path)] == [4]
    assert not list(tmp_path.glob(".tmp-ckpt-*"))
    _checkpoint.read(_checkpoint.path_for(tmp_path, 4))


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 KiB tmpfs mounted at tmp_path/fs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def _remount(mnt, mode):
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


BIG = {"w": np.zeros((D, 1500), np.float32), "b": np.zeros(1500, np.float32)}  # ~24 KB


def big_loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"] - y[..., None]) ** 2)


def test_a_full_disk_keeps_the_last_checkpoint_and_attaches_the_state(tmpfs):
    opt = optax.sgd(0.01)
    with pytest.raises(
        scanfit.CheckpointWriteError,
        match=r"cannot save checkpoint '.*\.npz': No space left on device \(ENOSPC\)",
    ) as err:
        train(tmpfs, loss=big_loss, params=BIG, opt=opt, chunk_steps=1, epochs=3, keep=8)
    step = len(err.value.state.losses)
    assert err.value.errno == errno.ENOSPC and err.value.filename.startswith(str(tmpfs))
    want = scanfit.scan_train(big_loss, BIG, opt, jax.tree.map(lambda a: a[:step], DATA))
    assert_same(err.value.state, want)
    saved = _checkpoint.list_checkpoints(tmpfs)
    # Every earlier one is there and sound. The failed save ran while the next chunk
    # computed: it surfaces at that chunk's end, with that chunk's state attached.
    assert saved and saved[-1][0] == step - 2
    for _, path in saved:
        _checkpoint.read(path)
    assert not list(tmpfs.glob(".tmp-ckpt-*"))


def test_a_read_only_directory_is_found_before_training(tmpfs):
    train(tmpfs)
    (tmpfs / ".tmp-ckpt-stale.npz").write_bytes(b"a dead writer's")
    _remount(tmpfs, "ro")
    calls = []
    with pytest.raises(
        scanfit.CheckpointWriteError,
        match=r"cannot write checkpoints in '.*fs': Read-only file system \(EROFS\)",
    ) as err:
        train(tmpfs, epochs=2, on_chunk=calls.append)
    assert calls == [] and err.value.errno == errno.EROFS and err.value.state is None


def _two_processes(out: Path) -> list[str]:
    """Runs tests/_dist_worker.py as processes 0 and 1 (one run trained together)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).parent / "_dist_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(pid), str(port), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    return outputs


@pytest.mark.slow  # the fast sample of two processes: tests/test_parallel.py
def test_two_processes_resume_from_process_0s_checkpoints(tmp_path):
    # Each process fingerprints its own share of the data; the digest combines all shares,
    # so process 1 agrees with the checkpoint process 0 wrote (else it would raise alone,
    # and process 0 would wait for it forever).
    _two_processes(tmp_path)
    with np.load(tmp_path / "result.npz") as f:
        first = {k: f[k] for k in f.files}
    (tmp_path / "result.npz").unlink()
    final = _checkpoint.path_for(tmp_path / "ckpt", 48)
    written = final.stat().st_mtime_ns
    _two_processes(tmp_path)  # resumes from the final checkpoint: nothing left to train
    assert final.stat().st_mtime_ns == written
    with np.load(tmp_path / "result.npz") as f:
        for k in first:
            np.testing.assert_array_equal(f[k], first[k])


def test_sharded_digest_of_static_functions_ignores_their_addresses():
    from scanfit import _sharding

    def make(scale):
        return lambda x: scale * x

    a = jax.tree_util.Partial(make(2.0), jnp.ones(3))
    b = jax.tree_util.Partial(make(2.0), jnp.ones(3))
    assert _sharding.digest(a) == _sharding.digest(b)
