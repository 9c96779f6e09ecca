"""SIGTERM during fit: the chunk in flight kept and saved, scanfit.Preempted, handlers put back."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scanfit
from scanfit import _checkpoint, _preempt

sys.path.insert(0, str(Path(__file__).parent))
import _preempt_worker  # noqa: E402

N, B, D = 24, 8, 3


def loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] - y) ** 2)


@pytest.fixture
def problem():
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))  # fresh data each run
    x = rng.normal(size=(N, B, D)).astype(np.float32)
    y = (x @ rng.normal(size=(D,))).astype(np.float32)
    return {"w": np.zeros(D, np.float32)}, (x, y)


def sigterm_at(step):
    """An on_chunk that sends this process SIGTERM after the chunk ending at ``step``."""

    def on_chunk(info):
        if info.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_chunk


def fit(params, data, **kwargs):
    settings = dict(epochs=2, chunk_steps=4, checkpoint_every=100, progress=False)
    return scanfit.fit(loss, params, 0.05, data, **{**settings, **kwargs})


def steps_saved(path):
    return [s for s, _ in _checkpoint.list_checkpoints(path)]


@pytest.mark.parametrize("policy", ["raise", "ignore"])  # without and with a donated carry
def test_sigterm_saves_the_chunk_and_the_rerun_resumes_there_bitwise(problem, tmp_path, policy):
    params, data = problem
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(scanfit.Preempted) as exc:
        fit(params, data, nan_policy=policy, checkpoint_dir=tmp_path, on_chunk=sigterm_at(12))
    assert isinstance(exc.value, KeyboardInterrupt)
    assert exc.value.step == 12 and exc.value.checkpoint_dir == tmp_path
    assert steps_saved(tmp_path) == [12]  # saved by the preemption (checkpoint_every=100)
    assert signal.getsignal(signal.SIGTERM) is before
    starts = []
    res = fit(
        params,
        data,
        nan_policy=policy,
        checkpoint_dir=tmp_path,
        on_chunk=lambda info: starts.append(info.step - len(info.losses)),
    )
    assert starts[0] == 12
    want = scanfit.scan_train(loss, params, 0.05, data, epochs=2)
    np.testing.assert_array_equal(res.losses, want.losses)
    np.testing.assert_array_equal(res.params["w"], want.params["w"])


def test_without_checkpoint_dir_it_stops_and_says_nothing_was_saved(problem):
    params, data = problem
    with pytest.raises(scanfit.Preempted, match=r"at update 8; nothing saved") as exc:
        fit(params, data, on_chunk=sigterm_at(8))
    assert exc.value.step == 8 and exc.value.checkpoint_dir is None


def test_a_sigterm_after_the_last_boundary_raises_as_fit_returns(problem, tmp_path, monkeypatch):
    params, data = problem
    real_on_end = _preempt.Preemption.on_end

    def on_end(self, state, history):  # the signal lands while the run ends
        os.kill(os.getpid(), signal.SIGTERM)
        real_on_end(self, state, history)

    monkeypatch.setattr(_preempt.Preemption, "on_end", on_end)
    with pytest.raises(scanfit.Preempted) as exc:
        fit(params, data, checkpoint_dir=tmp_path)
    assert exc.value.step == 2 * N and steps_saved(tmp_path) == [2 * N]


def test_another_error_wins_over_a_pending_sigterm(problem):
    params, data = problem

    def on_chunk(info):
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("the user's callback failed")

    with pytest.raises(RuntimeError, match="the user's callback failed"):
        fit(params, data, on_chunk=on_chunk)


def test_sig_ign_is_left_alone(problem):
    params, data = problem
    seen = []

    def on_chunk(info):
        seen.append(signal.getsignal(signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the run goes on

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        res = fit(params, data, on_chunk=on_chunk)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIG_IGN] * (2 * N // 4) and res.losses.shape == (2 * N,)


def test_from_another_thread_signals_are_left_alone(problem):
    params, data = problem
    seen, errors = [], []

    def run():
        try:
            fit(params, data, on_chunk=lambda info: seen.append(signal.getsignal(signal.SIGTERM)))
        except Exception as err:  # noqa: BLE001  reported below
            errors.append(err)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors and seen == [before] * (2 * N // 4)


def test_several_processes_stop_where_any_was_signalled(problem, monkeypatch):
    # Without JAX's preemption service: each boundary all-gathers every process's flag.
    params, data = problem
    gathered = []

    def allgather(flag):
        gathered.append(int(flag))
        return np.array([int(flag), len(gathered) == 3])  # "the other process" at boundary 3

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(_preempt.multihost_utils, "process_allgather", allgather)
    with pytest.raises(scanfit.Preempted) as exc:
        fit(params, data)
    assert exc.value.step == 12 and gathered == [0, 0, 0]


def test_under_jax_preemption_service_its_sync_point_decides(problem, monkeypatch):
    params, data = problem
    counts, handlers = [], []

    def reached(count):
        counts.append(count)
        return len(counts) == 4  # the service's sync point: the 4th call (3rd boundary)

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(_preempt.multihost_utils, "reached_preemption_sync_point", reached)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(scanfit.Preempted) as exc:
        fit(params, data, on_chunk=lambda info: handlers.append(signal.getsignal(signal.SIGTERM)))
    # One call on entry, then one per boundary, each count one more than the last; the
    # signal is JAX's: no handler of scanfit's was installed.
    assert exc.value.step == 12 and len(counts) == 4 and np.all(np.diff(counts) == 1)
    assert handlers == [before] * 3


def test_preemption_service_off_falls_back_to_the_flag(problem, monkeypatch):
    params, data = problem

    def service_off(count):
        raise RuntimeError("Preemption sync manager has not been initialized.")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(_preempt.multihost_utils, "reached_preemption_sync_point", service_off)
    with pytest.raises(scanfit.Preempted) as exc:
        fit(params, data, on_chunk=sigterm_at(16))
    assert exc.value.step == 16


def test_preempted_reads_as_one_line():
    err = scanfit.Preempted(40, "ck")
    assert (
        str(err)
        == "preempted (SIGTERM) at update 40; checkpoint saved in 'ck': run again to resume"
    )
    assert isinstance(err, KeyboardInterrupt) and (err.step, err.checkpoint_dir) == (40, "ck")


# Child processes, SIGTERM from outside at random moments.


def start_worker(ckpt, out, *extra):
    return subprocess.Popen(
        [sys.executable, _preempt_worker.__file__, str(ckpt), str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sigterm_after_ready(proc, rng, times):
    """Sends SIGTERM a random moment after each of the first ``times`` runs' first chunk."""
    for _ in range(times):
        line = proc.stdout.readline()
        if line != "ready\n":  # the worker finished (or failed) first
            return
        time.sleep(rng.uniform(0, 0.2))
        proc.send_signal(signal.SIGTERM)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


