"""fit: chunked against unchunked, streamed against in-memory, killed against uninterrupted."""

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scanfit
from scanfit import _checkpoint, _driver, _fit
from scanfit._driver import _chunk_donating

sys.path.insert(0, str(Path(__file__).parent))
import _fault_worker  # noqa: E402
from test_loop import init_params, make_data, mlp_loss  # noqa: E402


def assert_same(a, b):
    """Bitwise equality of two results (params, opt_state, losses)."""
    np.testing.assert_array_equal(a.losses, b.losses)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    params = init_params(rng, np.float32)
    data = make_data(rng, 20, dtype=np.float32)
    return params, data


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("shuffle", [False, True])
def test_chunked_equals_scan_train_bitwise(problem, on_device, shuffle):
    params, data = problem
    key = jax.random.key(1) if shuffle else None
    opt = optax.adamw(optax.cosine_decay_schedule(0.01, 60), weight_decay=0.01)
    ref = scanfit.scan_train(
        mlp_loss, params, opt, jax.tree.map(jnp.asarray, data), epochs=3, key=key, accumulate=2
    )
    if on_device:
        data = jax.tree.map(jnp.asarray, data)
    for chunk in (None, 1, 7, 10, 30):  # 30 updates: dividing, not dividing, whole run
        res = scanfit.fit(
            mlp_loss,
            params,
            opt,
            data,
            epochs=3,
            key=key,
            accumulate=2,
            chunk_steps=chunk,
            progress=False,
        )
        assert_same(res, ref)


