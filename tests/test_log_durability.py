"""The metrics log across kills and runs (``tests/_log_worker.py`` killed as a subprocess).

Every record of every run stays on disk; a resumed run's ``metrics.jsonl`` and
TensorBoard events equal the uninterrupted run's exactly (the resumed training is
bitwise equal on CPU), each (tag, step) once.
"""

import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from scanfit import _checkpoint, _metrics_log

sys.path.insert(0, str(Path(__file__).parent))
import _log_worker  # noqa: E402

# tbparse calls a pandas API that pandas 3 deprecates: their warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword")


def _newest(ckpt) -> int:
    return max((s for s, _ in _checkpoint.list_checkpoints(Path(ckpt))), default=0)


def _run(log_dir, ckpt, *flags, kill_after_checkpoint=False, delay=0.0):
    """Runs the worker to its end, its own kill, or a SIGKILL ``delay`` seconds after the
    first checkpoint it saves; returns its exit status."""
    newest = _newest(ckpt)
    proc = subprocess.Popen(
        [sys.executable, _log_worker.__file__, str(log_dir), str(ckpt), *map(str, flags)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kill_after_checkpoint:
        deadline = time.monotonic() + 120
        while _newest(ckpt) == newest and proc.poll() is None:
            assert time.monotonic() < deadline, "the worker saved no checkpoint in time"
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode in (0, -signal.SIGKILL), stderr
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's log directory."""
    where = tmp_path_factory.mktemp("reference")
    _log_worker.train(where / "log", where / "ckpt")
    return where / "log"


def _scalars(log_dir) -> list[tuple[str, int, float]]:
    """Every (tag, step, value) tbparse reads from ``log_dir`` itself (not previous-<k>/)."""
    tbparse = pytest.importorskip("tbparse", reason="tbparse is in the dev extra")
    pytest.importorskip("tensorboardX", reason="tensorboardX is in the tensorboard extra")
    frame = tbparse.SummaryReader(str(log_dir), extra_columns={"dir_name"}).scalars
    frame = frame[frame.dir_name == ""]
    return sorted((r.tag, int(r.step), float(r.value)) for r in frame.itertuples())


def assert_same_log(log_dir, reference):
    assert _metrics_log.read(log_dir) == _metrics_log.read(reference)
    if _metrics_log._has_tensorboard():
        got, want = _scalars(log_dir), _scalars(reference)
        assert len({(tag, step) for tag, step, _ in got}) == len(got)  # each (tag, step) once
        assert got == want


def test_a_kill_mid_append_then_resume_equals_the_uninterrupted_log(tmp_path, reference):
    log, ckpt = tmp_path / "log", tmp_path / "ckpt"
    assert _run(log, ckpt, "--tear-at", 20) == -signal.SIGKILL
    assert not (log / "metrics.jsonl").read_text().endswith("\n")  # torn mid-line
    # 16 once its save (on a host thread) landed before the kill; else the one before
    assert max(s for s, _ in _checkpoint.list_checkpoints(ckpt)) in (8, 16)
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl': its last line is torn"):
        _log_worker.train(log, ckpt)
    assert_same_log(log, reference)


def test_a_kill_during_the_resumes_rewrite_leaves_the_log_whole(tmp_path, reference):
    log, ckpt = tmp_path / "log", tmp_path / "ckpt"
    assert _run(log, ckpt, "--die-at", 20) == -signal.SIGKILL  # logged 20, saved 16
    before = {p.name: p.read_bytes() for p in log.iterdir()}
    assert [r["step"] for r in _metrics_log.read(log)][-3:] == [20, 18, 20]  # chunk, evals
    assert _run(log, ckpt, "--die-in-rewrite") == -signal.SIGKILL
    after = {p.name: p.read_bytes() for p in log.iterdir() if not p.name.startswith(".tmp")}
    assert after == before  # the copy written aside never replaced anything
    _log_worker.train(log, ckpt)
    assert_same_log(log, reference)
    assert not list(log.glob(".tmp*"))


def test_a_second_run_keeps_every_record_of_the_first(tmp_path, reference):
    log, ckpt = tmp_path / "log", tmp_path / "ckpt"
    assert _run(log, ckpt, "--die-at", 12) == -signal.SIGKILL
    first = {p.name: p.read_bytes() for p in log.iterdir()}
    _log_worker.train(log, ckpt, resume=False)  # a new run: its checkpoints and logs set aside
    assert {p.name: p.read_bytes() for p in (log / "previous-1").iterdir()} == first
    assert_same_log(log, reference)
    _log_worker.train(log, tmp_path / "other")  # another new run, in another checkpoint_dir
    assert {p.name: p.read_bytes() for p in (log / "previous-1").iterdir()} == first
    assert _metrics_log.read(log / "previous-2") == _metrics_log.read(reference)
    assert_same_log(log, reference)


def test_a_resume_never_cuts_another_runs_log(tmp_path, reference):
    log = tmp_path / "log"
    _log_worker.train(log, tmp_path / "a", on_chunk=lambda info: info.step < 20)  # saved at 20
    first = {p.name: p.read_bytes() for p in log.iterdir()}
    _log_worker.train(log, tmp_path / "b", lr=0.01)  # another run, into the same log_dir
    second = {p.name: p.read_bytes() for p in log.iterdir() if p.is_file()}
    with pytest.warns(RuntimeWarning, match=r"'.*log' was written by another run: it is moved"):
        _log_worker.train(log, tmp_path / "a")  # the first run resumes at update 20
    assert {p.name: p.read_bytes() for p in (log / "previous-1").iterdir()} == first
    assert {p.name: p.read_bytes() for p in (log / "previous-2").iterdir()} == second
    want = [r for r in _metrics_log.read(reference) if r["step"] > 20]
    assert _metrics_log.read(log) == want


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(8))
def test_kills_anywhere_then_resume_equal_the_uninterrupted_log(tmp_path, reference, trial):
    rng = np.random.default_rng(trial)
    log, ckpt = tmp_path / "log", tmp_path / "ckpt"
    for _ in range(1 + trial % 3):  # one, two or three kills before the resume that finishes
        _run(log, ckpt, "--slow", kill_after_checkpoint=True, delay=rng.uniform(0, 0.25))
    with warnings.catch_warnings():  # a kill may have torn the last line: warned, dropped
        warnings.filterwarnings("ignore", r".*its last line is torn", RuntimeWarning)
        _log_worker.train(log, ckpt)
    assert_same_log(log, reference)
    assert not (log / "previous-1").exists()
