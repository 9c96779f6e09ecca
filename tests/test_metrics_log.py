"""The metrics log: metrics.jsonl read back, TensorBoard events parsed back with tbparse."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scanfit import _metrics_log


def test_jsonl_records_round_trip_with_non_finite_values_as_null(tmp_path):
    log = _metrics_log.MetricsLog(tmp_path / "logs")
    log.write(10, "chunk", {"loss": np.float32(0.5), "acc": jnp.asarray(0.25)})
    log.write(20, "eval", {"val_loss": float("nan"), "count": np.int32(3)})
    log.close()
    assert _metrics_log.read(tmp_path / "logs") == [
        {"step": 10, "kind": "chunk", "loss": 0.5, "acc": 0.25},
        {"step": 20, "kind": "eval", "val_loss": None, "count": 3},
    ]


def test_a_resumed_log_drops_what_the_interrupted_run_wrote_past_the_checkpoint(tmp_path):
    log = _metrics_log.MetricsLog(tmp_path)
    for step in (5, 10, 15):
        log.write(step, "chunk", {"loss": step})
    log.close()
    log = _metrics_log.MetricsLog(tmp_path, resume_step=10)  # the checkpoint was at 10
    log.write(15, "chunk", {"loss": -1})
    log.close()
    got = [(r["step"], r["loss"]) for r in _metrics_log.read(tmp_path)]
    assert got == [(5, 5), (10, 10), (15, -1)]


# tbparse calls a pandas API that pandas 3 deprecates: their warning, not ours.
@pytest.mark.filterwarnings("ignore:The inplace keyword")
def test_tensorboard_events_are_readable_with_tbparse(tmp_path):
    tbparse = pytest.importorskip("tbparse", reason="tbparse is in the dev extra")
    pytest.importorskip("tensorboardX", reason="tensorboardX is in the tensorboard extra")
    log = _metrics_log.MetricsLog(tmp_path)
    for step in (3, 6):
        log.write(step, "chunk", {"loss": 1.0 / step})
    log.write(6, "eval", {"val_acc": 0.75})
    log.close()
    frame = tbparse.SummaryReader(str(tmp_path)).scalars
    got = {(row.tag, int(row.step)): float(row.value) for row in frame.itertuples()}
    assert got == pytest.approx({("chunk/loss", 3): 1 / 3, ("chunk/loss", 6): 1 / 6,
                                 ("eval/val_acc", 6): 0.75})  # fmt: skip


def test_learning_rate_is_read_from_inject_hyperparams():
    params = {"w": jnp.zeros(3)}
    opt = optax.chain(optax.clip(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=0.02))
    assert _metrics_log.learning_rate(opt.init(params)) == pytest.approx(0.02)
    assert _metrics_log.learning_rate(optax.adam(0.1).init(params)) is None
    json.dumps(_metrics_log.learning_rate(opt.init(params)))  # a plain float
