"""Data from iterables: streamed against stacked arrays, resumed against uninterrupted."""

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scanfit
from scanfit import _checkpoint, _sources

sys.path.insert(0, str(Path(__file__).parent))
import _stream_worker  # noqa: E402

N, B, D = 24, 8, 4


def assert_same(a, b):
    """Bitwise equality of two results (params, opt_state, losses)."""
    np.testing.assert_array_equal(a.losses, b.losses)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, B, D)).astype(np.float32)
    y = (x @ rng.normal(size=(D,)) + 0.1 * rng.normal(size=(N, B))).astype(np.float32)
    return x, y


PARAMS = {"w": np.zeros(D, np.float32), "b": np.zeros((), np.float32)}


def loss(p, batch):
    xb, yb = batch
    return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)


class Reiterable:
    """Yields (x[i], y[i]) for i < n on every iter(); no len()."""

    def __init__(self, x, y, n=None, short_after=None):
        self.x, self.y, self.n = x, y, len(x) if n is None else n
        self.short_after = short_after  # epochs after which it yields 2 fewer
        self.epochs = 0

    def __iter__(self):
        n = (
            self.n - 2
            if self.short_after is not None and self.epochs >= self.short_after
            else self.n
        )
        self.epochs += 1
        return ((self.x[i], self.y[i]) for i in range(n))


class Sized(Reiterable):
    def __len__(self):
        return self.n


