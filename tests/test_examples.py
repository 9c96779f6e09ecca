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


def test_equinox_batchnorm_dropout_model_reaches_high_held_out_accuracy():
    eqx = pytest.importorskip("equinox")
    pytest.importorskip("sklearn")
    ex = load("equinox_mlp")
    out = ex.main(quick=True)
    assert out["untrained_accuracy"] < 0.3 and out["val_accuracy"] >= 0.95
    assert out["final_loss"] < 0.2 * out["first_loss"]
    assert isinstance(out["model"], ex.Net) and isinstance(out["state"], eqx.nn.State)
    # The BatchNorm running statistics moved away from their initial values.
    _, initial = eqx.nn.make_with_state(ex.Net)(64, jax.random.key(0))
    moved = [
        float(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)).max())
        for a, b in zip(jax.tree.leaves(out["state"]), jax.tree.leaves(initial))
    ]
    assert max(moved) > 0.01
    # The static part survives: the trained module keeps its dropout rate and BatchNorm axis.
    assert out["model"].drop.p == 0.2 and out["model"].bn.axis_name == "batch"


def test_flax_nnx_batchnorm_dropout_module_is_trained_in_place():
    nnx = pytest.importorskip("flax.nnx")
    pytest.importorskip("sklearn")
    ex = load("flax_nnx")
    out = ex.main(quick=True)
    assert out["untrained_accuracy"] < 0.3 and out["val_accuracy"] >= 0.95
    assert out["final_loss"] < 0.2 * out["first_loss"]
    model = out["model"]
    assert out["dropout_masks_drawn"] == out["updates"]  # a new mask every update
    assert float(jnp.abs(model.bn.mean[...]).max()) > 0.01  # statistics advanced
    # The module holds exactly the trained state scanfit returned.
    _, params, rest = nnx.split(model, nnx.Param, ...)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out["result"].params)):
        np.testing.assert_array_equal(a, b)
    kept = out["result"].model_state["bn"]["var"][...]
    np.testing.assert_array_equal(rest["bn"]["var"][...], kept)


def test_grain_loader_trains_and_resumes_bitwise():
    pytest.importorskip("grain", reason="grain is in the examples extra")
    pytest.importorskip("sklearn")
    out = load("grain_loader").main(quick=True)
    assert out["val_accuracy"] >= 0.9
    assert out["final_loss"] < 0.2 * out["first_loss"]
    assert out["updates"] == 5 * (1797 - 359) // 32  # the sampler's 5 epochs, batched by 32
    assert 0 < out["stopped_at"] < out["updates"]
    assert out["resumed_equals_uninterrupted"]


def test_torch_loader_with_numpy_collation_trains():
    pytest.importorskip("torch", reason="torch is optional: the bench extra's CPU build")
    pytest.importorskip("sklearn")
    out = load("torch_loader").main(quick=True)
    assert out["val_accuracy"] >= 0.9
    assert out["final_loss"] < 0.2 * out["first_loss"]
    assert out["updates"] == 5 * ((1797 - 359) // 32)
