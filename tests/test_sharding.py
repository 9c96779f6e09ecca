"""Sharded params (FSDP): results equal one device, the state is split, nothing replicated.

The test process has 4 fake CPU devices (conftest.py). Equivalence runs in
float64: a sharded run adds the gradient's parts in another order than one
device does, so the two agree to rounding (about 1e-15 relative per update),
well inside the 1e-9 asserted after a dozen Adam updates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import scanfit
from scanfit import _checkpoint, _sharding

SIZES = (32, 128, 64, 16)  # weights of 4096, 8192, 1024 elements; biases stay whole


def init(key, dtype=jnp.float32):
    keys = jax.random.split(key, len(SIZES))
    return [
        {"w": (jax.random.normal(k, (a, b)) / np.sqrt(a)).astype(dtype), "b": jnp.zeros(b, dtype)}
        for k, a, b in zip(keys, SIZES[:-1], SIZES[1:])
    ]


def loss(params, batch):
    x, y = batch
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    out = x @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean((out - y) ** 2)


def problem(seed=0, dtype=np.float32, n=12, batch=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, batch, SIZES[0])).astype(dtype)
    y = rng.normal(size=(n, batch, SIZES[-1])).astype(dtype)
    return init(jax.random.key(seed), dtype), (x, y)


def mesh_1d():
    return Mesh(np.array(jax.devices()), ("data",))


def mesh_2d():
    return Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))


def total_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def assert_split(tree, parts: int = 4):
    """Each of the 4 devices holds at most 1.1/parts of the tree's bytes."""
    held = _sharding.per_device_bytes(tree)
    assert len(held) == 4
    assert max(held.values()) <= 1.1 / parts * total_bytes(tree), (held, total_bytes(tree))


def assert_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=0)


def specs_by_function(path, leaf):
    return P(None, "data") if leaf.ndim == 2 and leaf.shape[1] % 4 == 0 else P()


def spec_tree(params):
    return [{"w": P("data", None), "b": None} for _ in params]


@pytest.fixture(scope="module")
def one_device_float64():
    """The 1-device float64 run the sharded ones are compared with (computed once)."""
    with jax.enable_x64(True):
        params, data = problem(dtype=np.float64)
        res = scanfit.fit(loss, params, optax.adam(1e-2), data, chunk_steps=5, progress=False)
        return jax.tree.map(np.asarray, (res.params, res.losses))


@pytest.mark.parametrize(
    "how",
    [
        "fsdp",
        "placed_no_mesh",
        *(pytest.param(h, marks=pytest.mark.slow) for h in ("tree", "function", "placed")),
        pytest.param("fsdp_2d", marks=pytest.mark.slow),
    ],
)
def test_sharded_fit_equals_one_device_in_float64(x64, one_device_float64, how):
    params, data = problem(dtype=np.float64)
    single_params, single_losses = one_device_float64
    mesh = mesh_2d() if how == "fsdp_2d" else mesh_1d()
    kwargs = {
        "fsdp": dict(mesh=mesh, param_sharding="fsdp"),
        "fsdp_2d": dict(mesh=mesh, param_sharding="fsdp"),
        "tree": dict(mesh=mesh, param_sharding=spec_tree(params)),
        "function": dict(mesh=mesh, param_sharding=specs_by_function),
        "placed": dict(mesh=mesh),
        "placed_no_mesh": {},
    }[how]
    if how.startswith("placed"):
        params = jax.device_put(params, _sharding.param_shardings("fsdp", params, mesh))
    chunks = []
    sharded = scanfit.fit(
        loss, params, optax.adam(1e-2), data, chunk_steps=5, progress=False,
        on_chunk=lambda i: chunks.append(_sharding.per_device_bytes((i.params, i.opt_state))),
        **kwargs,
    )  # fmt: skip
    assert_close(sharded.params, single_params, rtol=1e-9)
    np.testing.assert_allclose(sharded.losses, single_losses, rtol=1e-9)
    parts = 2 if how == "fsdp_2d" else 4  # over "fsdp", replicated over "data" (HSDP)
    assert_split((sharded.params, sharded.opt_state), parts)
    whole = total_bytes((sharded.params, sharded.opt_state))
    assert len(chunks) == 3 and all(max(c.values()) <= 1.1 / parts * whole for c in chunks)
    w = sharded.params[0]["w"].sharding
    assert isinstance(w, NamedSharding) and not w.is_fully_replicated


