"""The `scanfit` command, through main(argv) and as a real subprocess."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import scanfit
from scanfit import _cli, _compile_cache, _data
from scanfit._cli import main


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4)).astype(np.float32)
    labels = (x @ np.array([1.0, -2.0, 0.5, 1.5]) > 0).astype(np.int64) + (x[:, 0] > 1)
    target = (x @ np.array([0.5, 1.0, -1.0, 2.0]) + 0.05 * rng.normal(size=600)).astype(np.float32)
    paths = {
        "cls_npz": tmp_path / "cls.npz",
        "reg_npz": tmp_path / "reg.npz",
        "cls_csv": tmp_path / "cls.csv",
        "reg_npy": tmp_path / "reg.npy",
    }
    np.savez(paths["cls_npz"], x=x, y=labels)
    np.savez(paths["reg_npz"], x=x, y=target)
    np.savetxt(
        paths["cls_csv"],
        np.c_[x, labels],
        delimiter=",",
        header="a,b,c,d,label",
        comments="",
        fmt=["%.6f"] * 4 + ["%d"],
    )
    np.save(paths["reg_npy"], np.c_[x, target])
    return paths


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_run_learns_the_seed_w(capsys, tmp_path):
    code, out, _ = run(["train", "--steps", "3000", "--json", tmp_path / "s.json"], capsys)
    assert code == 0
    learned = float(out.split("learned w")[1].split()[0])
    assert "true w     3.000000" in out and abs(learned - 3.0) < 0.05
    assert "speed-up" in out and "updates/s" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["updates"] == 3000 and summary["model"] == "scalar"
    assert summary["learned_w"] == pytest.approx(learned, abs=1e-6)


def test_python_m_scanfit_runs_as_a_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "scanfit", "train", "--steps", "300", "--true-w", "-1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "true w     -1.500000" in proc.stdout


@pytest.mark.parametrize("name", ["cls_npz", "cls_csv"])
def test_classification_formats_report_accuracy(files, name, capsys, tmp_path):
    code, out, _ = run(
        [
            "train",
            "--data",
            files[name],
            "--optimizer",
            "adam",
            "--lr",
            "0.05",
            "--epochs",
            "8",
            "--json",
            tmp_path / "s.json",
        ],
        capsys,
    )
    assert code == 0, out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["task"] == "classification" and summary["model"] == "linear"
    assert summary["val_accuracy"] > 0.85  # 3 classes; chance is ~0.4
    assert summary["microbatches"] == 480 // 32


@pytest.mark.parametrize("name, model", [("reg_npz", "linear"), ("reg_npy", "mlp")])
def test_regression_formats_report_mse(files, name, model, capsys, tmp_path):
    argv = f"train --data {files[name]} --model {model} --hidden 16,16 --optimizer adam "
    argv += f"--lr 0.05 --epochs 20 --json {tmp_path / 's.json'}"
    code, out, _ = run(argv.split(), capsys)
    assert code == 0, out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["task"] == "regression" and "val_accuracy" not in summary
    assert summary["val_mse"] < 0.2  # the target's variance is ~6
    assert "val_mse" in out


def test_json_schema(files, capsys, tmp_path):
    run(
        [
            "train",
            "--data",
            files["reg_npz"],
            "--epochs",
            "2",
            "--chunk-steps",
            "5",
            "--json",
            tmp_path / "s.json",
            "--quiet",
        ],
        capsys,
    )
    summary = json.loads((tmp_path / "s.json").read_text())
    for key, kind in [
        ("data", str),
        ("model", str),
        ("task", str),
        ("optimizer", str),
        ("epochs", int),
        ("batch_size", int),
        ("updates", int),
        ("lr", float),
        ("wall_time_s", float),
        ("updates_per_s", float),
        ("final_loss", float),
        ("val_mse", float),  # after the last update
        ("best_val_mse", float),
        ("best_step", int),
        ("eval_every", int),
        ("evaluations", list),
        ("curve", list),
        ("final_losses", dict),
    ]:
        assert isinstance(summary[key], kind), key
    assert summary["updates"] == 30 and len(summary["curve"]) == 6
    assert set(summary["curve"][0]) == {"step", "loss"}
    # Validation every epoch by default (Keras's convention): 15 updates per epoch.
    assert summary["eval_every"] == 15
    assert [e["step"] for e in summary["evaluations"]] == [15, 30]


def test_quiet_prints_nothing(files, capsys):
    code, out, err = run(["train", "--data", files["reg_npz"], "--quiet"], capsys)
    assert code == 0 and out == "" and err == ""


def test_plot_writes_a_png(files, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "loss.png"
    code, _, _ = run(["train", "--data", files["cls_npz"], "--epochs", "2", "--plot", path], capsys)
    assert code == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_checkpoint_dir_resumes(files, capsys, tmp_path):
    argv = [
        "train",
        "--data",
        files["reg_npz"],
        "--epochs",
        "3",
        "--checkpoint-dir",
        tmp_path / "ckpt",
        "--json",
        tmp_path / "s.json",
        "--quiet",
    ]
    assert run(argv, capsys)[0] == 0
    first = json.loads((tmp_path / "s.json").read_text())
    assert run(argv, capsys)[0] == 0
    again = json.loads((tmp_path / "s.json").read_text())
    assert again["final_loss"] == first["final_loss"]
    assert again["wall_time_s"] < first["wall_time_s"]  # nothing left to train
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert [n for n in names if n.startswith("ckpt-")][-1] == "ckpt-0000000045.npz"
    # The compilation cache is on by default under --checkpoint-dir.
    assert any((tmp_path / "ckpt" / "compile-cache").glob("*-cache"))


def test_sweep_prints_a_ranked_table(files, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, _ = run(
        [
            "train",
            "--data",
            files["reg_npz"],
            "--optimizer",
            "adam",
            "--lr",
            "0.1,0.001",
            "--seed",
            "0,1",
            "--epochs",
            "3",
            "--json",
            tmp_path / "s.json",
            "--plot",
            tmp_path / "p.png",
        ],
        capsys,
    )
    assert code == 0
    assert "4 configurations in one program" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    ranks = summary["sweep"]
    assert [r["learning_rate"] for r in ranks][:2] == pytest.approx([0.1, 0.1])
    assert sorted(r["seed"] for r in ranks) == [0, 0, 1, 1]
    assert ranks[0]["val_mse"] <= ranks[-1]["val_mse"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_devices_flag_trains_data_parallel(files, capsys, tmp_path):
    argv = f"train --data {files['reg_npz']} --devices 4 --epochs 20 --optimizer adam --lr 0.05 "
    argv += f"--json {tmp_path / 's.json'}"
    code, out, _ = run(argv.split(), capsys)
    assert code == 0, out
    assert json.loads((tmp_path / "s.json").read_text())["val_mse"] < 0.2


def spy_on_fit(monkeypatch):
    """Records the keywords and result of each fit the CLI makes."""
    calls = []

    def spy(*args, **kwargs):
        res = scanfit.fit(*args, **kwargs)
        calls.append((kwargs, res))
        return res

    monkeypatch.setattr(_cli, "fit", spy)
    return calls


def test_eval_every_metric_equals_a_host_computation_on_the_rows_evaluated(
    files, capsys, tmp_path, monkeypatch
):
    calls = spy_on_fit(monkeypatch)
    argv = (
        f"train --data {files['cls_npz']} --epochs 3 --eval-every 10 --json {tmp_path / 's.json'}"
    )
    code, out, _ = run(argv.split(), capsys)
    assert code == 0, out
    summary = json.loads((tmp_path / "s.json").read_text())
    ((kwargs, res),) = calls
    # 120 validation rows as 3 microbatches of 32: the last 24 are dropped, not padded.
    x_eval, y_eval = kwargs["eval_data"]
    assert x_eval.shape == (3, 32, 4) and summary["eval_dropped_rows"] == 24
    table = _data.load(files["cls_npz"])
    split = _data.split(
        table, batch_size=32, val_fraction=0.2, accumulate=1, seed=0, y_dtype=np.int32
    )
    np.testing.assert_array_equal(x_eval.reshape(-1, 4), split.val[0][:96])
    np.testing.assert_array_equal(y_eval.reshape(-1), split.val[1][:96])
    # The final params on those 96 rows, in float64 NumPy.
    ((w, b),) = res.params["layers"]
    logits = x_eval.reshape(-1, 4).astype(np.float64) @ np.asarray(w, np.float64) + np.asarray(b)
    labels = y_eval.reshape(-1)
    accuracy = np.mean(logits.argmax(-1) == labels)
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    cross_entropy = -np.mean(log_p[np.arange(len(labels)), labels])
    last = summary["evaluations"][-1]
    assert last["step"] == summary["updates"] == 45
    # Mean of 3 float32 microbatch means against a float64 mean of 96 rows.
    assert last["val_accuracy"] == pytest.approx(accuracy, rel=1e-6)
    assert summary["val_accuracy"] == pytest.approx(accuracy, rel=1e-6)
    assert last["val_loss"] == pytest.approx(cross_entropy, rel=1e-5)
    assert [e["step"] for e in summary["evaluations"]] == [10, 20, 30, 40, 45]
    assert summary["stopped_at"] == -1 and "stopped at" not in out
    best = max(summary["evaluations"], key=lambda e: e["val_accuracy"])  # first of ties
    assert summary["best_step"] == best["step"]
    assert summary["best_val_accuracy"] == best["val_accuracy"]
    assert f"best val_accuracy {best['val_accuracy']:.4f} at update {best['step']}" in out


@pytest.mark.parametrize("patience", [1, 2])
def test_patience_stops_p_evaluations_after_the_best(files, patience, capsys, tmp_path):
    argv = f"train --data {files['reg_npz']} --model mlp --hidden 16 --lr 0.05 --epochs 40 "
    argv += f"--eval-every 15 --patience {patience} --json {tmp_path / 's.json'}"
    code, out, _ = run(argv.split(), capsys)
    assert code == 0, out
    summary = json.loads((tmp_path / "s.json").read_text())
    history = summary["evaluations"]
    for key, kind in [
        ("best_val_mse", float),
        ("best_step", int),
        ("stopped_at", int),
        ("evaluations", list),
        ("eval_microbatches", int),
        ("eval_batch_size", int),
        ("eval_dropped_rows", int),
    ]:
        assert isinstance(summary[key], kind), key
    assert set(history[0]) == {"step", "val_mse", "val_loss"}
    steps = [e["step"] for e in history]
    assert steps == list(range(15, 15 * len(history) + 1, 15))
    best = min(range(len(history)), key=lambda i: history[i]["val_mse"])  # first of ties
    assert summary["best_step"] == steps[best]
    assert summary["best_val_mse"] == history[best]["val_mse"]
    # Stopped exactly P evaluations after the best, and nothing evaluated after.
    assert 0 < summary["stopped_at"] < summary["updates"]
    assert steps[-1] == summary["stopped_at"] == steps[best + patience]
    assert f"stopped at update {summary['stopped_at']} (patience {patience})" in out
    assert f"updates    {summary['stopped_at']} of {summary['updates']} in" in out
    assert np.isfinite(summary["final_loss"])
    # The final metric is that of the params at the stop.
    assert summary["val_mse"] == pytest.approx(history[-1]["val_mse"], rel=1e-5)


@pytest.mark.parametrize(
    "rows, batch_size, shape, dropped",
    [(100, 32, (3, 32), 4), (96, 32, (3, 32), 0), (7, 32, (1, 7), 0)],
)
def test_eval_batches_are_full_the_tail_dropped(rows, batch_size, shape, dropped):
    x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    (xb, yb), left = _cli._eval_batches((x, x[:, 0]), batch_size)
    assert xb.shape == (*shape, 2) and yb.shape == shape and left == dropped
    np.testing.assert_array_equal(xb.reshape(-1, 2), x[: rows - dropped])


def test_a_stopped_run_rerun_from_its_checkpoints_reports_the_same_stop(files, capsys, tmp_path):
    argv = f"train --data {files['reg_npz']} --model mlp --hidden 16 --lr 0.05 --epochs 40 "
    argv += f"--eval-every 15 --patience 1 --checkpoint-dir {tmp_path / 'ck'} "
    argv += f"--json {tmp_path / 's.json'} --quiet"
    assert run(argv.split(), capsys)[0] == 0
    first = json.loads((tmp_path / "s.json").read_text())
    assert run(argv.split(), capsys)[0] == 0
    again = json.loads((tmp_path / "s.json").read_text())
    assert 0 < first["stopped_at"] < first["updates"]
    for key in ("stopped_at", "best_step", "best_val_mse", "evaluations", "val_mse"):
        assert again[key] == first[key], key


def test_log_dir_is_passed_to_fit_and_left_out_without_it(files, capsys, tmp_path, monkeypatch):
    seen = []

    def fake_fit(*args, log_dir="absent", **kwargs):
        seen.append(log_dir)
        return scanfit.fit(*args, **kwargs)

    monkeypatch.setattr(_cli, "fit", fake_fit)
    base = ["train", "--data", files["reg_npz"], "--epochs", "1", "--quiet"]
    assert run([*base, "--log-dir", tmp_path / "logs"], capsys)[0] == 0
    assert run(base, capsys)[0] == 0
    assert seen == [tmp_path / "logs", "absent"]


def test_log_dir_writes_a_metrics_record_per_chunk(files, capsys, tmp_path):
    argv = f"train --data {files['reg_npz']} --epochs 2 --chunk-steps 5 --eval-every 10 "
    argv += f"--log-dir {tmp_path / 'logs'} --quiet"
    assert run(argv.split(), capsys)[0] == 0
    text = (tmp_path / "logs" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    chunk_steps = {r["step"] for r in records if r.get("kind", "chunk") == "chunk"}
    assert chunk_steps >= {5, 10, 15, 20, 25, 30}  # 30 updates in chunks of 5


def bad_files(tmp_path):
    (tmp_path / "nox.npz").write_bytes(b"")
    np.savez(tmp_path / "nox.npz", features=np.ones((4, 2)), y=np.ones(4))
    np.savez(tmp_path / "rows.npz", x=np.ones((10, 2)), y=np.ones(9))
    np.savez(tmp_path / "nan.npz", x=np.r_[np.ones((5, 2)), [[np.nan, 1]]], y=np.ones(6))
    (tmp_path / "text.csv").write_text("a,b,y\n1,2,3\n4,five,6\n")
    (tmp_path / "ragged.csv").write_text("a,b,y\n1,2,3\n4,5\n")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "small.npz", x=np.ones((20, 2)), y=np.ones(20))
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.ones(4))
    return tmp_path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "missing.npz"], "--data missing.npz: no such file"),
        (["--data", "nox.npz"], "missing array 'x' (found features, y)"),
        (["--data", "rows.npz"], "x has 10 rows but y has 9"),
        (["--data", "nan.npz"], "x has NaN or inf values (first at row 5)"),
        (["--data", "text.csv"], "line 3, column 'b': 'five' is not a number"),
        (["--data", "ragged.csv"], "line 3 has 2 cells, the header has 3"),
        (["--data", "junk.npz"], "junk.npz: cannot read it"),
        (["--data", "obj.npz"], "obj.npz: cannot read it"),
        (
            ["--data", "small.npz", "--batch-size", "64"],
            "--batch-size 64 needs at least 64 training rows, the data has 16",
        ),
        (["--optimizer", "adamm"], "--optimizer adamm: not an optax optimizer taking a learning"),
        (
            ["--patience", "3"],
            "--patience 3 needs validation rows; give --val-fraction > 0 (built-in data holds "
            "none out by default)",
        ),
        (
            ["--data", "small.npz", "--eval-every", "5", "--val-fraction", "0"],
            "--eval-every 5 needs validation rows; give --val-fraction > 0",
        ),
        (
            ["--data", "small.npz", "--model", "scalar"],
            "--model scalar fits y = w * x: it needs one feature",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(bad_files(tmp_path))
    code, out, err = run(["train", *argv], capsys)
    assert code == 2
    assert err.startswith("scanfit: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--lr", "-0.1"], "argument --lr: must be a positive number, got -0.1"),
        (["train", "--lr", "fast"], "argument --lr: must be a positive number, got fast"),
        (["train", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (
            ["train", "--batch-size", "x"],
            "argument --batch-size: must be a positive integer, got x",
        ),
        (["train", "--val-fraction", "1.5"], "argument --val-fraction: must be a number in [0, 1)"),
        (["train", "--model", "cnn"], "argument --model: invalid choice: 'cnn'"),
    ],
)
def test_bad_flags_exit_2_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_divergence_is_one_line_and_exit_1(capsys):
    code, _, err = run(["train", "--steps", "200", "--lr", "5"], capsys)
    assert code == 1
    assert err.startswith("scanfit: error: training diverged at update ") and "lower --lr" in err
    assert "Traceback" not in err


def test_sweep_with_checkpoint_dir_is_refused(files, capsys, tmp_path):
    code, _, err = run(
        ["train", "--data", files["reg_npz"], "--lr", "0.1,0.2", "--checkpoint-dir", tmp_path],
        capsys,
    )
    assert code == 2 and "give one --lr and one --seed" in err


def test_every_subcommand_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--data",
        "--model",
        "--optimizer",
        "--lr",
        "--epochs",
        "--batch-size",
        "--accumulate",
        "--chunk-steps",
        "--val-fraction",
        "--seed",
        "--checkpoint-dir",
        "--plot",
        "--json",
        "--quiet",
        "--devices",
        "--task",
        "--hidden",
        "--eval-every",
        "--patience",
        "--log-dir",
    ):
        assert flag in out


# ---------------------------------------------------------------------------
# Every bad invocation: exit 2, at most 3 lines on stderr, no traceback.


def bad_input_files(tmp_path):
    """The files the table below refers to, by name, in tmp_path."""
    bad_files(tmp_path)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 2)).astype(np.float32)
    np.savez(tmp_path / "good.npz", x=x, y=x.sum(1))
    np.savez(tmp_path / "complex.npz", x=x + 1j, y=x.sum(1))
    np.savez(tmp_path / "complexy.npz", x=x, y=x.sum(1) + 1j)
    np.savez(tmp_path / "scalar.npz", x=np.float32(1.0), y=np.float32(2.0))
    np.savez(tmp_path / "floaty.npz", x=x, y=x.sum(1) + 0.5)
    np.save(tmp_path / "flat.npy", np.ones(10))
    np.save(tmp_path / "onecol.npy", np.ones((10, 1)))
    rows = "\n".join(f"{a:.3f},{b:.3f},{int(a > 0)}" for a, b in x)
    (tmp_path / "noheader.csv").write_text(rows + "\n")
    (tmp_path / "bigclass.csv").write_text("a,b,label\n" + rows + "\n0.1,0.2,1000000000\n")
    (tmp_path / "negative.csv").write_text("a,b,label\n" + rows + "\n0.1,0.2,-1\n")
    (tmp_path / "headeronly.csv").write_text("a,b,y\n")
    (tmp_path / "onecolumn.csv").write_text("y\n1\n2\n")
    (tmp_path / "data.txt").write_text("1,2,3\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    return tmp_path


BAD_FLAGS = [  # rejected by argparse: its usage line, then the error
    (["--lr", "-0.1"], "argument --lr: must be a positive number, got -0.1"),
    (["--lr", "fast"], "argument --lr: must be a positive number, got fast"),
    (["--lr", "nan"], "argument --lr: must be a positive number, got nan"),
    (["--lr", "inf"], "argument --lr: must be a positive number, got inf"),
    (["--lr", "0"], "argument --lr: must be a positive number, got 0"),
    (["--lr", "1e400"], "argument --lr: must be a positive number, got 1e400"),
    (["--lr", "0.1,,0.2"], "argument --lr: must be a positive number, got "),
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["--steps", "-5"], "argument --steps: must be a positive integer, got -5"),
    (["--steps", "1e3"], "argument --steps: must be a positive integer, got 1e3"),
    (["--batch-size", "x"], "argument --batch-size: must be a positive integer, got x"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    (["--accumulate", "0"], "argument --accumulate: must be a positive integer, got 0"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["--epochs", "2.5"], "argument --epochs: must be a positive integer, got 2.5"),
    (["--chunk-steps", "-1"], "argument --chunk-steps: must be a positive integer, got -1"),
    (["--val-fraction", "1.5"], "argument --val-fraction: must be a number in [0, 1)"),
    (["--val-fraction", "nan"], "argument --val-fraction: must be a number in [0, 1)"),
    (["--val-fraction", "-0.1"], "argument --val-fraction: must be a number in [0, 1)"),
    (["--model", "cnn"], "argument --model: invalid choice: 'cnn'"),
    (["--task", "clustering"], "argument --task: invalid choice: 'clustering'"),
    (["--hidden", "0"], "argument --hidden: must be a positive integer, got 0"),
    (["--hidden", "64,,32"], "argument --hidden: must be a positive integer, got "),
    (["--hidden", "abc"], "argument --hidden: must be a positive integer, got abc"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 2147483647, got -1"),
    (
        ["--seed", str(2**70)],
        f"argument --seed: must be an integer from 0 to 2147483647, got {2**70}",
    ),
    (["--seed", str(2**31)], "argument --seed: must be an integer from 0 to 2147483647"),
    (["--seed", "0,x"], "argument --seed: must be an integer from 0 to 2147483647, got x"),
    (["--true-w", "nan"], "argument --true-w: must be a finite number, got nan"),
    (["--true-w=-inf"], "argument --true-w: must be a finite number, got -inf"),
    (["--noise", "-1"], "argument --noise: must be a number >= 0, got -1"),
    (["--noise", "nan"], "argument --noise: must be a finite number, got nan"),
    (["--devices", "0"], "argument --devices: must be a positive integer, got 0"),
    (["--checkpoint-dir", ""], "argument --checkpoint-dir: must be a directory name, got ''"),
    (["--eval-every", "0"], "argument --eval-every: must be a positive integer, got 0"),
    (["--eval-every", "-3"], "argument --eval-every: must be a positive integer, got -3"),
    (["--eval-every", "abc"], "argument --eval-every: must be a positive integer, got abc"),
    (["--patience", "0"], "argument --patience: must be a positive integer, got 0"),
    (["--log-dir", ""], "argument --log-dir: must be a directory name, got ''"),
    (["--foo"], "unrecognized arguments: --foo"),
    (["--data"], "argument --data: expected one argument"),
]

BAD_INPUTS = [  # rejected by scanfit: one line
    (["--devices", "64"], "--devices 64: this machine has 4 cpu device(s)"),
    (["--optimizer", "lbfgs"], "--optimizer lbfgs: optax.lbfgs cannot train with gradients alone"),
    (["--optimizer", "dpsgd"], "optax.dpsgd also needs l2_norm_clip, noise_multiplier, seed"),
    (["--optimizer", ""], "--optimizer '': not an optax optimizer taking a learning rate"),
    (["--optimizer", "adamm"], "--optimizer adamm: not an optax optimizer"),
    (["--optimizer", "GradientTransformation"], "not an optax optimizer taking a learning rate"),
    (["--optimizer", "__class__"], "--optimizer __class__: not an optax optimizer"),
    (["--optimizer", "adam;rm"], "--optimizer 'adam;rm': not an optax optimizer"),
    (["--plot", "p.xyz"], "--plot p.xyz: unknown image format 'xyz'; use one of"),
    (["--plot", "p"], "--plot p: unknown image format '(none)'"),
    (["--plot", "adir"], "--plot adir: is a directory, give a file name"),
    (["--plot", "nodir/p.png"], "--plot nodir/p.png: directory nodir does not exist"),
    (["--json", "nodir/s.json"], "--json nodir/s.json: directory nodir does not exist"),
    (["--json", "adir"], "--json adir: is a directory"),
    (["--checkpoint-dir", "afile"], "--checkpoint-dir afile: exists and is not a directory"),
    (["--log-dir", "afile"], "--log-dir afile: exists and is not a directory"),
    (["--patience", "3"], "--patience 3 needs validation rows"),
    (
        ["--data", "good.npz", "--patience", "3", "--lr", "0.1,0.2"],
        "--patience trains one configuration; give one --lr and one --seed",
    ),
    (["--compile-cache", "afile"], "--compile-cache afile: exists and is not a directory"),
    (["--compile-cache", "cc", "--no-compile-cache"], "--compile-cache cc and --no-compile-cache"),
    (["--eval-every", "100"], "(built-in data holds none out by default)"),
    (["--data", "good.npz", "--eval-every", "5", "--val-fraction", "0"], "needs validation rows"),
    (
        ["--data", "good.npz", "--eval-every", "5", "--lr", "0.1,0.2"],
        "--eval-every trains one configuration; give one --lr and one --seed",
    ),
    (["--checkpoint-dir", "afile/sub"], "--checkpoint-dir afile/sub: afile is not a directory"),
    (["--data", "missing.npz"], "--data missing.npz: no such file"),
    (["--data", "adir"], "--data adir: no such file"),
    (["--data", "data.txt"], "--data data.txt: unknown format .txt; use .npz, .csv or .npy"),
    (["--data", "nox.npz"], "missing array 'x' (found features, y)"),
    (["--data", "rows.npz"], "x has 10 rows but y has 9"),
    (["--data", "nan.npz"], "x has NaN or inf values (first at row 5)"),
    (["--data", "text.csv"], "line 3, column 'b': 'five' is not a number"),
    (["--data", "ragged.csv"], "line 3 has 2 cells, the header has 3"),
    (["--data", "junk.npz"], "junk.npz: cannot read it"),
    (["--data", "obj.npz"], "obj.npz: cannot read it"),
    (["--data", "complex.npz"], "x and y must be real numbers, got complex64 and float32"),
    (["--data", "complexy.npz"], "x and y must be real numbers, got float32 and complex64"),
    (["--data", "scalar.npz"], "x and y must be arrays of rows, got shapes () and ()"),
    (["--data", "flat.npy"], "a .npy file must hold a 2-D array (rows, features + 1)"),
    (["--data", "onecol.npy"], "got shape (10, 1)"),
    (["--data", "noheader.csv"], "is all numbers, not a header; add a header row"),
    (["--data", "headeronly.csv"], "needs a header row and at least one data row"),
    (["--data", "onecolumn.csv"], "needs at least two columns (features, then the target)"),
    (
        ["--data", "bigclass.csv"],
        "has 3,000,000,003 parameters and needs about",
    ),
    (["--data", "bigclass.csv"], "its targets make 1,000,000,001 classes"),
    (["--data", "negative.csv"], "--task classification needs integer class labels 0, 1, 2"),
    (["--data", "floaty.npz", "--task", "classification"], "needs integer class labels"),
    (
        ["--data", "good.npz", "--model", "mlp", "--hidden", "100000000"],
        "the mlp model (2 -> 100,000,000 -> 1) has 400,000,001 parameters",
    ),
    (
        ["--data", "good.npz", "--model", "mlp", "--hidden", "64", "--lr", "0.1,0.2"]
        + ["--seed", ",".join(map(str, range(2000))), "--batch-size", "10000"],
        "x 4000 configs and needs about",
    ),
    (
        ["--data", "good.npz", "--lr", "0.1,0.2", "--epochs", "100000000"],
        "200000000 updates x 2 configs would stack 1.5 GiB of per-update losses and aux in one "
        "program, more than the 1 GiB allowed; give fewer --epochs, --lr or --seed values",
    ),
    (["--steps", "10000000000"], "--steps 10000000000 x --batch-size 32 = 320,000,000,000 rows"),
    (["--steps", "2000000000", "--batch-size", "64"], "rows of built-in data need about"),
    (["--epochs", "100000000000"], "--epochs 100000000000 x 20000 updates per epoch"),
    (["--data", "good.npz", "--epochs", "100000000000"], "more than the 2,147,483,647 one run"),
    (["--true-w", "1e39", "--steps", "10"], "--true-w 1e+39 and --noise 0.1 overflow float32"),
    (["--data", "small.npz", "--batch-size", "64"], "--batch-size 64 needs at least 64 training"),
    (["--data", "small.npz", "--model", "scalar"], "--model scalar fits y = w * x"),
    (["--data", "small.npz", "--val-fraction", "0.01"], "--val-fraction 0.01 of 20 rows holds"),
    (
        ["--data", "good.npz", "--lr", "0.1,0.2", "--checkpoint-dir", "ck"],
        "give one --lr and one --seed",
    ),
    (
        ["--data", "good.npz", "--batch-size", "10", "--devices", "3"],
        "--batch-size 10 must be a multiple of --devices 3",
    ),
]


def run_bad(argv, capsys):
    """(exit status, stderr) of main(argv), argparse's own exit included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", BAD_FLAGS + BAD_INPUTS)