def test_memmap_streaming_equals_in_memory(problem, tmp_path):
    params, (x, y) = problem
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    mm = (np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r"))
    key = jax.random.key(3)
    streamed = scanfit.fit(
        mlp_loss, params, optax.adam(0.01), mm, epochs=2, key=key, chunk_steps=6, progress=False
    )
    in_memory = scanfit.scan_train(mlp_loss, params, optax.adam(0.01), (x, y), epochs=2, key=key)
    assert_same(streamed, in_memory)


def test_host_chunks_hold_only_one_chunk_of_data(problem, monkeypatch):
    params, data = problem
    shapes = []
    real = jax.device_put
    monkeypatch.setattr(
        jax,
        "device_put",
        lambda x, *a, **k: (
            shapes.append([leaf.shape for leaf in jax.tree.leaves(x)]) or real(x, *a, **k)
        ),
    )
    scanfit.fit(mlp_loss, params, 0.01, data, chunk_steps=8, progress=False)
    shapes = [s for s in shapes if s and len(s[0]) > 1]  # data chunks, not the loss history
    assert shapes == [[(8, 5, 3), (8, 5, 2)]] * 2 + [[(4, 5, 3), (4, 5, 2)]]


def test_at_most_two_compilations_per_run(problem, compilations):
    params, data = problem
    opt = optax.sgd(0.01)
    scanfit.fit(mlp_loss, params, opt, data, chunk_steps=3, progress=False)  # warm small ops
    loss = lambda p, b: mlp_loss(p, b)  # noqa: E731  (a new function: a fresh cache entry)
    before = compilations()
    scanfit.fit(loss, params, opt, data, epochs=5, chunk_steps=7, progress=False)
    assert compilations() - before == 2  # 100 updates: chunks of 7 and one of 2


def test_donation_is_used_outside_raise_mode(problem):
    params, data = problem
    before = _chunk_donating._cache_size()
    res = scanfit.fit(
        mlp_loss, params, 0.01, data, chunk_steps=5, nan_policy="ignore", progress=False
    )
    assert _chunk_donating._cache_size() == before + 1
    assert_same(res, scanfit.scan_train(mlp_loss, params, 0.01, data))


def test_on_chunk_sees_every_chunk_and_can_stop_early(problem, tmp_path):
    params, data = problem
    seen = []

    def on_chunk(info):
        seen.append((info.step, info.epoch, info.losses.shape, info.total))
        assert np.isfinite(info.elapsed) and info.params["scale"].shape == ()
        return info.step < 24

    res = scanfit.fit(
        mlp_loss,
        params,
        0.01,
        data,
        epochs=3,
        chunk_steps=8,
        on_chunk=on_chunk,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert seen == [(8, 0, (8,), 60), (16, 0, (8,), 60), (24, 1, (8,), 60)]
    assert res.losses.shape == (24,)
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path)][-1] == 24
    full = scanfit.scan_train(mlp_loss, params, 0.01, data, epochs=3)
    resumed = scanfit.fit(
        mlp_loss,
        params,
        0.01,
        data,
        epochs=3,
        chunk_steps=8,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert_same(resumed, full)


@pytest.mark.parametrize(
    "policy, max_bytes, ahead",
    [("raise", _driver._SPECULATE_MAX_BYTES, True), ("raise", 0, False), ("ignore", None, False)],
)
def test_next_chunk_is_dispatched_before_the_host_waits_only_without_donation(
    problem, monkeypatch, policy, max_bytes, ahead
):
    # Under "raise" the carry is not donated, so chunk k+1 can start on chunk k's
    # outputs before the host reads them; a donated carry could not be read after.
    # A carry over the size limit is not worth a third copy: no dispatch ahead.
    params, data = problem
    if max_bytes is not None:
        monkeypatch.setattr(_driver, "_SPECULATE_MAX_BYTES", max_bytes)
    events = []
    for name in ("_chunk", "_chunk_donating"):
        real = getattr(_driver, name)
        monkeypatch.setattr(
            _driver,
            name,
            lambda *a, _real=real, **k: events.append("d") or _real(*a, **k),
        )
    scanfit.fit(
        mlp_loss,
        params,
        0.01,
        data,
        chunk_steps=4,
        nan_policy=policy,
        on_chunk=lambda info: events.append(info.step),
        progress=False,
    )
    # "d": a chunk dispatched; a number: on_chunk seeing the chunk that ends there.
    want = "d d 4 d 8 d 12 d 16 20" if ahead else "d 4 d 8 d 12 d 16 d 20"
    assert " ".join(map(str, events)) == want


def test_on_chunk_and_early_stop_see_their_own_chunk_not_the_one_dispatched_ahead(problem):
    params, data = problem
    opt = optax.adam(0.01)
    seen = {}

    def on_chunk(info):
        seen[info.step] = jax.tree.map(np.asarray, info.params)
        return info.step < 12

    res = scanfit.fit(mlp_loss, params, opt, data, chunk_steps=6, on_chunk=on_chunk, progress=False)
    assert sorted(seen) == [6, 12]
    for step, got in seen.items():
        want = scanfit.scan_train(
            mlp_loss, params, opt, jax.tree.map(lambda a, n=step: a[:n], data)
        )
        jax.tree.map(np.testing.assert_array_equal, got, want.params)
    assert_same(
        res, scanfit.scan_train(mlp_loss, params, opt, jax.tree.map(lambda a: a[:12], data))
    )


def test_resume_after_the_end_returns_the_saved_result_without_training(problem, tmp_path):
    params, data = problem
    first = scanfit.fit(
        mlp_loss, params, 0.01, data, chunk_steps=6, checkpoint_dir=tmp_path, progress=False
    )
    calls = []
    again = scanfit.fit(
        mlp_loss,
        params,
        0.01,
        data,
        chunk_steps=6,
        checkpoint_dir=tmp_path,
        progress=False,
        on_chunk=calls.append,
    )
    assert calls == []
    assert_same(again, first)


def test_resume_continues_into_more_epochs(problem, tmp_path):
    params, data = problem
    key = jax.random.key(5)
    scanfit.fit(
        mlp_loss, params, 0.01, data, epochs=1, key=key, checkpoint_dir=tmp_path, progress=False
    )
    longer = scanfit.fit(
        mlp_loss, params, 0.01, data, epochs=3, key=key, checkpoint_dir=tmp_path, progress=False
    )
    assert_same(longer, scanfit.scan_train(mlp_loss, params, 0.01, data, epochs=3, key=key))


def test_checkpoints_keep_the_newest(problem, tmp_path):
    params, data = problem
    scanfit.fit(
        mlp_loss,
        params,
        0.01,
        data,
        epochs=2,
        chunk_steps=5,
        checkpoint_every=10,
        keep=2,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path)] == [30, 40]
    assert not list(tmp_path.glob(".tmp*"))


def test_checkpoint_holds_state_history_and_metadata(problem, tmp_path):
    params, data = problem
    res = scanfit.fit(
        mlp_loss, params, optax.adam(0.01), data, checkpoint_dir=tmp_path, progress=False
    )
    meta, arrays = _checkpoint.read(_checkpoint.path_for(tmp_path, 20))
    assert meta["step"] == 20 and meta["scanfit_version"] == scanfit.__version__
    assert meta["fingerprint"]["data"]["leaves"]["[0]"] == [[20, 5, 3], "float32"]
    np.testing.assert_array_equal(arrays["losses"], res.losses)
    np.testing.assert_array_equal(arrays["params['layers'][0][0]"], res.params["layers"][0][0])
    with np.load(_checkpoint.path_for(tmp_path, 20), allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)