class Listed:
    """A re-iterable over a list, with len()."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def fit(data, **kw):
    return scanfit.fit(loss, PARAMS, optax.adam(0.05), data, progress=False, **kw)


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("chunk", [None, 1, 5, 7])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_iterable_equals_the_same_microbatches_stacked(data, chunk, accumulate):
    x, y = data
    want = fit((x, y), epochs=3, accumulate=accumulate, chunk_steps=chunk)
    got = fit(
        Reiterable(x, y),
        epochs=3,
        accumulate=accumulate,
        chunk_steps=chunk,
        steps_per_epoch=N // accumulate,
    )
    assert_same(got, want)


@pytest.mark.parametrize("nan_policy", ["skip", "ignore"])
def test_iterable_equals_stacked_when_the_carry_is_donated(data, nan_policy):
    # No chunk dispatched ahead here: each chunk's inputs are stacked while the one before runs.
    x, y = data
    want = fit((x, y), epochs=2, chunk_steps=3, nan_policy=nan_policy)
    got = fit(Sized(x, y), epochs=2, chunk_steps=3, nan_policy=nan_policy)
    assert_same(got, want)


def test_generator_len_and_steps_per_epoch(data):
    x, y = data
    want = fit((x, y), chunk_steps=5)
    assert_same(fit((m for m in zip(x, y)), chunk_steps=5, steps_per_epoch=N), want)
    assert_same(fit(Sized(x, y), chunk_steps=5), want)  # len() gives the epoch
    # steps_per_epoch below len(): each epoch takes its first microbatches only.
    short = fit((x[:10], y[:10]), epochs=2, accumulate=2, chunk_steps=3)
    assert_same(fit(Sized(x, y), epochs=2, accumulate=2, chunk_steps=3, steps_per_epoch=5), short)


def test_dict_microbatches_and_the_producer_thread(data, monkeypatch):
    x, y = data

    def dict_loss(p, batch):
        return loss(p, (batch["x"], batch["y"]))

    want = scanfit.fit(dict_loss, PARAMS, 0.05, {"x": x, "y": y}, epochs=2, chunk_steps=5)
    batches = [{"x": a, "y": b} for a, b in zip(x, y)]
    got = scanfit.fit(dict_loss, PARAMS, 0.05, Listed(batches), epochs=2, chunk_steps=5)
    assert_same(got, want)
    monkeypatch.setattr(_sources, "PRODUCER_THREAD", True)
    assert_same(
        fit(Reiterable(x, y), epochs=2, chunk_steps=5, steps_per_epoch=N),
        fit((x, y), epochs=2, chunk_steps=5),
    )


def test_microbatches_of_python_and_jax_leaves(data):
    x, y = data
    want = fit((x, y[:, 0]), chunk_steps=5)
    got = fit(
        ((jnp.asarray(a), float(b[0])) for a, b in zip(x, y)), steps_per_epoch=N, chunk_steps=5
    )
    # A Python float label becomes float64 on the host, then float32 on the device.
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-6)


# ---------------------------------------------------------------- errors


def test_one_shot_iterator_with_several_epochs_is_an_error(data):
    with pytest.raises(
        ValueError, match=r"epochs=2 needs data it can iterate again, but got a one-shot"
    ):
        fit(iter(Reiterable(*data)), epochs=2, steps_per_epoch=N)


def test_unknown_length_needs_steps_per_epoch(data):
    with pytest.raises(ValueError, match=r"iterable of unknown length .* pass steps_per_epoch="):
        fit(Reiterable(*data))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"steps_per_epoch": 0}, r"steps_per_epoch must be an integer >= 1, got 0"),
        ({"steps_per_epoch": 2.5}, r"steps_per_epoch must be an integer >= 1, got 2.5"),
        (
            {"steps_per_epoch": 13, "accumulate": 2},
            r"takes 26 microbatches an epoch, but len\(data\) is 24",
        ),
        (
            {"accumulate": 5},
            r"accumulate=5 must divide len\(data\)=24 microbatches; pass steps_per_epoch=4",
        ),
        ({"key": jax.random.key(0)}, r"key= shuffles stacked arrays .* shuffle there"),
        ({"epochs": 0}, r"epochs must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_for_an_iterable(data, kw, match):
    with pytest.raises(ValueError, match=match):
        fit(Sized(*data), **kw)


def test_steps_per_epoch_with_arrays_is_an_error(data):
    with pytest.raises(ValueError, match=r"steps_per_epoch=5 is for an iterable of microbatches"):
        fit(data, steps_per_epoch=5)


def test_empty_iterable_is_an_error():
    with pytest.raises(ValueError, match=r"gave no microbatch"):
        fit(iter([]), steps_per_epoch=3)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (
            lambda a, b: (a[:7], b),
            r"microbatch 13 of data: leaf 0 has shape \(7, 4\) and dtype float32, "
            r"but microbatch 0 had shape \(8, 4\)",
        ),
        (
            lambda a, b: (a.astype(np.float64), b),
            r"microbatch 13 of data: leaf 0 has shape \(8, 4\) and dtype float64, "
            r"but .* dtype float32",
        ),
        (
            lambda a, b: (a, b, b),
            r"microbatch 13 of data has structure PyTreeDef\(\(\*, \*, \*\)\), "
            r"but microbatch 0 had",
        ),
        (lambda a, b: [a, b], r"microbatch 13 of data has structure PyTreeDef\(\[\*, \*\]\)"),
    ],
)
def test_a_microbatch_that_differs_is_named(data, bad, match):
    x, y = data
    batches = [(a, b) for a, b in zip(x, y)]
    batches[13] = bad(*batches[13])
    with pytest.raises(ValueError, match=match):
        fit(iter(batches), steps_per_epoch=N, chunk_steps=5)


def test_a_non_numeric_leaf_is_an_error(data):
    with pytest.raises(
        TypeError, match=r"microbatch 0 of data: leaf \[1\] must be a numeric array"
    ):
        fit(iter([(data[0][0], "cat")]), steps_per_epoch=1)


def test_a_list_of_microbatches_says_to_stack_them(data):
    batches = list(zip(*data))
    match = (
        r"data is a list of 24 microbatches \(each a tuple of length 2\).*np.stack.*iter\(batches\)"
    )
    with pytest.raises(TypeError, match=match):
        fit(batches)
    with pytest.raises(TypeError, match=match):
        scanfit.scan_train(loss, PARAMS, 0.05, batches)


def test_scan_train_and_sweep_take_arrays_only(data):
    match = r"an iterable of microbatches is streamed by scanfit.fit only"
    with pytest.raises(TypeError, match=match):
        scanfit.scan_train(loss, PARAMS, 0.05, Reiterable(*data))
    with pytest.raises(TypeError, match=match):
        scanfit.sweep(
            loss,
            PARAMS,
            lambda lr: optax.sgd(lr),
            iter(Reiterable(*data)),
            {"lr": np.array([0.1, 0.2])},
        )


def test_a_loader_that_runs_dry_keeps_the_completed_chunks(data, tmp_path):
    x, y = data
    # Epoch 0 has all 24 microbatches, epoch 1 only 22: chunk [45, 50) cannot be filled.
    short = Sized(x, y, short_after=1)
    with pytest.raises(
        scanfit.DataExhaustedError,
        match=r"data ran dry: epoch 1 gave 22 microbatches, but an epoch takes 24 "
        r"\(24 updates x accumulate=1\)\. The 45 updates done are kept.*checkpointed"
        r".*steps_per_epoch=22",
    ) as err:
        fit(short, epochs=3, chunk_steps=5, checkpoint_dir=tmp_path, checkpoint_every=100)
    assert err.value.step == 45
    want = fit((x, y), epochs=3, chunk_steps=5)
    np.testing.assert_array_equal(err.value.state.losses, want.losses[:45])
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path)] == [45]


def test_a_loader_that_runs_dry_in_the_first_chunk(data):
    with pytest.raises(
        scanfit.DataExhaustedError, match=r"epoch 0 gave 20 microbatches.*The 0 updates"
    ) as err:
        fit(Reiterable(*data, n=20), steps_per_epoch=N, chunk_steps=N)
    assert err.value.step == 0 and len(err.value.state.losses) == 0


# ---------------------------------------------------------------- resume


def stop_at(step):
    return lambda info: info.step < step


def meta(path):
    with zipfile.ZipFile(path) as z, z.open("__meta__.npy") as f:
        return json.loads(str(np.lib.format.read_array(f, allow_pickle=False)))


def test_resume_of_a_reiterable_rereads_the_run_and_checks_the_hash(data, tmp_path):
    x, y = data
    kw = dict(epochs=3, accumulate=2, chunk_steps=5, checkpoint_dir=tmp_path)
    want = fit((x, y), epochs=3, accumulate=2, chunk_steps=5)
    fit(Sized(x, y), on_chunk=stop_at(15), **kw)  # stops mid-epoch 1: microbatch 6 of 24
    saved = meta(_checkpoint.list_checkpoints(tmp_path)[-1][1])["source"]
    assert (saved["epoch"], saved["offset"], saved["anchor"]) == (1, 6, None)
    assert len(saved["epochs"]) == 1  # the chain at the end of epoch 0
    assert_same(fit(Sized(x, y), **kw), want)
    # Other data in epoch 0, before the resume point's epoch: re-read from the start.
    kw["checkpoint_dir"] = tmp_path / "again"
    fit(Sized(x, y), on_chunk=stop_at(15), **kw)
    x2 = x.copy()
    x2[3, 0, 0] += 1
    with pytest.raises(
        scanfit.CheckpointMismatchError,
        match=r"data differs from the checkpoint's run: re-read from its start, epoch 0 "
        r"\(microbatches 0..23 of the run\) hash to sha1",
    ):
        fit(Sized(x2, y), **kw)
    with pytest.raises(
        scanfit.CheckpointMismatchError,
        match=r"data gave 4 microbatches in epoch 0, fewer than the 24",
    ):
        fit(Reiterable(x, y, n=4), steps_per_epoch=12, **kw)


def test_an_iterable_does_not_resume_an_arrays_checkpoint(data, tmp_path):
    fit(data, chunk_steps=5, checkpoint_dir=tmp_path, on_chunk=stop_at(10))
    with pytest.raises(scanfit.CheckpointMismatchError, match=r"belongs to another run: .*data"):
        fit(Sized(*data), chunk_steps=5, checkpoint_dir=tmp_path)


def test_resume_of_a_grain_loader_sets_its_state(tmp_path, monkeypatch):
    pytest.importorskip("grain")
    want = _stream_worker.train("grain", tmp_path / "reference")
    _stream_worker.train("grain", tmp_path / "ckpt", on_chunk=stop_at(49))
    saved = meta(_checkpoint.list_checkpoints(tmp_path / "ckpt")[-1][1])["source"]
    anchor = saved["anchor"]
    assert saved["offset"] == 98 and anchor["microbatch"] == 84  # the chunk before
    assert json.loads(anchor["iterator"]["bytes"])["last_seen_indices"]
    starts = _record_rereads(monkeypatch)
    assert_same(_stream_worker.train("grain", tmp_path / "ckpt"), want)
    assert starts == [84]  # set_state there, re-read one chunk: not the whole run


def _record_rereads(monkeypatch) -> list:
    """Where each resume starts re-reading the data (the microbatch index)."""
    starts, seek = [], _sources.StreamSource._seek

    def recording(self, saved, step):
        starts.append(seek(self, saved, step))
        return starts[-1]

    monkeypatch.setattr(_sources.StreamSource, "_seek", recording)
    return starts


def test_a_grain_loader_that_refuses_its_state_is_reread_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("grain")
    want = _stream_worker.train("grain", tmp_path / "reference")
    _stream_worker.train("grain", tmp_path / "ckpt", on_chunk=stop_at(14))
    # grain compares repr(data_source); without a __repr__ it holds an address.
    monkeypatch.setattr(_stream_worker.Records, "__repr__", object.__repr__)
    starts = _record_rereads(monkeypatch)
    assert_same(_stream_worker.train("grain", tmp_path / "ckpt"), want)
    assert starts == [0]  # state refused: re-read from the start, the data are the same


def test_at_most_two_compilations_per_run(data, compilations):
    x, y = data
    opt = optax.adam(0.05)
    scanfit.fit(loss, PARAMS, opt, Sized(x, y), chunk_steps=3, progress=False)  # warm small ops
    fresh = lambda p, b: loss(p, b)  # noqa: E731  (a new function: a fresh cache entry)
    before = compilations()
    scanfit.fit(fresh, PARAMS, opt, Sized(x * 2, y), epochs=3, chunk_steps=5, progress=False)
    assert compilations() - before == 2  # 72 updates: 14 chunks of 5 and one of 2


def test_resume_of_a_grain_dataset_iterator_sets_its_state(data, tmp_path, monkeypatch):
    grain = pytest.importorskip("grain")
    x, y = data
    records = _stream_worker.Records(x, y)

    def loader():
        return iter(grain.MapDataset.source(records).shuffle(seed=4))

    kw = dict(steps_per_epoch=N, chunk_steps=5, checkpoint_dir=tmp_path)
    want = fit(loader(), steps_per_epoch=N, chunk_steps=5)
    fit(loader(), on_chunk=stop_at(10), **kw)
    saved = meta(_checkpoint.list_checkpoints(tmp_path)[-1][1])["source"]
    assert saved["anchor"]["iterator"] == {"json": {"next_index": 5}}  # the chunk before
    starts = _record_rereads(monkeypatch)
    assert_same(fit(loader(), **kw), want)
    assert starts == [5]


def test_resume_after_a_divergence_mid_chunk(data, tmp_path):
    x, y = data
    x = x.copy()
    x[17] = 1e30  # update 17 diverges, inside chunk [15, 20)
    kw = dict(epochs=2, chunk_steps=5, checkpoint_dir=tmp_path)
    with pytest.raises(scanfit.DivergenceError) as err:
        fit(Sized(x, y), **kw)
    assert err.value.step == 17
    saved = meta(_checkpoint.list_checkpoints(tmp_path)[-1][1])["source"]
    assert saved["offset"] == 17 and saved["sha1"]  # mid-chunk: its hash is known too
    with pytest.raises(scanfit.DivergenceError, match=r"diverged at update 17"):
        fit(Sized(x, y), **kw)  # resumed at 17, fast-forwarded, diverges again


def _run_worker(ckpt, out, kind, kill_after=None):
    proc = subprocess.Popen(
        [sys.executable, _stream_worker.__file__, str(ckpt), str(out), kind],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kill_after is not None:
        deadline = time.monotonic() + 120
        while max((s for s, _ in _checkpoint.list_checkpoints(Path(ckpt))), default=0) < kill_after:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the worker saved no checkpoint in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    proc.stderr_text = proc.communicate(timeout=300)[1]
    return proc


def _sigkill_then_resume(tmp_path, kind):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    proc = _run_worker(ckpt, out, kind, kill_after=14)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    killed_at = max(s for s, _ in _checkpoint.list_checkpoints(ckpt))
    assert 14 <= killed_at < 120
    proc = _run_worker(ckpt, out, kind)
    assert proc.returncode == 0, proc.stderr_text
    want = _stream_worker.train(kind, tmp_path / "reference")
    with np.load(out) as got:
        np.testing.assert_array_equal(got["losses"], want.losses)
        np.testing.assert_array_equal(got["w"], want.params["w"])


@pytest.mark.slow  # resume of a re-iterable, without the kill, is tested fast above
def test_sigkill_then_resume_of_a_reiterable_equals_uninterrupted(tmp_path):
    _sigkill_then_resume(tmp_path, "plain")


@pytest.mark.slow
def test_sigkill_then_resume_of_a_grain_loader_equals_uninterrupted(tmp_path):
    pytest.importorskip("grain")
    _sigkill_then_resume(tmp_path, "grain")


def test_torch_loader_with_numpy_collation_equals_arrays(data):
    torch = pytest.importorskip("torch", reason="torch is optional: the bench extra's CPU build")
    x, y = data
    rows_x, rows_y = x.reshape(N * B, D), y.reshape(N * B)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(rows_x), torch.from_numpy(rows_y))

    def collate(samples):
        return tuple(np.stack([s[i].numpy() for s in samples]) for i in range(2))

    loader = torch.utils.data.DataLoader(dataset, batch_size=B, collate_fn=collate)
    assert_same(fit(loader, epochs=2, chunk_steps=5), fit((x, y), epochs=2, chunk_steps=5))


def test_iterable_on_two_devices_equals_stacked(data):
    x, y = data  # the batch axis (8 rows) is split over the two devices
    want = fit((x, y), epochs=2, chunk_steps=5, devices=2)
    assert_same(fit(Sized(x, y), epochs=2, chunk_steps=5, devices=2), want)
