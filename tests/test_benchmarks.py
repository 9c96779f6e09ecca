"""`make bench --quick` runs end to end, so the benchmark scripts never rot.

Peers that are not installed (torch, keras: the `bench` extra) are reported as
skipped, not failed. Timings are printed, never asserted: tests check behaviour.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
# The cheap quick suites, run in CI; `make test-all` runs every one (about 2 minutes).
CHEAP = ("seed", "lowering", "eval")


def _run(tmp_path, *suites):
    env = {**os.environ, "SCANFIT_BENCH_RESULTS": str(tmp_path)}
    only = ["--suites", *suites] if suites else []
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", *only], capture_output=True, text=True,
        timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_cheap_quick_benchmarks_run_and_every_suite_imports(tmp_path):
    proc = _run(tmp_path, *CHEAP)
    for suite in CHEAP:
        assert f"===== {suite}: ok" in proc.stdout
        assert json.loads((tmp_path / f"{suite}.json").read_text())
    sys.path.insert(0, str(RUN.parent))
    try:
        import run

        for suite in run.SUITES:  # every suite at least imports (no syntax or import rot)
            assert callable(__import__(suite).main)
    finally:
        sys.path.remove(str(RUN.parent))


@pytest.mark.slow
def test_quick_benchmarks_run_and_write_results(tmp_path):
    proc = _run(tmp_path)
    suites = ("seed", "lowering", "loop", "fit", "sources", "sweep", "models", "peers", "conv")
    suites += ("eval", "operations", "restart", "sharding", "steps")
    for suite in suites:
        assert f"===== {suite}: ok" in proc.stdout
        payload = json.loads((tmp_path / f"{suite}.json").read_text())
        assert payload  # each suite wrote its figures
    peers = json.loads((tmp_path / "peers.json").read_text())
    assert peers["rows"]["scanfit_fit"]["warm_updates_per_s"] > 0
    assert peers["ceiling_updates_per_s"] > 0
    conv = json.loads((tmp_path / "conv.json").read_text())
    assert conv["cnn"]["rows"]["scan_train"]["updates_per_s"] > 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["stopped_at"] == evaluation["config"]["updates"] // 3
    operations = json.loads((tmp_path / "operations.json").read_text())
    assert set(operations["checkpoint_every_chunk_ratio"]) == {"raise", "skip"}
    sharding = json.loads((tmp_path / "sharding.json").read_text())
    assert sharding["fsdp_bytes_ratio"] <= 1.1 / sharding["config"]["devices"]
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert "skipped" in steps or steps["speed"]["fit_steps"] > 0  # skipped without gymnax
