"""fit's observers: the metrics log (metrics.jsonl, TensorBoard) and what ChunkInfo carries."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_eval import P0, eval_fn, loss_aux, problem

import scanfit
from scanfit import _metrics_log

OPT = optax.inject_hyperparams(optax.adam)(learning_rate=0.02)
KW = dict(epochs=2, eval_fn=eval_fn, eval_every=5, has_aux=True, chunk_steps=8, progress=False)


def test_metrics_log_holds_every_chunk_and_every_evaluation(tmp_path):
    data, eval_data = problem()
    infos = []
    res = scanfit.fit(loss_aux, P0, OPT, data, eval_data=eval_data, log_dir=tmp_path,
                      on_chunk=infos.append, **KW)  # fmt: skip
    records = _metrics_log.read(tmp_path)
    chunks = [r for r in records if r["kind"] == "chunk"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in chunks] == [8, 16, 24, 32, 40]
    losses = np.asarray(res.losses)
    for r, end in zip(chunks, [8, 16, 24, 32, 40]):
        assert r["loss"] == pytest.approx(float(losses[end - 8 : end].mean()), rel=1e-6)
        assert r["sqrt"] == pytest.approx(float(np.asarray(res.aux["sqrt"])[end - 8 : end].mean()))
        assert r["learning_rate"] == pytest.approx(0.02)
    assert [r["step"] for r in evals] == np.asarray(res.metrics["step"]).tolist()
    got = [r["val_loss"] for r in evals]
    np.testing.assert_allclose(got, np.asarray(res.metrics["val_loss"]), rtol=1e-6)
    # ChunkInfo: the chunk's aux means, its evaluations and the optimizer state.
    np.testing.assert_allclose(infos[0].aux["sqrt"], np.asarray(res.aux["sqrt"])[:8].mean(),
                               rtol=1e-6)  # fmt: skip
    assert infos[0].metrics["step"].tolist() == [5]
    assert infos[-1].opt_state.hyperparams["learning_rate"] == pytest.approx(0.02)
    jax.tree.map(np.testing.assert_array_equal, infos[-1].opt_state, res.opt_state)


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # tbparse on pandas 3: theirs
def test_tensorboard_events_of_a_fit_run(tmp_path):
    tbparse = pytest.importorskip("tbparse", reason="tbparse is in the dev extra")
    pytest.importorskip("tensorboardX", reason="tensorboardX is in the tensorboard extra")
    data, eval_data = problem()
    res = scanfit.fit(loss_aux, P0, OPT, data, eval_data=eval_data, log_dir=tmp_path, **KW)
    frame = tbparse.SummaryReader(str(tmp_path)).scalars
    val = frame[frame.tag == "eval/val_loss"].sort_values("step")
    assert val.step.tolist() == np.asarray(res.metrics["step"]).tolist()
    np.testing.assert_allclose(val.value, np.asarray(res.metrics["val_loss"]), rtol=1e-6)
    assert sorted(frame[frame.tag == "chunk/loss"].step.tolist()) == [8, 16, 24, 32, 40]


def test_a_resumed_run_logs_each_step_once(tmp_path):
    data, eval_data = problem()
    kw = dict(KW, eval_data=eval_data, log_dir=tmp_path / "log", checkpoint_dir=tmp_path / "c",
              checkpoint_every=16)  # fmt: skip
    scanfit.fit(loss_aux, P0, OPT, data, on_chunk=lambda info: info.step < 24, **kw)
    steps = [r["step"] for r in _metrics_log.read(tmp_path / "log") if r["kind"] == "chunk"]
    assert steps == [8, 16, 24]  # the run stopped at 24, and saved there
    scanfit.fit(loss_aux, P0, OPT, data, **kw)
    steps = [r["step"] for r in _metrics_log.read(tmp_path / "log") if r["kind"] == "chunk"]
    assert steps == [8, 16, 24, 32, 40]


def test_log_dir_must_be_a_path():
    data, _ = problem()
    with pytest.raises(TypeError, match=r"log_dir must be a non-empty path or None, got 3"):
        scanfit.fit(lambda p, b: jnp.sum(p["b"]), P0, 0.1, data, log_dir=3)


def test_after_an_early_stop_the_last_chunk_record_ends_at_stopped_at_with_real_means(tmp_path):
    data, eval_data = problem()
    kw = dict(KW, eval_data=eval_data, best=("val_loss", "min"), patience=2,
              log_dir=tmp_path / "log", checkpoint_dir=tmp_path / "c")  # fmt: skip
    infos = []
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.3)  # stops at update 15
    res = scanfit.fit(loss_aux, P0, opt, data, on_chunk=infos.append, **kw)
    stop = int(res.stopped_at)
    assert 0 < stop < 40 and stop % 8  # the stop falls inside a chunk
    start = stop - stop % 8
    chunks = [r for r in _metrics_log.read(tmp_path / "log") if r["kind"] == "chunk"]
    last = chunks[-1]
    assert last["step"] == stop == infos[-1].step
    losses, sqrt = np.asarray(res.losses), np.asarray(res.aux["sqrt"])
    assert np.isnan(sqrt[stop:]).all()  # the updates skipped after the stop
    # Means over the updates done (float32 sums of a few terms: 1e-6 relative).
    assert last["loss"] == pytest.approx(float(losses[start:stop].mean()), rel=1e-6)
    assert last["sqrt"] == pytest.approx(float(sqrt[start:stop].mean()), rel=1e-6)
    assert last["w0"] == pytest.approx(float(np.asarray(res.aux["w0"])[start:stop].mean()))
    assert len(infos[-1].losses) == stop - start
    before = (tmp_path / "log" / "metrics.jsonl").read_text()
    again = scanfit.fit(loss_aux, P0, opt, data, **kw)  # the finished run, called again
    assert int(again.stopped_at) == stop
    assert (tmp_path / "log" / "metrics.jsonl").read_text() == before