def test_mismatched_checkpoint_names_what_differs(problem, tmp_path):
    params, data = problem
    scanfit.fit(mlp_loss, params, 0.01, data, checkpoint_dir=tmp_path, progress=False)
    wider = dict(params, scale=np.ones(2, np.float32))
    with pytest.raises(
        scanfit.CheckpointMismatchError,
        match=r"belongs to another run: the initial params: \['scale'\] is float32\[\] in the "
        r"checkpoint, float32\[2\] in this run\. Pass another checkpoint_dir",
    ):
        scanfit.fit(mlp_loss, wider, 0.01, data, checkpoint_dir=tmp_path, progress=False)
    other = (data[0] + 1, data[1])
    with pytest.raises(
        scanfit.CheckpointMismatchError,
        match=r"run: the data contents: same shapes, other contents\. Pass",
    ):
        scanfit.fit(mlp_loss, params, 0.01, other, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(
        scanfit.CheckpointMismatchError,
        match=r"accumulate: 1 in the checkpoint, 2 in this run",
    ):
        scanfit.fit(
            mlp_loss, params, 0.01, data, accumulate=2, checkpoint_dir=tmp_path, progress=False
        )
    with pytest.raises(
        scanfit.CheckpointMismatchError, match=r"initial optimizer state: \[0\]\.count is absent"
    ):
        # Same params and data, another optimizer: its state has another structure.
        scanfit.fit(
            mlp_loss, params, optax.adam(0.01), data, checkpoint_dir=tmp_path, progress=False
        )
    with pytest.raises(
        scanfit.CheckpointMismatchError,
        match=r"key \(microbatch order\): None in the checkpoint, given in this run",
    ):
        scanfit.fit(
            mlp_loss,
            params,
            0.01,
            data,
            key=jax.random.key(0),
            checkpoint_dir=tmp_path,
            progress=False,
        )


def test_checkpoint_lacking_an_array_is_skipped_with_a_warning(problem, tmp_path):
    params, data = problem
    opt = optax.adam(0.01)
    first = scanfit.fit(mlp_loss, params, opt, data, checkpoint_dir=tmp_path, progress=False)
    path = _checkpoint.path_for(tmp_path, 20)
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    victim = next(k for k in arrays if k.startswith("opt_state"))
    del arrays[victim]
    np.savez(path, **arrays)
    with (
        pytest.warns(scanfit.CheckpointWarning, match=r"to ckpt-0000000020.npz.set-aside: it is"),
        pytest.warns(
            scanfit.CheckpointWarning, match=r"ckpt-0000000020.npz: missing or extra arrays \["
        ),
    ):
        again = scanfit.fit(mlp_loss, params, opt, data, checkpoint_dir=tmp_path, progress=False)
    assert_same(again, first)  # trained afresh, not restored from the damaged file
    assert (tmp_path / "ckpt-0000000020.npz.set-aside").exists()  # kept, not overwritten


def test_checkpoint_past_the_run_is_an_error(problem, tmp_path):
    params, data = problem
    scanfit.fit(mlp_loss, params, 0.01, data, epochs=2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(
        scanfit.CheckpointMismatchError,
        match=r"is at update 40, past the 20 updates of this run \(epochs=1\)",
    ):
        scanfit.fit(mlp_loss, params, 0.01, data, checkpoint_dir=tmp_path, progress=False)


def test_resume_false_starts_afresh(problem, tmp_path):
    params, data = problem
    scanfit.fit(mlp_loss, params, 0.5, data, checkpoint_dir=tmp_path, progress=False)
    res = scanfit.fit(
        mlp_loss, params, 0.01, data, checkpoint_dir=tmp_path, resume=False, progress=False
    )
    assert_same(res, scanfit.scan_train(mlp_loss, params, 0.01, data))


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(problem, tmp_path):
    params, data = problem
    full = scanfit.fit(
        mlp_loss,
        params,
        0.01,
        data,
        epochs=2,
        chunk_steps=10,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    newest = _checkpoint.path_for(tmp_path, 40)
    newest.write_bytes(newest.read_bytes()[:100])
    (tmp_path / ".tmp-ckpt-leftover.npz").write_bytes(b"junk")
    with (
        pytest.warns(UserWarning, match=r"moved .*ckpt-0000000040.npz to .*set-aside"),
        pytest.warns(UserWarning, match=r"skipping checkpoint .*ckpt-0000000040.npz: BadZipFile"),
    ):
        res = scanfit.fit(
            mlp_loss,
            params,
            0.01,
            data,
            epochs=2,
            chunk_steps=10,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    assert_same(res, full)
    assert not (tmp_path / ".tmp-ckpt-leftover.npz").exists()


def _run_worker(ckpt, out, *extra, kill_after_checkpoints=None):
    proc = subprocess.Popen(
        [sys.executable, _fault_worker.__file__, str(ckpt), str(out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kill_after_checkpoints is not None:
        deadline = time.monotonic() + 120
        while len(_checkpoint.list_checkpoints(Path(ckpt))) < 1 or (
            max(s for s, _ in _checkpoint.list_checkpoints(Path(ckpt))) < kill_after_checkpoints
        ):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the worker saved no checkpoint in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    proc.stderr_text = proc.communicate(timeout=300)[1]  # also closes the pipe
    return proc


def _uninterrupted(tmp_path, variant=""):
    return _fault_worker.train(
        tmp_path / "reference", stateful=variant == "stateful", evaluated=variant == "evaluated"
    )


@pytest.mark.parametrize(
    "variant",
    ["", pytest.param("stateful", marks=pytest.mark.slow),
     pytest.param("evaluated", marks=pytest.mark.slow)],
)  # fmt: skip
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, variant):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    extra = [f"--{variant}"] if variant else []
    proc = _run_worker(ckpt, out, *extra, kill_after_checkpoints=14)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    killed_at = max(s for s, _ in _checkpoint.list_checkpoints(ckpt))
    assert 14 <= killed_at < 240
    proc = _run_worker(ckpt, out, *extra)
    assert proc.returncode == 0, proc.stderr_text
    want = _uninterrupted(tmp_path, variant)
    with np.load(out) as got:
        np.testing.assert_array_equal(got["losses"], want.losses)
        np.testing.assert_array_equal(got["w"], want.params["w"])
        np.testing.assert_array_equal(got["b"], want.params["b"])
        if variant == "stateful":
            np.testing.assert_array_equal(got["mean"], want.model_state["mean"])
        if variant == "evaluated":
            np.testing.assert_array_equal(got["val_loss"], want.metrics["val_loss"])
            np.testing.assert_array_equal(got["best_w"], want.best_params["w"])
            assert int(got["stopped_at"]) == int(want.stopped_at)


@pytest.mark.slow  # the fast sample: tests/test_saves.py kills one save
def test_sigkill_during_a_save_then_resume_equals_uninterrupted(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    proc = _run_worker(ckpt, out, "--kill-in-save", "3")
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _ in _checkpoint.list_checkpoints(ckpt)] == [7, 14]  # the 3rd never landed
    assert list(ckpt.glob(".tmp-ckpt-*"))  # the half-written file is there
    proc = _run_worker(ckpt, out)
    assert proc.returncode == 0, proc.stderr_text
    assert not list(ckpt.glob(".tmp-ckpt-*"))
    want = _uninterrupted(tmp_path)
    with np.load(out) as got:
        np.testing.assert_array_equal(got["losses"], want.losses)
        np.testing.assert_array_equal(got["w"], want.params["w"])


def test_keyboard_interrupt_saves_the_last_completed_chunk(problem, tmp_path):
    params, data = problem

    def interrupt(info):
        if info.step == 12:
            raise KeyboardInterrupt

    for policy in ("raise", "ignore"):  # without and with a donated carry
        ckpt = tmp_path / policy
        with pytest.raises(KeyboardInterrupt) as exc:
            scanfit.fit(
                mlp_loss,
                params,
                0.01,
                data,
                epochs=2,
                chunk_steps=4,
                nan_policy=policy,
                checkpoint_dir=ckpt,
                checkpoint_every=100,
                on_chunk=interrupt,
                progress=False,
            )
        assert [s for s, _ in _checkpoint.list_checkpoints(ckpt)] == [12]
        assert exc.value.step == 12  # what the CLI reports
        res = scanfit.fit(
            mlp_loss,
            params,
            0.01,
            data,
            epochs=2,
            chunk_steps=4,
            nan_policy=policy,
            checkpoint_dir=ckpt,
            progress=False,
        )
        assert_same(res, scanfit.scan_train(mlp_loss, params, 0.01, data, epochs=2))


@pytest.mark.parametrize("poison_at, saved", [(None, 8), (7, 4)])
def test_interrupt_while_waiting_keeps_that_chunk_only_if_it_is_clean(
    problem, tmp_path, monkeypatch, poison_at, saved
):
    # Ctrl-C lands while the host waits on updates 4-7. Kept if clean; dropped if its
    # last update left non-finite params behind a finite loss.
    params, data = problem
    opt = optax.sgd(0.01)
    if poison_at is not None:
        opt = optax.chain(opt, poison_params_at(poison_at))
    fetches = []
    real = _driver._host

    def host(x):
        out = real(x)
        if isinstance(x, tuple) and len(x) == 6:  # the per-chunk fetch that waits
            fetches.append(x)
            if len(fetches) == 2:
                raise KeyboardInterrupt
        return out

    monkeypatch.setattr(_driver, "_host", host)
    with pytest.raises(KeyboardInterrupt) as exc:
        scanfit.fit(
            mlp_loss,
            params,
            opt,
            data,
            chunk_steps=4,
            checkpoint_dir=tmp_path,
            checkpoint_every=100,
            progress=False,
        )
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path)] == [saved]
    assert exc.value.step == saved  # past the last chunk on_chunk saw when kept
    _, arrays = _checkpoint.read(_checkpoint.path_for(tmp_path, saved))
    assert all(np.isfinite(v).all() for k, v in arrays.items() if k.startswith("params"))


def poisoned(data, bad):
    x, y = (np.array(a) for a in data)
    for i in bad:
        y[i, 0, 0] = np.nan
    return x, y


@pytest.mark.parametrize("chunk", [None, 4, 5])
def test_divergence_reports_the_exact_step_and_the_last_good_state(problem, tmp_path, chunk):
    params, data = problem
    data = poisoned(data, [13, 17])
    with pytest.raises(
        scanfit.DivergenceError,
        match=r"training diverged at update 13: its loss "
        r"was nan .*saved in",
    ) as exc:
        scanfit.fit(
            mlp_loss,
            params,
            optax.adam(0.01),
            data,
            chunk_steps=chunk,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    assert exc.value.step == 13
    good = scanfit.scan_train(
        mlp_loss, params, optax.adam(0.01), jax.tree.map(lambda a: a[:13], data)
    )
    assert_same(exc.value.state, good)
    meta, arrays = _checkpoint.read(_checkpoint.path_for(tmp_path, 13))
    np.testing.assert_array_equal(arrays["losses"], good.losses)


def poison_params_at(step):
    """An optax stage that makes update ``step`` non-finite while its loss is still finite."""

    def update(updates, count, params=None):
        updates = jax.tree.map(lambda u: jnp.where(count == step, jnp.inf, u), updates)
        return updates, count + 1

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


@pytest.mark.parametrize("bad, chunk", [(13, 5), (13, None), (19, 4), (19, None)])
def test_divergence_of_params_with_a_finite_loss_is_pinned_to_its_update(problem, bad, chunk):
    # The loop checks only losses; the host walks back to the update whose new
    # params went non-finite, also when it is the last update of the run.
    params, data = problem
    opt = optax.chain(optax.sgd(0.01), poison_params_at(bad))
    with pytest.raises(
        scanfit.DivergenceError,
        match=rf"diverged at update {bad}: its loss was "
        r"[0-9.]+ and/or its new params",
    ) as exc:
        scanfit.fit(mlp_loss, params, opt, data, chunk_steps=chunk, progress=False)
    assert exc.value.step == bad
    good = scanfit.scan_train(mlp_loss, params, opt, jax.tree.map(lambda a: a[:bad], data))
    assert_same(exc.value.state, good)


def test_divergence_at_the_first_update_of_a_chunk(problem):
    params, data = problem
    with pytest.raises(scanfit.DivergenceError) as exc:
        scanfit.fit(mlp_loss, params, 0.01, poisoned(data, [8]), chunk_steps=4, progress=False)
    assert exc.value.step == 8 and exc.value.state.losses.shape == (8,)


def test_skip_and_ignore_policies(problem):
    params, data = problem
    data = poisoned(data, [3, 11])
    skipped = scanfit.fit(
        mlp_loss, params, 0.01, data, chunk_steps=6, nan_policy="skip", progress=False
    )
    assert_same(skipped, scanfit.scan_train(mlp_loss, params, 0.01, data, skip_nonfinite=True))
    assert int(skipped.skipped) == 2 and int(skipped.first_nonfinite) == 3
    same = scanfit.fit(
        mlp_loss, params, 0.01, data, chunk_steps=6, skip_nonfinite=True, progress=False
    )
    assert_same(same, skipped)
    ignored = scanfit.fit(
        mlp_loss, params, 0.01, data, chunk_steps=6, nan_policy="ignore", progress=False
    )
    assert int(ignored.first_nonfinite) == 3 and not np.isfinite(ignored.params["scale"])


def test_has_aux_history_survives_chunks_and_resume(problem, tmp_path):
    params, data = problem

    def loss_aux(p, b):
        loss = mlp_loss(p, b)
        return loss, {"sq": loss**2}

    ref = scanfit.scan_train(loss_aux, params, 0.01, data, has_aux=True, epochs=2)
    kwargs = dict(has_aux=True, epochs=2, chunk_steps=6, checkpoint_dir=tmp_path, progress=False)

    def interrupt_at_18(info):
        if info.step == 18:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scanfit.fit(loss_aux, params, 0.01, data, on_chunk=interrupt_at_18, **kwargs)
    res = scanfit.fit(loss_aux, params, 0.01, data, **kwargs)
    np.testing.assert_array_equal(res.aux["sq"], ref.aux["sq"])
    assert_same(res, ref)


def test_progress_bar_reports_at_chunk_boundaries(problem, capsys):
    params, data = problem
    scanfit.fit(mlp_loss, params, 0.01, data, chunk_steps=5, progress=True)
    err = capsys.readouterr().err
    assert "20/20" in err and "updates/s" in err and "loss" in err


def test_progress_is_off_when_stderr_is_not_a_terminal(problem, capsys):
    params, data = problem
    scanfit.fit(mlp_loss, params, 0.01, data, chunk_steps=5)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(chunk_steps=0), ValueError, r"chunk_steps must be an integer >= 1 or None, got 0"),
        (
            dict(checkpoint_every=2.5),
            ValueError,
            r"checkpoint_every must be an integer >= 1 or None, got 2.5",
        ),
        (dict(keep=0), ValueError, r"keep must be an integer >= 1 \(checkpoints kept\), got 0"),
        (
            dict(nan_policy="warn"),
            ValueError,
            r"nan_policy must be one of \('raise', 'skip', 'ignore'\), got 'warn'",
        ),
        (dict(on_chunk=3), TypeError, r"on_chunk must be callable as on_chunk\(info\) or None"),
        (
            dict(progress="yes"),
            TypeError,
            r"progress must be True, False or None \(auto\), got 'yes'",
        ),
        (dict(checkpoint_dir=3), TypeError, r"checkpoint_dir must be a path or None, got 3"),
        (dict(epochs=0), ValueError, r"epochs must be an integer >= 1, got 0"),
        (dict(accumulate=3), ValueError, r"accumulate=3 must divide the number of microbatches"),
    ],
)
def test_bad_fit_settings_are_clear_errors(problem, kwargs, error, match):
    params, data = problem
    with pytest.raises(error, match=match):
        scanfit.fit(mlp_loss, params, 0.01, data, **kwargs)


def test_checkpoint_dir_that_is_a_file_is_an_error(problem, tmp_path):
    params, data = problem
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"checkpoint_dir '.*f' exists and is not a directory"):
        scanfit.fit(mlp_loss, params, 0.01, data, checkpoint_dir=tmp_path / "f")


def test_user_files_in_checkpoint_dir_are_left_alone(problem, tmp_path):
    params, data = problem
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "ckpt-7.npz").write_text("not ours: the name has no 10-digit step")
    scanfit.fit(
        mlp_loss, params, 0.01, data, chunk_steps=5, keep=1, checkpoint_dir=tmp_path, progress=False
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "ckpt-7.npz").exists()
    assert os.listdir(tmp_path).count("ckpt-0000000020.npz") == 1


