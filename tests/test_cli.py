"""The `scanfit` command, through main(argv) and as a real subprocess."""

import json
import subprocess
import sys

import numpy as np
import pytest

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
        ("val_mse", float),
        ("curve", list),
        ("final_losses", dict),
    ]:
        assert isinstance(summary[key], kind), key
    assert summary["updates"] == 30 and len(summary["curve"]) == 6
    assert set(summary["curve"][0]) == {"step", "loss", "val_mse"}


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
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir())[-1] == "ckpt-0000000045.npz"


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
    ):
        assert flag in out
