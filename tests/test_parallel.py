"""Data parallelism on 4 fake CPU devices (conftest) and two real processes over 127.0.0.1."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _parallel_problem import problem
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import scanfit
from scanfit import _checkpoint

# Sharding splits each batch mean into per-device partial sums and an all-reduce,
# so float32 results differ from one device's by rounding only: a few ulps per
# update, compounded over 48 updates of adam; 2e-5 relative covers it with room.
RTOL = 2e-5


def single_and_sharded_data(mesh):
    loss, params, data = problem()
    sharded = jax.device_put(data, NamedSharding(mesh, PartitionSpec(None, "data")))
    return loss, params, data, sharded


def assert_close(a, b, rtol=RTOL):
    np.testing.assert_allclose(a.losses, b.losses, rtol=rtol)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6), a.params, b.params
    )


def adam_fit(loss, params, data, **kwargs):
    """The run every parallel test compares: adam, 2 shuffled epochs, chunks of 10."""
    return scanfit.fit(
        loss,
        params,
        optax.adam(0.01),
        data,
        epochs=2,
        key=jax.random.key(0),
        chunk_steps=10,
        progress=False,
        **kwargs,
    )


@pytest.fixture
def mesh4():
    assert len(jax.devices()) >= 4, "conftest should give 4 CPU devices"
    return Mesh(np.array(jax.devices()[:4]), ("data",))


def test_scan_train_on_sharded_data_equals_one_device(mesh4):
    loss, params, data, sharded = single_and_sharded_data(mesh4)
    one = scanfit.scan_train(loss, params, optax.adam(0.01), data, epochs=2, key=jax.random.key(0))
    many = scanfit.scan_train(
        loss, params, optax.adam(0.01), sharded, epochs=2, key=jax.random.key(0)
    )
    assert_close(many, one)


@pytest.mark.parametrize("host_data", [False, True])
def test_fit_on_four_devices_equals_one_device(host_data):
    loss, params, data = problem()
    if not host_data:
        data = jax.tree.map(jnp.asarray, data)
    one = adam_fit(loss, params, data)
    many = adam_fit(loss, params, data, devices=4)
    assert_close(many, one)
    w = many.params["w"]
    assert len(w.sharding.device_set) == 4 and w.sharding.is_fully_replicated


def test_fit_shards_each_chunk_over_the_data_axis(monkeypatch):
    from scanfit import _parallel

    loss, params, data = problem()
    seen = []
    real = _parallel.put_batches
    monkeypatch.setattr(
        _parallel,
        "put_batches",
        lambda t, m, batch_axis: (
            seen.append([a.sharding for a in jax.tree.leaves(real(t, m, batch_axis))])
            or real(t, m, batch_axis)
        ),
    )
    scanfit.fit(loss, params, 0.01, data, chunk_steps=12, devices=4, progress=False)
    assert len(seen) == 2
    for sharding in seen[0]:
        assert sharding.spec == PartitionSpec(None, "data") and sharding.num_devices == 4


def test_sharded_resume_equals_uninterrupted_sharded_run(tmp_path):
    loss, params, data = problem()

    def stop_at_12(info):
        return info.step < 12

    kwargs = dict(epochs=2, key=jax.random.key(1), chunk_steps=6, devices=4, progress=False)
    full = scanfit.fit(loss, params, optax.adam(0.01), data, **kwargs)
    scanfit.fit(
        loss, params, optax.adam(0.01), data, checkpoint_dir=tmp_path, on_chunk=stop_at_12, **kwargs
    )
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path)][-1] == 12
    resumed = scanfit.fit(loss, params, optax.adam(0.01), data, checkpoint_dir=tmp_path, **kwargs)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    np.testing.assert_array_equal(resumed.params["w"], full.params["w"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(devices=3),
            r"data\[0\] has shape \(24, 16, 6\): its batch axis \(axis 1\) must "
            r"divide by the 3 devices of the 'data' axis on this process",
        ),
        (dict(devices=64), r"devices must be an integer from 1 to the 4 local devices, got 64"),
        (dict(devices=0), r"devices must be an integer from 1 to the 4 local devices, got 0"),
        (dict(mesh="data"), r"mesh must be a jax.sharding.Mesh with a 'data' axis, got 'data'"),
        (
            dict(mesh=Mesh(np.array(jax.devices()[:2]), ("batch",))),
            r"mesh must be a jax.sharding.Mesh with a 'data' axis, .* with axes \('batch',\)",
        ),
        (
            dict(devices=2, mesh=Mesh(np.array(jax.devices()[:2]), ("data",))),
            r"pass mesh= or devices=, not both",
        ),
    ],
)
def test_bad_parallel_settings_are_clear_errors(kwargs, match):
    loss, params, data = problem()
    with pytest.raises(ValueError, match=match):
        scanfit.fit(loss, params, 0.01, data, progress=False, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(worker, *args):
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(worker), str(pid), str(port), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]


def _wait(procs):
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def test_two_processes_train_together_like_one(tmp_path):
    worker = Path(__file__).parent / "_dist_worker.py"
    for code, out in _wait(_pair(worker, tmp_path)):
        assert code == 0, out[-3000:]
    loss, params, data = problem()
    one = adam_fit(loss, params, data)
    with np.load(tmp_path / "result.npz") as got:
        np.testing.assert_allclose(got["losses"], one.losses, rtol=RTOL)
        np.testing.assert_allclose(got["w"], one.params["w"], rtol=RTOL, atol=1e-6)
    # Process 0 alone wrote the checkpoints.
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path / "ckpt")][-1] == 48


def test_model_state_on_two_devices_equals_one_device():
    """Batch statistics over the global batch and dropout masks as one device draws them."""
    from _stateful_problem import problem as stateful_problem

    loss, params, state, data = stateful_problem()
    kwargs = dict(model_state=state, rng=jax.random.key(3))
    one = adam_fit(loss, params, data, **kwargs)
    two = adam_fit(loss, params, data, devices=2, **kwargs)
    assert_close(two, one)
    np.testing.assert_allclose(two.model_state["mean"], one.model_state["mean"], rtol=RTOL)
    assert int(two.model_state["count"]) == int(one.model_state["count"]) == 48


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["service", "allgather"])
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, mode):
    worker = Path(__file__).parent / "_dist_preempt_worker.py"
    procs = _pair(worker, tmp_path, mode)
    seen = []  # JAX and gloo log to the same pipe
    while not seen or seen[-1] not in ("ready\n", ""):
        seen.append(procs[0].stdout.readline())
    assert seen[-1] == "ready\n", "".join(seen)
    time.sleep(0.3)
    procs[0].send_signal(signal.SIGTERM)  # the scheduler reclaims process 0's machine
    for code, out in _wait(procs):
        assert code == 3, out[-3000:]
    stops = [(tmp_path / f"stop-{pid}").read_text().split() for pid in (0, 1)]
    step = int(stops[0][0])
    assert stops[0] == stops[1] and 0 < step < 240  # the same step on both
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path / "ckpt")][-1] == step
    procs = _pair(worker, tmp_path, mode)  # both resume there and run to the end
    for code, out in _wait(procs):
        assert code == 0, out[-3000:]
    loss, params, data = problem()
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded = jax.device_put(data, NamedSharding(mesh, PartitionSpec(None, "data")))
    one = scanfit.fit(
        loss, params, optax.adam(0.01), sharded, epochs=10, key=jax.random.key(0),
        chunk_steps=4, mesh=mesh, progress=False,
    )  # fmt: skip
    with np.load(tmp_path / "result-0.npz") as got:
        assert int(got["start"]) == step
        np.testing.assert_allclose(got["losses"], one.losses, rtol=RTOL)
        np.testing.assert_allclose(got["w"], one.params["w"].addressable_data(0), rtol=RTOL)