def test_every_bad_invocation_is_at_most_3_lines_and_exit_2(
    argv, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(bad_input_files(tmp_path))
    monkeypatch.setattr(_cli, "_memory_budget", lambda: 8 * 2**30)  # as on a 16 GiB machine
    code, err = run_bad(["train", *argv], capsys)
    assert code == 2, err
    assert message in err, err
    assert len(err.splitlines()) <= 3 and "Traceback" not in err, err
    assert not list(tmp_path.glob("ck*/*")), "nothing may be trained or saved"


def test_table_covers_at_least_60_cases():
    assert len(BAD_FLAGS) + len(BAD_INPUTS) >= 60


@pytest.mark.parametrize("argv", [[], ["bogus"]])
def test_missing_or_unknown_command_exits_2(argv, capsys):
    code, err = run_bad(argv, capsys)
    assert code == 2 and len(err.splitlines()) <= 3 and "Traceback" not in err


@pytest.mark.parametrize(
    "error, message",
    [
        (
            PermissionError(13, "Permission denied", "ck/ckpt.tmp"),
            "Permission denied (ck/ckpt.tmp)",
        ),
        (OSError(30, "Read-only file system", "ck"), "Read-only file system (ck)"),
        (OSError(28, "No space left on device", "ck/x.npz"), "No space left on device (ck/x.npz)"),
        (ValueError("checkpoint_dir 'ck' exists and is not a directory."), "is not a directory"),
    ],
)
def test_errors_of_the_run_itself_are_one_line(error, message, files, capsys, monkeypatch):
    # Read-only and full directories cannot be made here as root; what fit raises for them
    # (the checkpoint internals are fit's) must reach the user as one line.
    def failing_fit(*args, **kwargs):
        raise error

    monkeypatch.setattr(_cli, "fit", failing_fit)
    code, err = run_bad(["train", "--data", files["reg_npz"], "--checkpoint-dir", "ck"], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "checkpoint, step, message",
    [
        (
            True,
            40,
            "scanfit: interrupted at update 40; checkpoint saved in ck; run again to resume",
        ),
        (False, 40, "scanfit: interrupted at update 40; nothing saved (no --checkpoint-dir)"),
        (True, 0, "scanfit: interrupted at update 0; nothing saved\n"),
    ],
)
def test_ctrl_c_says_where_the_run_stopped_and_exits_130(
    checkpoint, step, message, files, capsys, monkeypatch
):
    def interrupted_fit(*args, **kwargs):
        interrupt = KeyboardInterrupt()
        interrupt.step = step  # as fit tags it after saving
        raise interrupt

    monkeypatch.setattr(_cli, "fit", interrupted_fit)
    argv = ["train", "--data", files["reg_npz"]] + (
        ["--checkpoint-dir", "ck"] if checkpoint else []
    )
    code, err = run_bad(argv, capsys)
    assert code == 130 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "checkpoint, step, message",
    [
        (
            True,
            40,
            "scanfit: preempted (SIGTERM) at update 40; checkpoint saved in ck; run again to "
            "resume\n",
        ),
        (False, 40, "scanfit: preempted (SIGTERM) at update 40; nothing saved (no --checkpoint"),
    ],
)
def test_sigterm_in_training_says_where_the_run_stopped_and_exits_143(
    checkpoint, step, message, files, capsys, monkeypatch
):
    def preempted_fit(*args, **kwargs):
        raise scanfit.Preempted(step, kwargs["checkpoint_dir"])

    monkeypatch.setattr(_cli, "fit", preempted_fit)
    argv = ["train", "--data", files["reg_npz"]] + (
        ["--checkpoint-dir", "ck"] if checkpoint else []
    )
    code, err = run_bad(argv, capsys)
    assert code == 143 and message in err and len(err.splitlines()) == 1, err


