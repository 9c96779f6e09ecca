"""The examples run (quick mode) and learn; skipped cleanly without their optional packages.

The examples need the ``examples`` extra (flax, equinox, scikit-learn); each
test skips when its package is absent.
"""

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    """Imports examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"scanfit_examples_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_mlp_reaches_high_validation_accuracy(capsys):
    pytest.importorskip("sklearn")
    out = load("digits_mlp").main(quick=True)
    assert out["initial_val_accuracy"] < 0.3  # 10 classes: chance is 0.1
    assert out["val_accuracy"] > 0.9
    assert out["final_loss"] < 0.2 * out["first_loss"]
    assert out["updates"] == out["epochs"] * ((1797 - 359) // 32)
    assert "validation accuracy" in capsys.readouterr().out


def test_digits_split_is_standardised_on_the_training_rows():
    pytest.importorskip("sklearn")
    ex = load("digits_mlp")
    (xt, yt), (xv, yv) = ex.split_and_standardise(*ex.load_digits())
    assert len(xt) + len(xv) == 1797 and len(xv) == 359
    assert xt.dtype == xv.dtype == np.float32
    np.testing.assert_allclose(xt.mean(0), 0, atol=1e-5)
    std = xt.std(0)
    assert np.all((np.abs(std - 1) < 1e-4) | (std == 0))  # constant pixels stay 0
    assert np.isfinite(xv).all()
    xb, yb = ex.microbatches(xt, yt)
    assert xb.shape == (len(xt) // 32, 32, 64) and yb.shape == (len(xt) // 32, 32)


def test_digits_npz_is_what_the_cli_reads(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from scanfit._cli import main

    path = tmp_path / "digits.npz"
    monkeypatch.setattr(sys, "argv", ["digits_mlp.py", "--save-npz", str(path)])
    runpy.run_path(str(EXAMPLES / "digits_mlp.py"), run_name="__main__")  # the script's flag
    assert f"wrote {path}" in capsys.readouterr().out
    with np.load(path, allow_pickle=False) as f:
        assert f["x"].shape == (1797, 64) and f["x"].dtype == np.float32
        assert f["y"].shape == (1797,) and np.issubdtype(f["y"].dtype, np.integer)
        assert set(np.unique(f["y"])) == set(range(10))
    summary = tmp_path / "s.json"
    args = ["train", "--data", str(path), "--model", "mlp", "--optimizer", "adam"]
    args += ["--lr", "0.001", "--epochs", "40", "--quiet", "--json", str(summary)]
    assert main(args) == 0
    assert json.loads(summary.read_text())["val_accuracy"] >= 0.95


def test_equinox_model_is_trained_through_fit():
    eqx = pytest.importorskip("equinox")
    ex = load("equinox_mlp")
    out = ex.main(quick=True)
    assert out["final_loss"] < 0.01 * out["first_loss"]
    assert out["untrained_max_abs_error"] > 0.5 and out["max_abs_error"] < 0.2
    trained = out["model"]
    assert isinstance(trained, eqx.nn.MLP)
    np.testing.assert_allclose(trained(jnp.array([0.5])), np.sin(1.0), atol=0.1)
    # The static part survives the round trip: the trained model has the same structure.
    assert trained.activation is jax.nn.tanh and trained.depth == 2 and trained.width_size == 32


def test_flax_nnx_model_holds_the_trained_weights():
    nnx = pytest.importorskip("flax.nnx")
    ex = load("flax_nnx")
    out = ex.main(quick=True)
    assert out["untrained_accuracy"] < 0.5  # 4 classes
    assert out["accuracy"] > 0.85 and out["final_loss"] < 0.3 * out["first_loss"]
    model = out["model"]
    x = jax.random.normal(jax.random.key(3), (8, ex.FEATURES))
    # nnx.update wrote the trained params into the module: it predicts what they predict ...
    merged = nnx.merge(out["graphdef"], out["params"])
    np.testing.assert_array_equal(model(x), merged(x))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(out["params"])):
        np.testing.assert_array_equal(a, b)
    # ... and no longer what the same module did before training.
    untrained = ex.MLP(ex.FEATURES, ex.HIDDEN, ex.CLASSES, rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(model(x) - untrained(x))).max() > 0.1