_REFERENCE = {}


def reference(tmp_path, policy):
    if policy not in _REFERENCE:
        _REFERENCE[policy] = _preempt_worker.train(tmp_path / f"reference-{policy}", policy=policy)
    return _REFERENCE[policy]


def assert_equals_uninterrupted(out, tmp_path, policy):
    want = reference(tmp_path, policy)
    with np.load(out) as got:
        np.testing.assert_array_equal(got["losses"], want.losses)
        np.testing.assert_array_equal(got["w"], want.params["w"])
        np.testing.assert_array_equal(got["b"], want.params["b"])
        return {k: got[k] for k in ("stops", "starts", "restored", "outside")}


def new_process_trial(tmp_path, rng, policy="raise"):
    """SIGTERM at a random moment, then a new process resumes: returns the step it stopped at."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    proc = start_worker(ckpt, out, "--policy", policy)
    sigterm_after_ready(proc, rng, 1)
    code, err = finish(proc)
    if code == 0:  # it finished before the signal
        return None
    assert code == 3 and "Traceback" not in err, err
    with np.load(out) as got:
        stop = int(got["stops"][0])
        assert got["restored"].all() and int(got["outside"]) == 0
    assert max(steps_saved(ckpt)) == stop and stop % _preempt_worker.CHUNK == 0
    proc = start_worker(ckpt, out, "--policy", policy)
    code, err = finish(proc)
    assert code == 0, err
    seen = assert_equals_uninterrupted(out, tmp_path, policy)
    assert list(seen["starts"]) == [stop]  # the rerun resumed where Preempted said
    return stop


def repeated_trial(tmp_path, rng, times, policy="raise"):
    """``times`` SIGTERMs at random moments, each run resumed in the same process at once;
    returns the steps it stopped at."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    proc = start_worker(ckpt, out, "--policy", policy, "--again")
    sigterm_after_ready(proc, rng, times)
    code, err = finish(proc)
    assert code == 0, err
    seen = assert_equals_uninterrupted(out, tmp_path, policy)
    stops, starts = list(seen["stops"]), list(seen["starts"])
    assert starts == [0, *stops]  # each rerun resumed where the last Preempted said
    assert seen["restored"].all()  # fit put the worker's handler back every time
    return stops


@pytest.mark.slow  # two processes: ~10 s here; the slow set also runs it below
def test_sigterm_at_a_random_moment_then_a_new_process_resumes_bitwise(tmp_path):
    rng = random.Random()
    assert new_process_trial(tmp_path, rng) is not None


@pytest.mark.slow
def test_repeated_sigterms_each_resumed_end_bitwise_equal(tmp_path):
    assert len(repeated_trial(tmp_path, random.Random(), 2)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["raise", "ignore"])
def test_many_sigterms_at_random_moments(tmp_path, policy):
    rng = random.Random()
    stops = repeated_trial(tmp_path / "repeated", rng, 12, policy)
    for k in range(3):
        stop = new_process_trial(tmp_path / f"new-{k}", rng, policy)
        stops += [] if stop is None else [stop]
    assert len(stops) >= 10  # with the other policy's, >= 20 trials
