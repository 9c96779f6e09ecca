"""The examples run (quick mode) and learn; skipped cleanly without their optional packages."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_mlp_reaches_high_validation_accuracy(capsys):
    pytest.importorskip("sklearn")
    out = load("digits_mlp").main(quick=True)
    assert out["val_accuracy"] > 0.9  # 10 classes: chance is 0.1
    assert out["final_loss"] < 0.3 * out["first_loss"]
    assert "validation accuracy" in capsys.readouterr().out


def test_digits_npz_is_what_the_cli_reads(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from scanfit._cli import main

    load("digits_mlp").save_digits_npz(tmp_path / "digits.npz")
    with np.load(tmp_path / "digits.npz", allow_pickle=False) as f:
        assert f["x"].shape == (1797, 64) and f["x"].dtype == np.float32
        assert f["y"].shape == (1797,) and set(np.unique(f["y"])) == set(range(10))
    code = main(
        [
            "train",
            "--data",
            str(tmp_path / "digits.npz"),
            "--model",
            "mlp",
            "--optimizer",
            "adam",
            "--lr",
            "0.001",
            "--epochs",
            "40",
            "--quiet",
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    import json

    assert code == 0
    assert json.loads((tmp_path / "s.json").read_text())["val_accuracy"] >= 0.95


def test_equinox_model_is_trained_through_fit():
    eqx = pytest.importorskip("equinox")
    out = load("equinox_mlp").main(quick=True)
    assert out["final_loss"] < 0.01 * out["first_loss"]
    assert out["max_abs_error"] < 0.2
    assert isinstance(out["model"], eqx.nn.MLP)
    np.testing.assert_allclose(out["model"](jnp.array([0.5])), np.sin(1.0), atol=0.1)


def test_flax_nnx_model_holds_the_trained_weights():
    nnx = pytest.importorskip("flax.nnx")
    ex = load("flax_nnx")
    out = ex.main(quick=True)
    assert out["accuracy"] > 0.85 and out["final_loss"] < 0.3 * out["first_loss"]
    x = jnp.ones((3, 16))
    merged = nnx.merge(out["graphdef"], out["params"])
    np.testing.assert_array_equal(out["model"](x), merged(x))
    assert jax.tree.leaves(out["params"])