# --- Model state and randomness (the extended form, framework modules, bf16) ----------------

from _stateful_problem import problem as stateful_problem  # noqa: E402


def assert_same_state(a, b):
    assert_same(a, b)
    jax.tree.map(np.testing.assert_array_equal, a.model_state, b.model_state)


@pytest.mark.parametrize("chunk, accumulate", [(5, 1), (7, 2), (48, 3)])
def test_model_state_and_rng_chunked_equal_scan_train_bitwise(chunk, accumulate):
    loss, params, state, data = stateful_problem()
    kwargs = dict(
        model_state=state, rng=jax.random.key(4), epochs=2, key=jax.random.key(2),
        accumulate=accumulate,
    )  # fmt: skip
    want = scanfit.scan_train(loss, params, optax.adam(0.01), data, **kwargs)
    got = scanfit.fit(
        loss, params, optax.adam(0.01), data, chunk_steps=chunk, progress=False, **kwargs
    )
    assert_same_state(got, want)


def test_model_state_resumes_bitwise_from_a_checkpoint(tmp_path):
    loss, params, state, data = stateful_problem()
    kwargs = dict(
        model_state=state, rng=jax.random.key(4), epochs=2, key=jax.random.key(2), chunk_steps=6,
        progress=False,
    )  # fmt: skip
    full = scanfit.fit(loss, params, optax.adam(0.01), data, **kwargs)
    stop = lambda info: info.step < 18  # noqa: E731
    scanfit.fit(
        loss, params, optax.adam(0.01), data, checkpoint_dir=tmp_path, on_chunk=stop, **kwargs
    )
    resumed = scanfit.fit(loss, params, optax.adam(0.01), data, checkpoint_dir=tmp_path, **kwargs)
    assert_same_state(resumed, full)
    with pytest.raises(
        scanfit.CheckpointMismatchError,
        match=r"the rng \(dropout and other randomness\): same shapes, other contents",
    ):
        kwargs["rng"] = jax.random.key(5)
        scanfit.fit(loss, params, optax.adam(0.01), data, checkpoint_dir=tmp_path, **kwargs)