def test_fsdp_specs_largest_divisible_axis_and_small_leaves_whole():
    mesh = mesh_2d()
    tree = {
        "big": jnp.zeros((6, 512)),  # 512 divides by 2: sharded there
        "odd": jnp.zeros((4096, 3)),  # the largest axis divides
        "none": jnp.zeros((1025,)),  # nothing divides
        "small": jnp.zeros((64,)),  # under MIN_SHARDED_SIZE
    }
    specs = jax.tree.map(lambda s: s.spec, _sharding.param_shardings("fsdp", tree, mesh))
    assert specs == {"big": P(None, "fsdp"), "odd": P("fsdp"), "none": P(), "small": P()}
    specs = jax.tree.map(lambda s: s.spec, _sharding.param_shardings("fsdp", tree, mesh_1d()))
    assert specs["big"] == P(None, "data")


def test_nnx_with_partitioning_keeps_its_annotations(x64):
    nnx = pytest.importorskip("flax.nnx")
    mesh = mesh_1d()

    class MLP(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "data"))
            self.a = nnx.Linear(32, 128, kernel_init=init, param_dtype=jnp.float64, rngs=rngs)
            self.b = nnx.Linear(128, 16, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    def nnx_loss(model, batch):
        return jnp.mean((model(batch[0]) - batch[1]) ** 2)

    _, data = problem(dtype=np.float64)
    with nnx.use_eager_sharding(False):  # annotated, not yet placed: fit places them
        sharded_model, single_model = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
    single = scanfit.fit(nnx_loss, single_model, optax.adam(1e-2), data, progress=False)
    sharded = scanfit.fit(nnx_loss, sharded_model, optax.adam(1e-2), data, mesh=mesh,
                          progress=False)  # fmt: skip
    assert_close(sharded.params, single.params, rtol=1e-9)
    kernel = sharded.params["a"]["kernel"].get_value()
    assert kernel.sharding.spec == P(None, "data")
    mu = sharded.opt_state[0].mu["a"]["kernel"].get_value()
    assert mu.sharding.spec == P(None, "data")


def test_scan_train_and_sweep_keep_a_given_sharding():
    params, data = problem()
    mesh = mesh_1d()
    placed = jax.device_put(params, _sharding.param_shardings("fsdp", params, mesh))
    res = scanfit.scan_train(loss, placed, optax.adam(1e-2), data)
    assert not res.params[0]["w"].sharding.is_fully_replicated
    assert not res.opt_state[0].mu[0]["w"].sharding.is_fully_replicated
    swept = scanfit.sweep(
        loss, placed, lambda lr: optax.adam(lr), data, {"lr": jnp.array([1e-3, 1e-2])}
    )
    assert not swept.params[0]["w"].sharding.is_fully_replicated
    hlo = (
        jax.jit(lambda p: scanfit.scan_train(loss, p, optax.adam(1e-2), data).params)
        .lower(placed)
        .compile()
        .as_text()
    )
    assert "all-gather" in hlo  # the sharded weights are gathered for use, not replicated


def live_bytes() -> dict:
    """Bytes of every live JAX array in the process, per device."""
    held: dict = {}
    for x in jax.live_arrays():
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def test_state_is_split_at_chunk_ends_and_live_bytes_stay_low():
    params, data = problem()
    params = jax.tree.map(np.asarray, params)  # on the host: fit places them
    whole, before = [], live_bytes()

    def on_chunk(info):
        state = (info.params, info.opt_state)
        whole.append(total_bytes(state))
        assert_split(state)
        now = live_bytes()
        grown = max(now[d] - before.get(d, 0) for d in now)  # what this run holds
        assert grown <= 0.75 * whole[-1], (now, before, whole[-1])

    # Donating the carry ("ignore"), one state is live: about 0.28 of the whole here. (The
    # default "raise" dispatches a chunk ahead and holds three: 3/n of the whole.)
    scanfit.fit(
        loss, params, optax.adam(1e-2), data, chunk_steps=4, mesh=mesh_1d(),
        param_sharding="fsdp", on_chunk=on_chunk, progress=False, nan_policy="ignore",
    )  # fmt: skip
    assert len(whole) == 3


def test_stop_and_resume_bitwise_and_still_sharded(tmp_path):
    params, data = problem()
    kwargs = dict(mesh=mesh_1d(), param_sharding="fsdp", chunk_steps=4, progress=False)
    full = scanfit.fit(loss, params, optax.adam(1e-2), data, **kwargs)
    first = scanfit.fit(
        loss, params, optax.adam(1e-2), data, checkpoint_dir=tmp_path,
        on_chunk=lambda info: info.step < 8, **kwargs,
    )  # fmt: skip
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path)] == [4, 8]
    assert int(first.opt_state[0].count) == 8
    resumed = scanfit.fit(loss, params, optax.adam(1e-2), data, checkpoint_dir=tmp_path, **kwargs)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
    assert_split((resumed.params, resumed.opt_state))


