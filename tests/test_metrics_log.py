"""The metrics log: metrics.jsonl read back, TensorBoard events parsed back with tbparse."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scanfit import _event_files, _metrics_log


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
    log = _metrics_log.MetricsLog(tmp_path, start=10)  # the checkpoint was at 10
    log.write(15, "chunk", {"loss": -1})
    log.close()
    got = [(r["step"], r["loss"]) for r in _metrics_log.read(tmp_path)]
    assert got == [(5, 5), (10, 10), (15, -1)]
    if _has_tensorboard():
        assert _events(tmp_path) == [("chunk/loss", 5, 5), ("chunk/loss", 10, 10),
                                     ("chunk/loss", 15, -1)]  # fmt: skip


def test_a_new_run_moves_the_earlier_runs_files_into_previous_k(tmp_path):
    kept = []
    for run in range(3):
        log = _metrics_log.MetricsLog(tmp_path)  # start=0: a new run
        log.write(5, "chunk", {"loss": run})
        log.close()
        kept.append(sorted(p.name for p in tmp_path.iterdir() if p.is_file()))
    assert [r["loss"] for r in _metrics_log.read(tmp_path)] == [2]
    for k, run in ((1, 0), (2, 1)):
        assert [r["loss"] for r in _metrics_log.read(tmp_path / f"previous-{k}")] == [run]
        assert sorted(p.name for p in (tmp_path / f"previous-{k}").iterdir()) == kept[run]
        if _has_tensorboard():
            assert _events(tmp_path / f"previous-{k}") == [("chunk/loss", 5, run)]


def test_a_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path):
    log = _metrics_log.MetricsLog(tmp_path)
    log.write(5, "chunk", {"loss": 1.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "kind": "ch')  # a kill mid-append
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl': its last line is torn"):
        assert _metrics_log.read(tmp_path) == [{"step": 5, "kind": "chunk", "loss": 1.5}]
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl': its last line is torn"):
        log = _metrics_log.MetricsLog(tmp_path, start=5)  # a resume drops it from the file
    log.write(10, "chunk", {"loss": 0.5})
    log.close()
    assert [r["step"] for r in _metrics_log.read(tmp_path)] == [5, 10]  # and warns no more


def test_a_damaged_line_inside_is_dropped_with_a_warning_naming_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "chunk"}\n[1, 2]\nnot json\n')
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl': line [23] is damaged") as seen:
        assert _metrics_log.read(tmp_path) == [{"step": 1, "kind": "chunk"}]
    assert ["line 2" in str(w.message) for w in seen] == [True, False]


def test_a_failed_rewrite_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    log = _metrics_log.MetricsLog(tmp_path)
    for step in (5, 10, 15):
        log.write(step, "chunk", {"loss": step})
    log.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_metrics_log.os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        _metrics_log.MetricsLog(tmp_path, start=10)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no copy left


def _has_tensorboard() -> bool:
    return _metrics_log._has_tensorboard()


def _events(log_dir) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar event in ``log_dir``'s own event files."""
    from tensorboardX.proto import event_pb2

    got = []
    for path in sorted(log_dir.glob("*tfevents*")):
        records, torn = _event_files.frames(path.read_bytes())
        assert not torn
        for record in records:
            event = event_pb2.Event.FromString(record[12:-4])
            got += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return got


def test_event_records_are_read_back_whole_from_every_prefix_of_a_file(tmp_path):
    pytest.importorskip("tensorboardX", reason="tensorboardX is in the tensorboard extra")
    events = _event_files.EventFile(tmp_path)
    for step in (1, 2, 3):
        events.add(step, {"chunk/loss": step / 4, "chunk/acc": 0.5})
    events.close()
    data = events.path.read_bytes()
    whole, torn = _event_files.frames(data)
    assert not torn and len(whole) == 4 and b"".join(whole) == data  # the header and 3 events
    ends = np.cumsum([len(r) for r in whole])
    for cut in range(len(data)):  # every place a kill can tear the file
        records, torn = _event_files.frames(data[:cut])
        assert records == whole[: int(np.searchsorted(ends, cut, side="right"))]
        assert torn == (cut not in ends and cut > 0)
    damaged = bytearray(data)
    damaged[ends[1] + 20] ^= 1  # a flipped bit in the second event's payload
    assert _event_files.frames(bytes(damaged)) == (whole[:2], True)
    assert _event_files.cut(data, 2) == b"".join(whole[:3])
    assert _event_files.cut(data, 3) is None  # nothing past update 3
    assert _event_files.cut(data[:-1], 3) == b"".join(whole[:3])  # the torn one dropped


def test_event_files_written_in_the_same_second_get_new_names_in_order(tmp_path):
    pytest.importorskip("tensorboardX", reason="tensorboardX is in the tensorboard extra")
    files = [_event_files.EventFile(tmp_path) for _ in range(3)]
    for f in files:
        f.close()
    names = [f.path.name for f in files]
    assert names == sorted(set(names)) and all("tfevents" in n for n in names)


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