def test_nnx_module_through_fit_resumes_bitwise_with_its_rng_streams(tmp_path):
    nnx = pytest.importorskip("flax.nnx", reason="flax is in the examples extra")
    from test_adapters import NNXNet, digits_like, nnx_loss

    data, tx = digits_like(20), optax.adam(1e-2)
    kwargs = dict(epochs=2, key=jax.random.key(0), chunk_steps=5, progress=False)
    full_model = NNXNet(nnx.Rngs(0, dropout=1))
    full = scanfit.fit(nnx_loss, full_model, tx, data, **kwargs)
    stop = lambda info: info.step < 15  # noqa: E731
    model = NNXNet(nnx.Rngs(0, dropout=1))
    scanfit.fit(nnx_loss, model, tx, data, checkpoint_dir=tmp_path, on_chunk=stop, **kwargs)
    model = NNXNet(nnx.Rngs(0, dropout=1))  # a fresh module, as after a crash
    resumed = scanfit.fit(nnx_loss, model, tx, data, checkpoint_dir=tmp_path, **kwargs)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    _, got = nnx.split(model)
    _, want = nnx.split(full_model)
    same = lambda a, b: np.testing.assert_array_equal(  # noqa: E731
        *(jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v
          for v in (a, b))
    )  # fmt: skip
    jax.tree.map(same, got, want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_and_moments_checkpoint_and_resume_bitwise(tmp_path, dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 8, 3)).astype(dtype)
    y = x @ np.asarray([1.0, -2.0, 0.5], dtype)
    params = {"w": jnp.zeros(3, dtype)}

    def loss(p, b):
        return jnp.mean((b[0] @ p["w"] - b[1]) ** 2)

    opt = optax.adam(0.05, mu_dtype=dtype)
    kwargs = dict(chunk_steps=6, progress=False)
    full = scanfit.fit(loss, params, opt, (x, y), **kwargs)
    stop = lambda info: info.step < 12  # noqa: E731
    scanfit.fit(loss, params, opt, (x, y), checkpoint_dir=tmp_path, on_chunk=stop, **kwargs)
    resumed = scanfit.fit(loss, params, opt, (x, y), checkpoint_dir=tmp_path, **kwargs)
    assert resumed.params["w"].dtype == dtype and resumed.opt_state[0].mu["w"].dtype == dtype
    assert_same(resumed, full)