def test_digest_is_the_same_for_any_sharding_and_sees_one_bit():
    params, _ = problem()
    host = jax.tree.map(np.asarray, params)
    placed = jax.device_put(params, _sharding.param_shardings("fsdp", params, mesh_1d()))
    two_d = jax.device_put(params, _sharding.param_shardings("fsdp", params, mesh_2d()))
    digests = [_sharding.digest(t) for t in (host, placed, two_d)]
    assert digests[0] == digests[1] == digests[2]
    flipped = jax.tree.map(np.copy, host)
    flipped[1]["w"].view(np.uint32)[3, 5] ^= 1  # one bit of one weight
    assert _sharding.digest(flipped)["digest"] != digests[0]["digest"]
    swapped = jax.tree.map(np.copy, host)
    swapped[1]["w"][[0, 1]] = swapped[1]["w"][[1, 0]]  # the same words, elsewhere
    assert _sharding.digest(swapped)["digest"] != digests[0]["digest"]


def _fit(params, data, **kwargs):
    return scanfit.fit(loss, params, optax.adam(1e-2), data, progress=False, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(mesh="M", param_sharding=[{"w": P()}]),
            ValueError,
            r"param_sharding must be a pytree of PartitionSpec with the structure of params",
        ),
        (
            dict(mesh="M", param_sharding="zero3"),
            ValueError,
            r"param_sharding must be None, 'fsdp', .* got 'zero3'",
        ),
        (
            dict(mesh="M", param_sharding=lambda path, leaf: P("model")),
            ValueError,
            r"param_sharding\[0\]\['b'\] is P\('model',\): the mesh has no axis "
            r"'model'",
        ),
        (
            dict(mesh="M", param_sharding=lambda path, leaf: P("data"), odd=True),
            ValueError,
            r"param_sharding\[2\]\['odd'\] is P\('data',\): dimension 0 of the leaf's shape "
            r"\(6,\) does not divide into the 4 parts of mesh axes \('data',\)",
        ),
        (
            dict(mesh="M", param_sharding=lambda path, leaf: "data"),
            TypeError,
            r"param_sharding\[0\]\['b'\] must be a jax.sharding.PartitionSpec, got 'data'",
        ),
        (
            dict(param_sharding="fsdp"),
            ValueError,
            r"param_sharding needs a mesh to shard over, got 'fsdp' of type str without one: pass "
            r"mesh=",
        ),
    ],
)
def test_bad_param_sharding_is_a_clear_error(kwargs, error, match):
    params, data = problem()
    if kwargs.pop("odd", False):
        params[-1]["odd"] = jnp.zeros(6)  # unused by the loss; 6 rows do not split in 4
    if kwargs.get("mesh") == "M":
        kwargs["mesh"] = mesh_1d()
    with pytest.raises(error, match=match):
        _fit(params, data, **kwargs)


def test_a_mesh_with_fsdp_only_shards_batch_and_params_over_it():
    params, data = problem()
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    res = _fit(params, data, mesh=mesh, param_sharding="fsdp")
    assert res.params[0]["w"].sharding.spec == P(None, "fsdp")
    _, odd = problem(batch=6)
    with pytest.raises(ValueError, match=r"must divide by the 4 devices of the 'fsdp' axis"):
        _fit(params, odd, mesh=mesh)


