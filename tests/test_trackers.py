"""fit(loggers=...): every tracker gets exactly the records of metrics.jsonl, resumed runs
included, never a step twice."""

import builtins
import json
import math
import os
import struct
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import scanfit
from scanfit import _metrics_log, _trackers

sys.path.insert(0, str(Path(__file__).parent))
from _linear_problem import mse, problem  # noqa: E402


class ListLogger:
    def __init__(self):
        self.calls, self.closed = [], False

    def log(self, metrics, step):
        self.calls.append((step, dict(metrics)))

    def close(self):
        self.closed = True


def run(log_dir, loggers, **kw):
    params, data = problem()
    kw = {"chunk_steps": 4, "progress": False, **kw}
    return scanfit.fit(
        mse, params, optax.adam(0.05), data, log_dir=log_dir, loggers=loggers,
        eval_fn=lambda p, b: {"val": mse(p, b)}, eval_data=jax.tree.map(lambda a: a[:2], data),
        eval_every=3, **kw,
    )  # fmt: skip


def expected(log_dir):
    """metrics.jsonl as (step, metrics) calls, in the order a tracker gets them."""
    records = sorted(_metrics_log.read(log_dir), key=lambda r: r["step"])
    return [(r["step"], _trackers.as_tracker_metrics(r)) for r in records]


def same_calls(got, want):
    """Equal, NaN equal to NaN (a non-finite value is null in JSON and NaN to a tracker)."""
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_a_logger_object_gets_exactly_the_metrics_log(tmp_path):
    logger = ListLogger()
    run(tmp_path / "logs", logger)
    want = expected(tmp_path / "logs")
    assert {"chunk/loss", "eval/val"} <= {k for _, m in want for k in m}
    same_calls(logger.calls, want)
    assert logger.closed


def test_a_resumed_run_sends_no_step_twice(tmp_path):
    first, second = ListLogger(), ListLogger()
    run(tmp_path / "logs", [first], checkpoint_dir=tmp_path / "ckpt")
    run(tmp_path / "logs", [second], checkpoint_dir=tmp_path / "ckpt", epochs=2)  # goes on
    assert first.calls and second.calls and second.calls[0][0] > first.calls[-1][0]
    same_calls(first.calls + second.calls, expected(tmp_path / "logs"))


def test_after_ctrl_c_the_rerun_sends_what_was_held_back_once(tmp_path):
    first, second = ListLogger(), ListLogger()

    def interrupt(info):
        if info.step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "logs", [first], checkpoint_dir=tmp_path / "ckpt", on_chunk=interrupt)
    run(tmp_path / "logs", [second], checkpoint_dir=tmp_path / "ckpt")
    same_calls(first.calls + second.calls, expected(tmp_path / "logs"))


def test_bad_loggers_are_clear_errors_before_training(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"loggers names one of \('mlflow', 'wandb', 'trackio'\)"):
        run(tmp_path, "neptune")
    with pytest.raises(TypeError, match=r"objects with log\(metrics: dict, step: int\) and close"):
        run(tmp_path, [object()])
    with pytest.raises(ValueError, match=r"loggers=.* needs log_dir"):
        run(None, ListLogger())
    real = builtins.__import__

    def no_mlflow(name, *args, **kw):
        if name.startswith("mlflow"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(
        ImportError, match=r"needs the mlflow package: pip install 'scanfit\[trackers\]'"
    ):
        run(tmp_path, "mlflow")


@pytest.mark.slow  # importing mlflow takes seconds
def test_mlflow_file_store_reads_back_equal(tmp_path):
    tracking = pytest.importorskip("mlflow.tracking")
    run(tmp_path / "logs", "mlflow", checkpoint_dir=tmp_path / "ckpt")
    run(tmp_path / "logs", "mlflow", checkpoint_dir=tmp_path / "ckpt", epochs=2)  # the same run
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        client = tracking.MlflowClient(tracking_uri=(tmp_path / "logs" / "mlruns").as_uri())
        exp = client.get_experiment_by_name("scanfit")
        (mlrun,) = client.search_runs([exp.experiment_id])
        got = {}
        for key in mlrun.data.metrics:
            for m in client.get_metric_history(mlrun.info.run_id, key):
                got.setdefault(m.step, {})[key] = m.value
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]
    want: dict = {}
    for step, metrics in expected(tmp_path / "logs"):
        for key, value in metrics.items():
            assert key not in want.get(step, {})  # one value per step and name
            want.setdefault(step, {})[key] = value
    assert got.keys() == want.keys()
    for step in want:
        same_calls([(step, got[step])], [(step, want[step])])