def test_a_run_whose_every_update_is_skipped_says_so():
    def loss(p, b):
        return jnp.sum(p * b) / 0.0  # inf at every update

    with pytest.warns(RuntimeWarning, match=r"every update of this run \(6 of 6\) was skipped"):
        res = scanfit.fit(loss, jnp.ones(()), 0.1, jnp.ones((6, 1)), nan_policy="skip",
                          progress=False)  # fmt: skip
    assert int(res.skipped) == 6


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(nan_policy="raise", skip_nonfinite=True),
            ValueError,
            r"skip_nonfinite=True contradicts nan_policy='raise': skipping means "
            r"nan_policy='skip'",
        ),
        (
            dict(nan_policy="ignore", skip_nonfinite=True),
            ValueError,
            r"skip_nonfinite=True contradicts nan_policy='ignore'",
        ),
        (
            dict(skip_nonfinite="no"),
            TypeError,
            r"skip_nonfinite must be True or False, got 'no' of type str",
        ),
        (dict(has_aux="yes"), TypeError, r"has_aux must be True or False, got 'yes' of type str"),
        (dict(resume="no"), TypeError, r"resume must be True or False, got 'no' of type str"),
        (dict(resume=None), TypeError, r"resume must be True or False, got None of type NoneType"),
        (dict(progress="x"), TypeError, r"progress must be True, False or None \(auto\), got 'x'"),
        (
            dict(data=(np.ones((0, 5, 3), np.float32), np.ones((0, 5, 2), np.float32))),
            ValueError,
            r"data must hold at least one microbatch, got N=0",
        ),
        (
            dict(data=(np.ones((4, 0, 3), np.float32), np.ones((4, 0, 2), np.float32))),
            ValueError,
            r"data\[0\] has shape \(4, 0, 3\): every microbatch is empty",
        ),
        (
            dict(epochs=2 * 10**8),
            ValueError,
            r"makes 4000000000 updates; at most 2147483647 fit the int32 update counter",
        ),
    ],
)
def test_strict_fit_inputs_are_clear_errors(problem, kwargs, error, match):
    params, data = problem
    kwargs = {"data": data, **kwargs}
    with pytest.raises(error, match=match):
        scanfit.fit(mlp_loss, params, 0.01, kwargs.pop("data"), **kwargs)