def test_fsdp_example_splits_the_state_and_learns():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "fsdp.py"
    spec = importlib.util.spec_from_file_location("scanfit_examples_fsdp", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(quick=True)  # on this process's 4 devices (8 when run as a script)
    assert out["max_bytes_per_device"] <= 1.1 / out["devices"] * out["state_bytes"]
    assert out["final_loss"] < 0.5 * out["first_loss"]


def _two_processes(out, stop_at: int) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from test_parallel import _free_port, _wait

    port = _free_port()
    worker = Path(__file__).parent / "_shard_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(pid), str(port), str(out), str(stop_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for pid in (0, 1)
    ]
    for code, text in _wait(procs):
        assert code == 0, text[-3000:]


@pytest.mark.slow
def test_two_processes_sharded_stop_and_resume_bitwise(tmp_path):
    """Each process writes only its shards; the resumed run equals the uninterrupted one."""
    _two_processes(tmp_path / "full", 0)
    _two_processes(tmp_path / "part", 8)
    ckpt = tmp_path / "part" / "ckpt"
    assert [s for s, _ in _checkpoint.list_checkpoints(ckpt)] == [4, 8]
    for process in (0, 1):
        _, shards = _checkpoint.read(_checkpoint.shards_path(ckpt, 8, process))
        rows = [k for k in shards if k.startswith("params[1]['w']@")]
        assert len(rows) == 2  # its 2 devices' quarters of the (128, 64) weight, no more
    _, main = _checkpoint.read(_checkpoint.path_for(ckpt, 8))
    assert "params[1]['w']" not in main and "params[1]['b']" in main  # small leaves whole
    _two_processes(tmp_path / "part", 0)
    with np.load(tmp_path / "full" / "result.npz") as full:
        with np.load(tmp_path / "part" / "result.npz") as resumed:
            assert sorted(full) == sorted(resumed)
            for name in full:
                np.testing.assert_array_equal(resumed[name], full[name])


_KILLED_RUN = """
import os, signal, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
import numpy as np, optax
sys.path.insert(0, {tests!r})
import scanfit
from test_sharding import loss, mesh_1d, problem
out, kill_at = sys.argv[1], int(sys.argv[2])

def on_chunk(info):  # runs before the checkpointer sees the chunk: the last save is older
    if info.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

params, data = problem()
res = scanfit.fit(loss, params, optax.adam(1e-2), data, chunk_steps=4, progress=False,
                  mesh=mesh_1d(), param_sharding="fsdp", checkpoint_dir=out + "/ckpt",
                  on_chunk=on_chunk)
assert not res.params[0]["w"].sharding.is_fully_replicated
assert not res.opt_state[0].mu[0]["w"].sharding.is_fully_replicated
np.savez(out + "/result.npz", losses=res.losses,
         **{{f"p{{i}}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(res.params))}})
"""


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_and_still_sharded(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    code = _KILLED_RUN.format(tests=str(Path(__file__).parent))
    run = [sys.executable, "-c", code, str(tmp_path)]
    killed = subprocess.run([*run, "8"], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [s for s, _ in _checkpoint.list_checkpoints(tmp_path / "ckpt")] == [4]
    resumed = subprocess.run([*run, "0"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    params, data = problem()
    full = _fit(params, data, chunk_steps=4, mesh=mesh_1d(), param_sharding="fsdp")
    with np.load(tmp_path / "result.npz") as got:
        np.testing.assert_array_equal(got["losses"], full.losses)
        for i, a in enumerate(jax.tree.leaves(full.params)):
            np.testing.assert_array_equal(got[f"p{i}"], np.asarray(a))


def test_a_mesh_that_does_not_split_the_batch_over_the_processes_is_a_clear_error(monkeypatch):
    from scanfit import _parallel

    params, data = problem()
    monkeypatch.setattr(_parallel, "_processes", lambda mesh: 2)  # as on 2 hosts
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    match = (
        r"mesh has axes \{'data': 1\}: the 'data' axis split the batch into 1 part\(s\), but "
        r"each of the 2 processes needs an equal share"
    )
    with pytest.raises(ValueError, match=match):
        _fit(params, data, mesh=mesh)
