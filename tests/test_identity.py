"""An iterable's identity over the whole run: every changed-data resume is refused (naming
what differs) or bitwise equal to a fresh run on the new data."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scanfit

sys.path.insert(0, str(Path(__file__).parent))
import _stream_worker  # noqa: E402

N, B, D = 12, 8, 3  # microbatches per epoch, batch, features
PARAMS = {"w": np.zeros(D, np.float32), "b": np.zeros((), np.float32)}
Mismatch = scanfit.CheckpointMismatchError


def loss(p, batch):
    xb, yb = batch
    return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)


def make_data(seed=0, n=N, b=B):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, b, D)).astype(np.float32)
    return x, (x @ rng.normal(size=(D,))).astype(np.float32)


class Loader:
    """A re-iterable over (x[i], y[i]) with len(), as a data loader over fixed files."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __iter__(self):
        return zip(self.x, self.y)


def fit(data, **kw):
    kw = {"chunk_steps": 3, "progress": False, **kw}
    return scanfit.fit(loss, PARAMS, optax.adam(0.05), data, **kw)


def stop_at(step):
    return lambda info: info.step < step


def assert_same(a, b):
    np.testing.assert_array_equal(a.losses, b.losses)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)


def changed(x, i):
    """``x`` with one number of microbatch ``i`` changed."""
    x = x.copy()
    x[i, 0, 0] += 1
    return x


# ---------------------------------------------------------------- re-iterables


@pytest.mark.parametrize(
    "stop, row, epoch",
    [
        (12, 10, 0),  # stopped at the end of epoch 0 (nothing of epoch 1 taken yet)
        (15, 10, 0),  # stopped in epoch 1 before microbatch 10: epoch 0 took it
        (27, 2, 0),  # stopped in epoch 2: the first epoch that differs is named
    ],
)
def test_data_changed_before_the_resume_point_is_refused(tmp_path, stop, row, epoch):
    x, y = make_data()
    fit(Loader(x, y), epochs=3, checkpoint_dir=tmp_path, on_chunk=stop_at(stop))
    with pytest.raises(
        Mismatch,
        match=rf"data differs from the checkpoint's run: re-read from its start, epoch {epoch} "
        rf"\(microbatches {epoch * N}..{epoch * N + N - 1} of the run\)",
    ):
        fit(Loader(changed(x, row), y), epochs=3, checkpoint_dir=tmp_path)


def test_a_resume_at_an_epoch_boundary_equals_the_uninterrupted_run(tmp_path):
    x, y = make_data()
    want = fit(Loader(x, y), epochs=3)
    fit(Loader(x, y), epochs=3, checkpoint_dir=tmp_path, on_chunk=stop_at(12))
    assert_same(fit(Loader(x, y), epochs=3, checkpoint_dir=tmp_path), want)


def test_data_changed_only_after_the_resume_point_equals_a_fresh_run(tmp_path):
    # A generator of one long epoch: microbatch 10 is taken after the resume at update 6.
    x, y = make_data()
    x2 = changed(x, 10)
    fit(iter(Loader(x, y)), steps_per_epoch=N, checkpoint_dir=tmp_path, on_chunk=stop_at(6))
    got = fit(iter(Loader(x2, y)), steps_per_epoch=N, checkpoint_dir=tmp_path)
    assert_same(got, fit(iter(Loader(x2, y)), steps_per_epoch=N))


def test_a_one_shot_iterator_is_reread_from_its_start(tmp_path):
    x, y = make_data()
    fit(iter(Loader(x, y)), steps_per_epoch=N, checkpoint_dir=tmp_path, on_chunk=stop_at(6))
    with pytest.raises(Mismatch, match=r"the 6 microbatches of epoch 0 before update 6"):
        fit(iter(Loader(changed(x, 5), y)), steps_per_epoch=N, checkpoint_dir=tmp_path)
    half_read = iter(Loader(x, y))
    next(half_read)  # not the fresh iterator of the run: shifted by one microbatch
    with pytest.raises(Mismatch, match=r"the 6 microbatches of epoch 0 before update 6"):
        fit(half_read, steps_per_epoch=N, checkpoint_dir=tmp_path)
    # The whole run done: a rerun re-reads it all and returns the checkpoint's result.
    done = fit(iter(Loader(x, y)), steps_per_epoch=N, checkpoint_dir=tmp_path)
    with pytest.raises(Mismatch, match=r"re-read from its start, epoch 0"):
        fit(iter(Loader(changed(x, 11), y)), steps_per_epoch=N, checkpoint_dir=tmp_path)
    assert_same(fit(iter(Loader(x, y)), steps_per_epoch=N, checkpoint_dir=tmp_path), done)