def test_sigterm_outside_training_exits_143_in_one_line(files, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def load(path):  # the signal lands while the data is read
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # never reached: the handler raises

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(_data, "load", load)
    argv = ["train", "--data", files["reg_npz"], "--checkpoint-dir", "ck"]
    code, err = run_bad(argv, capsys)
    assert code == 143, err
    assert err == "scanfit: terminated (SIGTERM); checkpoints in ck are kept\n"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    "flags, want",
    [
        ([], None),
        (["--checkpoint-dir", "ck"], "ck/compile-cache"),
        (["--checkpoint-dir", "ck", "--compile-cache", "cc"], "cc"),
        (["--checkpoint-dir", "ck", "--no-compile-cache"], None),
        (["--compile-cache", "cc"], "cc"),
    ],
)
def test_compile_cache_is_on_under_checkpoint_dir_unless_turned_off(
    flags, want, files, capsys, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    used = []
    real = _compile_cache.persistent

    def persistent(path):
        used.append(path)
        return real(path)

    monkeypatch.setattr(_compile_cache, "persistent", persistent)
    code, _, err = run(["train", "--data", files["reg_npz"], "--epochs", "1", *flags], capsys)
    assert code == 0, err
    assert used[0] == (None if want is None else Path(want))


def test_validation_every_epoch_by_default_reports_best_and_final(files, capsys, tmp_path):
    argv = f"train --data {files['cls_npz']} --epochs 4 --lr 0.05 --json {tmp_path / 's.json'}"
    code, out, _ = run(argv.split(), capsys)
    assert code == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    steps = [e["step"] for e in summary["evaluations"]]
    assert summary["eval_every"] == 15 and steps == [15, 30, 45, 60]  # 15 updates an epoch
    best = max(summary["evaluations"], key=lambda e: e["val_accuracy"])  # first of ties
    assert (summary["best_step"], summary["best_val_accuracy"]) == (
        best["step"],
        best["val_accuracy"],
    )
    # The final metric: the params after the last update, on the same rows.
    assert summary["val_accuracy"] == pytest.approx(summary["evaluations"][-1]["val_accuracy"])
    assert f"best val_accuracy {best['val_accuracy']:.4f} at update {best['step']}" in out
    assert f"val_accuracy {summary['val_accuracy']:.4f}" in out


def scanfit_cli(*argv, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "scanfit", "train", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], "argument --seed: must be an integer from 0"),
        (["--epochs", "100000000000"], "updates, more than the 2,147,483,647"),  # was SIGABRT
        (["--optimizer", "lbfgs"], "cannot train with gradients alone"),
    ],
)
def test_bad_input_in_a_real_process_exits_2_without_traceback(argv, message):
    proc = scanfit_cli(*argv)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert message in err and "Traceback" not in err and len(err.splitlines()) <= 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, code, what",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, r"preempted \(SIGTERM\)")],
)
def test_a_signal_saves_says_where_and_exits_without_traceback(files, tmp_path, sig, code, what):
    ckpt = tmp_path / "ck"
    argv = ["--data", files["reg_npz"], "--epochs", "1000000", "--chunk-steps", "500"]
    proc = scanfit_cli(*argv, "--checkpoint-dir", ckpt, "--quiet")
    deadline = time.monotonic() + 120
    while not list(ckpt.glob("*.npz")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    match = re.fullmatch(
        rf"scanfit: {what} at update (\d+); checkpoint saved in {re.escape(str(ckpt))}; "
        r"run again to resume\n",
        err,
    )
    assert match, err
    step = int(match.group(1))
    assert step > 0 and step % 500 == 0
    assert max(int(p.stem.split("-")[1]) for p in ckpt.glob("ckpt-*.npz")) == step
