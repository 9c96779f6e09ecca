"""The `scanfit` command, through main(argv) and as a real subprocess."""

import subprocess
import sys

import pytest

from scanfit._cli import main


def test_train_prints_true_and_learned_w(capsys):
    assert main(["train", "--steps", "2000", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    learned = float(out.split("learned w")[1].split()[0])
    assert "true w    3.000000" in out
    assert abs(learned - 3.0) < 0.02
    assert "speed-up" in out and "updates/s" in out


def test_python_m_scanfit_runs_as_a_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "scanfit", "train", "--steps", "300", "--true-w", "-1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "true w    -1.500000" in proc.stdout


def test_divergence_is_one_clear_line_and_exit_2(capsys):
    assert main(["train", "--steps", "200", "--lr", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scanfit: error: training diverged") and "lower --lr" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--lr", "-0.1"], "argument --lr: must be a positive number, got -0.1"),
        (["train", "--lr", "fast"], "argument --lr: must be a positive number, got fast"),
        (["train", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (
            ["train", "--batch-size", "x"],
            "argument --batch-size: must be a positive integer, got x",
        ),
    ],
)
def test_bad_flags_exit_2_with_the_flag_named(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err