def test_skip_nonfinite_alone_means_the_skip_policy(problem):
    params, data = problem
    data = poisoned(data, [3])
    res = scanfit.fit(mlp_loss, params, 0.01, data, skip_nonfinite=True, progress=False)
    assert int(res.skipped) == 1


def test_huge_epochs_without_chunk_steps_run_in_bounded_chunks(problem):
    # 10**9 epochs of 2 microbatches: one chunk of the whole run used to hang compiling
    # (and would stack 8 GB of losses); the default chunk reports after 2**16 updates.
    params, data = problem
    data = jax.tree.map(lambda a: a[:2], data)
    seen = []

    def stop_at_once(info):
        seen.append((info.step, info.total))
        return False

    res = scanfit.fit(mlp_loss, params, 0.01, data, epochs=10**9, on_chunk=stop_at_once)
    assert seen == [(2**16, 2 * 10**9)]
    assert res.losses.shape == (2**16,)


def test_default_chunk_keeps_per_update_outputs_within_the_budget(problem, monkeypatch):
    params, data = problem

    def loss_aux(p, b):
        loss = mlp_loss(p, b)
        return loss, jnp.full(1000, loss)  # 4,004 bytes of outputs per update

    monkeypatch.setattr(_fit, "_DEFAULT_CHUNK_OUTPUT_BYTES", 5 * 4004)
    steps = []
    res = scanfit.fit(
        loss_aux, params, 0.01, data, has_aux=True, on_chunk=lambda i: steps.append(i.step)
    )
    assert steps == [5, 10, 15, 20] and res.aux.shape == (20, 1000)