def _merged(calls):
    """(step, metrics) calls merged per step, as W&B and trackio rows hold them."""
    rows: dict = {}
    for step, metrics in calls:
        rows.setdefault(step, {}).update(metrics)
    return sorted(rows.items())


def _wandb_rows(log_dir):
    """The history rows of every offline W&B run file under log_dir (a LevelDB-style
    log of protobuf records: 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(log_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, parts, records = path.read_bytes(), 7, b"", []
        while pos + 7 <= len(data):
            if 2**15 - pos % 2**15 < 7:  # a block's tail too short for a header: padding
                pos += 2**15 - pos % 2**15
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            parts = chunk if kind in (1, 2) else parts + chunk
            if kind in (1, 4):  # a whole record, or its last part
                records.append(parts)
        for raw in records:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or ".".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                step = int(items.pop("_step"))
                rows.append(
                    (step, {k: float(v) for k, v in items.items() if not k.startswith("_")})
                )
    return rows


@pytest.mark.slow  # a W&B run starts a service process
def test_wandb_offline_run_files_read_back_equal(tmp_path):
    pytest.importorskip("wandb")
    run(tmp_path / "logs", "wandb", checkpoint_dir=tmp_path / "ckpt")
    run(tmp_path / "logs", "wandb", checkpoint_dir=tmp_path / "ckpt", epochs=2)  # resumed
    same_calls(_wandb_rows(tmp_path / "logs"), _merged(expected(tmp_path / "logs")))


@pytest.mark.slow  # importing trackio takes seconds
def test_trackio_local_store_reads_back_equal(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio imports
    if "trackio" in sys.modules:
        pytest.skip("trackio was imported before TRACKIO_DIR could be set")
    trackio = pytest.importorskip("trackio")
    run(tmp_path / "logs", "trackio", checkpoint_dir=tmp_path / "ckpt")
    run(tmp_path / "logs", "trackio", checkpoint_dir=tmp_path / "ckpt", epochs=2)  # resumed
    storage = trackio.sqlite_storage.SQLiteStorage
    (name,) = storage.get_runs("scanfit")
    rows = [
        (int(r["step"]), {k: float(v) for k, v in r.items() if "/" in k})
        for r in storage.get_logs("scanfit", name)
    ]
    same_calls(_merged(rows), _merged(expected(tmp_path / "logs")))


def test_cli_logger_is_passed_to_fit_and_needs_log_dir(tmp_path, capsys, monkeypatch):
    from scanfit import _cli

    x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=x.sum(1))
    seen = []

    def fake_fit(*args, loggers=None, **kwargs):
        seen.append(loggers)
        return scanfit.fit(*args, **kwargs)

    monkeypatch.setattr(_cli, "fit", fake_fit)
    monkeypatch.setattr(_trackers, "_import", lambda name: None)  # installed or not
    base = ["train", "--data", str(tmp_path / "d.npz"), "--quiet"]
    argv = [*base, "--log-dir", str(tmp_path / "logs"), "--logger", "mlflow", "--logger", "wandb"]
    assert _cli.main(argv) == 0
    assert seen == [["mlflow", "wandb"]]
    assert _cli.main([*base, "--logger", "mlflow"]) == 2
    assert "--logger needs --log-dir" in capsys.readouterr().err