def test_a_torch_loader_with_other_data_is_refused(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is optional: the bench extra's CPU build")
    x, y = make_data()

    def loader(x):
        rows = torch.utils.data.TensorDataset(
            torch.from_numpy(x.reshape(N * B, D)), torch.from_numpy(y.reshape(N * B))
        )
        collate = lambda s: tuple(np.stack([r[i].numpy() for r in s]) for i in range(2))  # noqa: E731
        return torch.utils.data.DataLoader(rows, batch_size=B, collate_fn=collate)

    want = fit(loader(x), epochs=2)
    fit(loader(x), epochs=2, checkpoint_dir=tmp_path, on_chunk=stop_at(12))
    with pytest.raises(Mismatch, match=r"re-read from its start, epoch 0"):
        fit(loader(changed(x, 3)), epochs=2, checkpoint_dir=tmp_path)
    assert_same(fit(loader(x), epochs=2, checkpoint_dir=tmp_path), want)


# ---------------------------------------------------------------- grain


def grain_loader(x, y, *, seed=3, n=N):
    gp = pytest.importorskip("grain.python")
    sampler = gp.IndexSampler(n, shard_options=gp.NoSharding(), shuffle=True, seed=seed,
                              num_epochs=1)  # fmt: skip
    return gp.DataLoader(
        data_source=_stream_worker.Records(x[:n], y[:n]),
        sampler=sampler,
        worker_count=0,
        read_options=gp.ReadOptions(num_threads=0),
    )


@pytest.mark.parametrize(
    "stop, other, message",
    [
        # the same repr, other contents: grain sets the state; the window re-read differs
        (9, dict(x_scale=2), r"the 3 microbatches 6..8 of the run, re-read from the state"),
        # another seed, more records: grain refuses the state; re-read from the start
        (9, dict(seed=4), r"re-read from its start, the 9 microbatches of epoch 0 before update"),
        (9, dict(n=N + 4), r"re-read from its start, the 9 microbatches of epoch 0 before"),
        # re-iterated for epoch 1 with another seed: its first microbatches re-read differ
        (15, dict(seed=4), r"the 3 microbatches 12..14 of the run, re-read"),
    ],
)
def test_a_grain_loader_with_other_data_is_refused(tmp_path, stop, other, message):
    x, y = make_data(n=N + 4)
    kw = dict(epochs=2, steps_per_epoch=N, checkpoint_dir=tmp_path)
    fit(grain_loader(x, y), on_chunk=stop_at(stop), **kw)  # anchored a chunk (3) before
    x2 = x * other.pop("x_scale", 1)
    with pytest.raises(Mismatch, match=r"data differs from the checkpoint's run: " + message):
        fit(grain_loader(x2, y, **other), **kw)


def test_a_grain_loader_without_repr_resumes(tmp_path, monkeypatch):
    x, y = make_data()
    kw = dict(epochs=2, steps_per_epoch=N)
    want = fit(grain_loader(x, y), **kw)
    fit(grain_loader(x, y), checkpoint_dir=tmp_path, on_chunk=stop_at(15), **kw)
    monkeypatch.setattr(_stream_worker.Records, "__repr__", object.__repr__)
    assert_same(fit(grain_loader(x, y), checkpoint_dir=tmp_path, **kw), want)


# ---------------------------------------------------------------- reasons


def test_a_changed_batch_size_or_epoch_length_is_named(tmp_path):
    x, y = make_data()
    fit(Loader(x, y), checkpoint_dir=tmp_path, on_chunk=stop_at(6))
    with pytest.raises(
        Mismatch,
        match=r"the data contents: each microbatch: another batch size \(8 in the checkpoint, 4 "
        r"in this run\): \[0\] is float32\[8, 3\] in the checkpoint, float32\[4, 3\] in this "
        r"run; \[1\] is float32\[8\] in the checkpoint, float32\[4\] in this run\. Pass",
    ):
        fit(Loader(x[:, :4], y[:, :4]), checkpoint_dir=tmp_path)
    with pytest.raises(
        Mismatch,
        match=r"the data contents: another epoch length: 12 microbatches per epoch in the "
        r"checkpoint, 10 in this run\. Pass",
    ):
        fit(Loader(x[:10], y[:10]), checkpoint_dir=tmp_path)
    with pytest.raises(
        Mismatch, match=r"the data contents: an iterable of microbatches in the checkpoint, arrays"
    ):
        fit((x, y), checkpoint_dir=tmp_path)


def test_arrays_of_another_batch_size_or_length_are_named(tmp_path):
    x, y = make_data()
    fit((x, y), checkpoint_dir=tmp_path, on_chunk=stop_at(6))
    with pytest.raises(
        Mismatch,
        match=r"the data contents: another batch size \(8 in the checkpoint, 4 in this run\): "
        r"\[0\] is float32\[12, 8, 3\] in the checkpoint, float32\[12, 4, 3\] in this run",
    ):
        fit((x[:, :4], y[:, :4]), checkpoint_dir=tmp_path)
    with pytest.raises(
        Mismatch, match=r"another number of microbatches N \(12 in the checkpoint, 10 in this"
    ):
        fit((x[:10], y[:10]), checkpoint_dir=tmp_path)