def test_chunk_steps_whose_outputs_exceed_memory_is_a_clear_error(problem):
    params, data = problem

    def loss_aux(p, b):
        loss = mlp_loss(p, b)
        return loss, jnp.full(2**20, loss)  # 4 MiB per update

    with pytest.raises(
        ValueError,
        match=r"300 updates would stack 1.2 GiB of per-update losses and aux in one program, "
        r"more than the 1 GiB allowed; pass a smaller chunk_steps",
    ):
        scanfit.fit(loss_aux, params, 0.01, data, has_aux=True, epochs=15, chunk_steps=300)


def linear_loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] - y) ** 2)


def test_nonfinite_optimizer_state_is_divergence_at_its_update():
    # A gradient of ~2e20 overflows Adam's nu = g**2 to inf: the update is g / sqrt(nu) = 0,
    # so params and losses stay finite and training would freeze silently.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 4, 3)).astype(np.float32)
    y = rng.normal(size=(12, 4)).astype(np.float32)
    x[7], y[7] = 1e10, 1e10
    params = {"w": np.zeros(3, np.float32)}
    opt = optax.adam(0.01)
    with pytest.raises(
        scanfit.DivergenceError,
        match=r"diverged at update 7: its loss was [0-9.e+]+ and/or its new params or "
        r"optimizer state were non-finite",
    ) as exc:
        scanfit.fit(linear_loss, params, opt, (x, y), chunk_steps=5, progress=False)
    assert exc.value.step == 7
    good = scanfit.scan_train(linear_loss, params, opt, (x[:7], y[:7]))
    assert_same(exc.value.state, good)
    assert np.isfinite(np.asarray(exc.value.state.losses)).all()


def poison_leaf_at(step, leaf):
    """An optax stage that makes params[leaf] infinite at update ``step``."""

    def update(updates, count, params=None):
        updates = {**updates, leaf: jnp.where(count == step, jnp.inf, updates[leaf])}
        return updates, count + 1

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


@pytest.mark.parametrize("bad", [0, 3, 19])
def test_inf_in_a_param_the_loss_ignores_is_found_with_two_compilations(bad, compilations):
    # The loss never sees it, so only the per-chunk state flag fires; the search must pin
    # the update down in one flagged re-run and one cut re-run, not a recompile per step.
    rng = np.random.default_rng(5)
    data = (rng.normal(size=(20, 4, 3)), rng.normal(size=(20, 4)))
    data = jax.tree.map(lambda a: a.astype(np.float32), data)
    params = {"w": np.zeros(3, np.float32), "ignored": np.zeros(2, np.float32)}
    opt = optax.chain(optax.sgd(0.01), poison_leaf_at(bad, "ignored"))
    state0 = opt.init(params)
    late = jax.tree.map(lambda s: s + 1000, state0)  # a count past `bad`: no poison
    run = functools.partial(scanfit.fit, linear_loss, params, opt, data, progress=False)
    run(opt_state=late, chunk_steps=20)  # compiles the chunk program
    before = compilations()
    with pytest.raises(scanfit.DivergenceError, match=rf"diverged at update {bad}: ") as exc:
        run(opt_state=state0, chunk_steps=20)
    assert compilations() - before <= 2
    assert exc.value.step == bad
    if bad == 0:  # the last good state is the initial one
        assert exc.value.state.losses.shape == (0,)
        jax.tree.map(np.testing.assert_array_equal, exc.value.state.params, params)
    else:
        cut = jax.tree.map(lambda a: a[:bad], data)
        assert_same(exc.value.state, scanfit.scan_train(linear_loss, params, opt, cut))


@pytest.mark.parametrize("train", [scanfit.scan_train, scanfit.fit])
def test_restore_best_ends_a_pytree_run_at_its_best_evaluation(problem, train):
    params, data = problem
    # The eval loss falls as training goes on: its maximum is an early evaluation.
    kwargs = dict(eval_fn=lambda p, b: {"loss": mlp_loss(p, b)}, eval_data=data, eval_every=4,
                  best=("loss", "max"), epochs=2)  # fmt: skip
    plain = train(mlp_loss, params, optax.adam(0.01), data, **kwargs)
    assert 0 < int(plain.best_step) < 40
    res = train(mlp_loss, params, optax.adam(0.01), data, restore_best=True, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, res.params, plain.best_params)
    jax.tree.map(np.testing.assert_array_equal, res.opt_state, plain.opt_state)  # the last
    np.testing.assert_array_equal(res.losses, plain.losses)


@pytest.mark.parametrize("train", [scanfit.scan_train, scanfit.fit])
def test_restore_best_without_best_is_a_clear_error(problem, train):
    params, data = problem
    with pytest.raises(
        ValueError, match=r"restore_best=True needs best=\(metric, 'min' \| 'max'\)"
    ):
        train(mlp_loss, params, 0.01, data, restore_best=True)
    with pytest.raises(TypeError, match=r"restore_best must be True or False, got 'yes'"):
        train(mlp_loss, params, 0.01, data, restore_best="yes")
