"""fit benchmark: scanfit.fit (compiled chunks driven from the host) against scan_train.

    python benchmarks/fit.py [--quick] [--out benchmarks/results]

Workload: a 64-64-10 MLP (64 features, one tanh hidden layer of 64, 10 classes), softmax
cross-entropy averaged over a batch of 32, optax.adam(1e-3), float32, one update per
microbatch, N microbatches of synthetic data labelled by a fixed random linear teacher.

Compared, in one process, interleaved (A B C ... A B C ...) over several repetitions after
one untimed call each (so no compilation is timed), medians reported:

* ``scan_train`` on in-memory JAX arrays (the baseline);
* ``fit`` on the same arrays with the default divergence guard (``nan_policy="raise"``),
  whole run in one chunk and in chunks of 1000, and with ``nan_policy="ignore"`` (donation);
* ``fit`` streaming from ``np.load(..., mmap_mode="r")`` memmaps at several chunk sizes;
* ``fit`` with ``checkpoint_every=1000``;
* the common case of a shuffled order (``key=jax.random.key(0)``) for the main pairs.

Every fit variant's loss history and final params are checked bitwise equal to the
matching scan_train run before anything is timed. Separately, one checkpoint write
(``CheckpointDir.save``, checksums, write and pruning, of the MLP params, adam state and an
N-float loss history) is
timed over ~50 saves, with a breakdown (device to host, npz encoding, write + fsync), and the
host-side cost of streaming (memmap gather, device_put) is timed per chunk.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported
from _common import (  # noqa: E402
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine,
    write_json,
)
from loop import BATCH, CLASSES, FEATURES, HIDDEN, CheckFailed, init_params, make_data, make_loss  # noqa: E402, E501

import scanfit  # noqa: E402
from scanfit import _checkpoint_dir, _fingerprint  # noqa: E402

LR = 1e-3
CKPT_EVERY = 1000
FULL = {"n": 20_000, "reps": 7, "mmap_chunks": (100, 1000, 10_000), "saves": 50, "gathers": 5}
QUICK = {"n": 1_000, "reps": 3, "mmap_chunks": (100, 1000), "saves": 20, "gathers": 3}
GOAL_FIT_RATIO = 1.05  # fit in memory (default guard) time / scan_train time
GOAL_STREAM_RATIO = 0.9  # best streamed throughput / in-memory fit throughput
GOAL_CKPT_MS = 10.0  # one checkpoint write of the MLP
RTOL = 1e-5  # diagnostic variants (not scanfit) are checked to this, not bitwise
DIAGNOSTIC = {"hand"}


# The workload is loop.py's: the same data, init and loss, so the two suites compare.
loss_fn = make_loss()


# ---------------------------------------------------------------------------- variants


def make_hand_scan(optimizer) -> Callable:
    """Diagnostic floor: the loop by hand, jit(lax.scan) over the (N, ...) data with carry
    (params, opt_state); no guard, no counters, no outer epoch scan."""
    grad_fn = jax.value_and_grad(loss_fn)

    def body(carry, batch):
        params, opt_state = carry
        loss, grads = grad_fn(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def train(params, data):
        (params, opt_state), losses = lax.scan(body, (params, optimizer.init(params)), data)
        zero = jnp.int32(0)
        return scanfit.TrainResult(params, opt_state, losses, None, zero, zero - 1)

    return train


def scan_train_copies_data(n: int) -> bool:
    """Whether scan_train's compiled program (key=None) copies the whole dataset."""
    opt = optax.adam(LR)
    spec = (
        jax.ShapeDtypeStruct((n, BATCH, FEATURES), jnp.float32),
        jax.ShapeDtypeStruct((n, BATCH), jnp.int32),
    )
    f = jax.jit(lambda p, d: scanfit.scan_train(loss_fn, p, opt, d))
    text = f.lower(init_params(), spec).compile().as_text()
    return bool(re.search(rf"= f32\[{n},(1,)?{BATCH},{FEATURES}\]\S* copy\(", text))


# ---------------------------------------------------------------------------- variants


def variants(cfg: dict, mem, mm, ckpt_dir: Path) -> dict[str, tuple[str, str, Callable]]:
    """name -> (label, reference scan_train variant, thunk returning a TrainResult)."""
    n = cfg["n"]
    opt = optax.adam(LR)
    params = init_params()
    key = jax.random.key(0)

    def st(data, k=None):
        return lambda: scanfit.scan_train(loss_fn, params, opt, data, key=k)

    def fit(data, k=None, **kw):
        return lambda: scanfit.fit(loss_fn, params, opt, data, key=k, progress=False, **kw)

    out = {
        "scan": ("scan_train, in memory", "scan", st(mem)),
        "fit": ("fit, in memory, raise, chunk=None", "scan", fit(mem)),
        "fit_c100": ("fit, in memory, raise, chunk=100", "scan", fit(mem, chunk_steps=100)),
        "fit_c1000": ("fit, in memory, raise, chunk=1000", "scan", fit(mem, chunk_steps=1000)),
        "fit_ignore": ("fit, in memory, ignore, chunk=None", "scan", fit(mem, nan_policy="ignore")),
        "fit_ignore_c1000": (
            "fit, in memory, ignore, chunk=1000",
            "scan",
            fit(mem, nan_policy="ignore", chunk_steps=1000),
        ),
    }
    for c in cfg["mmap_chunks"]:
        out[f"mmap_c{c}"] = (f"fit, memmap, raise, chunk={c}", "scan", fit(mm, chunk_steps=c))
    out["fit_ckpt"] = (
        f"fit, in memory, raise, checkpoint_every={CKPT_EVERY}",
        "scan",
        fit(mem, checkpoint_dir=ckpt_dir, checkpoint_every=CKPT_EVERY, resume=False),
    )
    out["scan_key"] = ("scan_train, in memory, shuffled", "scan_key", st(mem, key))
    out["fit_key"] = ("fit, in memory, raise, chunk=None, shuffled", "scan_key", fit(mem, key))
    out["fit_key_c1000"] = (
        "fit, in memory, raise, chunk=1000, shuffled",
        "scan_key",
        fit(mem, key, chunk_steps=1000),
    )
    out["mmap_key_c1000"] = (
        "fit, memmap, raise, chunk=1000, shuffled",
        "scan_key",
        fit(mm, key, chunk_steps=1000),
    )
    hand = make_hand_scan(opt)
    out["hand"] = ("diag: hand jit(lax.scan), no guard", "scan", lambda: hand(params, mem))
    assert n >= 1000
    return out


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def verify(vs: dict) -> tuple[dict, dict]:
    """Runs every variant once (the untimed warm-up, compiles included); checks bitwise
    equality of losses and final params against the matching scan_train run."""
    results, first_call = {}, {}
    for name, (_, _, thunk) in vs.items():
        first_call[name], results[name] = timed(thunk)
    checks = {}
    for name, (_, ref, _) in vs.items():
        a, b = results[name], results[ref]
        if name in DIAGNOSTIC:  # not scanfit: close, not necessarily bitwise
            la, lb = np.asarray(a.losses), np.asarray(b.losses)
            rel = float(np.max(np.abs(la - lb) / np.maximum(np.abs(lb), 1e-12)))
            checks[name] = {"losses_equal": bool(np.array_equal(la, lb)), "max_rel_diff": rel}
            if not rel <= RTOL:
                raise CheckFailed(f"{name}: losses differ from {ref} by {rel:.2e} > {RTOL:g}")
            continue
        same_losses = np.array_equal(np.asarray(a.losses), np.asarray(b.losses))
        same_params = all(
            np.array_equal(np.asarray(p), np.asarray(q))
            for p, q in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))
        )
        checks[name] = {"losses_equal": bool(same_losses), "params_equal": bool(same_params)}
        if not (same_losses and same_params):
            diff = np.max(np.abs(np.asarray(a.losses) - np.asarray(b.losses)))
            raise CheckFailed(
                f"{name} differs from {ref}: losses equal {same_losses}, params equal "
                f"{same_params}, max |loss diff| {diff:.3e}"
            )
    losses = np.asarray(results["scan"].losses)
    if not losses[-100:].mean() < 0.5 * losses[:10].mean():
        raise CheckFailed(f"loss did not fall: {losses[:10].mean():.4f} -> {losses[-100:].mean()}")
    return checks, {"first_call_s": first_call, "results": results}


def interleaved(vs: dict, reps: int, between: Callable[[], None]) -> dict[str, list[float]]:
    """reps rounds of A B C ...; ``between()`` runs after each round (the checkpoint saves,
    so that they see the same machine load as the fit runs)."""
    times = {name: [] for name in vs}
    for _ in range(reps):
        for name, (_, _, thunk) in vs.items():
            times[name].append(timed(thunk)[0])
        between()
    return times


# ------------------------------------------------------------------- checkpoint timing


class CheckpointTimer:
    """One checkpoint write as fit makes it, timed alone, and its parts.

    The trees are those fit saves: params, adam state, counters and an N-float loss
    history (a device array, as fit passes it); the metadata a fingerprint-sized dict.
    """

    def __init__(self, result, n: int, directory: Path):
        losses = jax.device_put(np.linspace(2.3, 0.1, n, dtype=np.float32))
        self.trees = {
            "params": result.params,
            "opt_state": result.opt_state,
            "counters": {"skipped": result.skipped, "first_nonfinite": result.first_nonfinite},
            "losses": losses,
            "aux": None,
        }
        self.meta = {
            "fingerprint": {
                "params": _fingerprint.tree_digest(result.params),
                "opt_state": _fingerprint.tree_digest(result.opt_state),
                "accumulate": 1,
                "key": None,
            },
            "epoch": 0,
            "scanfit_version": scanfit.__version__,
        }
        jax.block_until_ready(self.trees)
        self.directory = _checkpoint_dir.CheckpointDir(directory, keep=3)
        self.step = 0
        self.path = self._save()  # untimed: the directory, first allocations
        self.times: list[float] = []

    def _save(self) -> Path:
        """One whole save (started, then waited for): what a save costs the host."""
        self.step += 1
        self.directory.start_save(self.step, lambda: self.trees, self.meta)
        return self.directory.wait()

    def saves(self, count: int) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            self.path = self._save()
            self.times.append(time.perf_counter() - t0)

    def summary(self, count: int) -> dict:
        """The saves so far, and ``count`` more writes split into their parts."""
        to_host, encode, write = [], [], []
        scratch = self.directory.path / "scratch.npz"
        for _ in range(count):
            t0 = time.perf_counter()
            arrays = {
                f"{k}{i}": np.asarray(x)
                for k, t in self.trees.items()
                for i, x in enumerate(jax.tree.leaves(t))
            }
            t1 = time.perf_counter()
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            t2 = time.perf_counter()
            with open(scratch, "wb") as f:
                f.write(buf.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            t3 = time.perf_counter()
            to_host.append(t1 - t0)
            encode.append(t2 - t1)
            write.append(t3 - t2)
        scratch.unlink()
        med = lambda v: 1e3 * statistics.median(v)  # noqa: E731
        return {
            "save_ms": med(self.times),
            "save_min_ms": 1e3 * min(self.times),
            "save_max_ms": 1e3 * max(self.times),
            "saves": len(self.times),
            "file_bytes": self.path.stat().st_size,
            "parts_ms": {
                "to_host": med(to_host),
                "npz_encode": med(encode),
                "write_fsync": med(write),
            },
        }


# -------------------------------------------------------------- streaming host costs


def streaming_costs(mm, n: int, chunks, reps: int) -> dict:
    """Per chunk: the memmap gather fit does (a slice, reshape to (C, 1, ...)), the
    device_put, and a shuffled gather (index array, rows read one by one)."""
    x, y = mm
    order = np.random.default_rng(0).permutation(n)
    out = {}
    for c in chunks:
        gather, put, shuffled = [], [], []
        for r in range(reps):
            lo = (r * c) % max(n - c + 1, 1)
            t0 = time.perf_counter()
            chunk = tuple(a[lo : lo + c].reshape(c, 1, *a.shape[1:]) for a in (x, y))
            t1 = time.perf_counter()
            jax.block_until_ready(jax.device_put(chunk))
            t2 = time.perf_counter()
            idx = order[lo : lo + c]
            _ = tuple(a[idx] for a in (x, y))
            t3 = time.perf_counter()
            gather.append(t1 - t0)
            put.append(t2 - t1)
            shuffled.append(t3 - t2)
        out[c] = {
            "gather_us_per_update": 1e6 * statistics.median(gather) / c,
            "device_put_us_per_update": 1e6 * statistics.median(put) / c,
            "shuffled_gather_us_per_update": 1e6 * statistics.median(shuffled) / c,
        }
    return out


# ------------------------------------------------------------- host work per call

HOST_N = 10  # microbatches: so few that the compiled loop is short and host work shows


def host_work(reps: int, epochs=(1, 50)) -> dict:
    """fit - scan_train per call on a tiny shuffled run: the host work fit adds around the
    compiled loop (checks, initial carry, epoch orders, fetching results)."""
    x, y = jax.device_put(make_data(HOST_N))
    params, opt, key = init_params(), optax.adam(LR), jax.random.key(0)
    out = {}
    for e in epochs:
        fns = {
            "fit": lambda e=e: (
                scanfit.fit(loss_fn, params, opt, (x, y), epochs=e, key=key, progress=False).losses
            ),
            "scan_train": lambda e=e: (
                scanfit.scan_train(loss_fn, params, opt, (x, y), epochs=e, key=key).losses
            ),
        }
        times = {name: [] for name in fns}
        for fn in fns.values():
            jax.block_until_ready(fn())
        for _ in range(10 * reps):
            for name, fn in fns.items():
                times[name].append(timed(fn)[0])
        med = {name: statistics.median(t) for name, t in times.items()}
        out[e] = {f"{k}_ms": 1e3 * v for k, v in med.items()}
        out[e]["fit_minus_scan_train_ms"] = 1e3 * (med["fit"] - med["scan_train"])
    return out


# ---------------------------------------------------------------------------- report


def table(rows: dict, n: int) -> str:
    body = []
    for r in rows.values():
        body.append(
            [
                r["label"],
                f"{1e3 * r['median_s']:.0f}",
                f"{1e3 * r['min_s']:.0f}",
                f"{n / r['median_s']:,.0f}",
                f"{r['ratio_to_scan']:.3f}",
            ]
        )
    return format_table(["variant", "median ms", "min ms", "updates/s", "time / scan_train"], body)


def goals(rows: dict, ckpt: dict, chunks) -> tuple[list[str], dict]:
    t = {name: r["median_s"] for name, r in rows.items()}
    best = min(chunks, key=lambda c: t[f"mmap_c{c}"])
    specs = [
        (
            "fit in memory (raise, chunk=None) / scan_train time",
            t["fit"] / t["scan"],
            "<=",
            GOAL_FIT_RATIO,
        ),
        (
            "fit in memory (raise, chunk=1000) / scan_train time",
            t["fit_c1000"] / t["scan"],
            "<=",
            GOAL_FIT_RATIO,
        ),
        (
            "shuffled: fit in memory (raise, chunk=None) / scan_train time",
            t["fit_key"] / t["scan_key"],
            "<=",
            GOAL_FIT_RATIO,
        ),
        (
            f"streamed throughput (memmap, best chunk={best}) / in-memory fit throughput",
            t["fit"] / t[f"mmap_c{best}"],
            ">=",
            GOAL_STREAM_RATIO,
        ),
        ("checkpoint save of the MLP (ms, median)", ckpt["save_ms"], "<=", GOAL_CKPT_MS),
    ]
    lines, values = [], {}
    for what, v, op, target in specs:
        ok = v <= target if op == "<=" else v >= target
        lines.append(f"{'PASS' if ok else 'MISS'}  {what} {op} {target:g}: got {v:.3f}")
        values[what] = v
    return lines, {"best_stream_chunk": best, "values": values}


def breakdown(
    rows: dict, n: int, ckpt: dict, stream: dict, chunks, copies: bool
) -> tuple[str, dict]:
    """Where fit's time over scan_train goes, from the measured medians."""
    t = {name: r["median_s"] for name, r in rows.items()}
    us = lambda s: 1e6 * s / n  # noqa: E731  seconds over the run -> us per update
    ms = lambda s: f"{1e3 * s:+.1f} ms"  # noqa: E731
    boundary = {  # extra cost per chunk boundary, against the one-chunk run
        c: (t[f"fit_c{c}"] - t["fit"]) / (n // c - 1) for c in (100, 1000) if n // c > 1
    }
    n_saves = n // CKPT_EVERY
    per_save = (t["fit_ckpt"] - t["fit_c1000"]) / n_saves
    same_chunk = {c: t[f"fit_c{c}"] / t[f"mmap_c{c}"] for c in chunks if f"fit_c{c}" in t}
    info = {
        "scan_us_per_update": us(t["scan"]),
        "scan_train_copies_whole_data": copies,
        "fit_minus_scan_ms": 1e3 * (t["fit"] - t["scan"]),
        "hand_over_scan": t["hand"] / t["scan"],
        "fit_over_hand": t["fit"] / t["hand"],
        "raise_minus_ignore_ms": 1e3 * (t["fit"] - t["fit_ignore"]),
        "per_boundary_ms": {c: 1e3 * v for c, v in boundary.items()},
        "stream_over_memory_same_chunk": same_chunk,
        "per_save_in_fit_ms": 1e3 * per_save,
        "ckpt_overhead_vs_chunk1000": t["fit_ckpt"] / t["fit_c1000"],
        "ckpt_overhead_vs_no_ckpt": t["fit_ckpt"] / t["fit"],
        "fit_key_minus_scan_key_ms": 1e3 * (t["fit_key"] - t["scan_key"]),
        "stream_host": stream,
    }
    lines = [
        f"\nper update: scan_train {us(t['scan']):.1f} us, fit {us(t['fit']):.1f} us, hand scan "
        f"{us(t['hand']):.1f} us. fit - scan_train {ms(t['fit'] - t['scan'])}; fit / hand "
        f"{t['fit'] / t['hand']:.3f}; raise - ignore (guard, no donation) "
        f"{ms(t['fit'] - t['fit_ignore'])}; shuffled fit - scan_train "
        f"{ms(t['fit_key'] - t['scan_key'])}.",
        "scan_train's compiled program (key=None) "
        + (
            "copies the whole dataset before its loop (a loop invariant of the outer epoch "
            "scan): that copy is scan_train's, not fit's."
            if copies
            else "makes no copy of the whole dataset."
        ),
        "chunk boundaries (vs one chunk): "
        + ", ".join(f"chunk={c}: {1e3 * v:+.2f} ms each" for c, v in boundary.items())
        + ".",
        "streamed / in-memory throughput at the same chunk size: "
        + ", ".join(f"chunk={c}: {v:.3f}" for c, v in same_chunk.items())
        + ". Host side per update (memmap in page cache): "
        + "; ".join(
            f"chunk={c}: gather {s['gather_us_per_update']:.2f} us, device_put "
            f"{s['device_put_us_per_update']:.2f} us, shuffled gather "
            f"{s['shuffled_gather_us_per_update']:.2f} us"
            for c, s in stream.items()
        )
        + ".",
        f"checkpoints: checkpoint_every={CKPT_EVERY} ({n_saves} saves) / no checkpoints: "
        f"{info['ckpt_overhead_vs_no_ckpt']:.3f} (vs chunk=None), "
        f"{info['ckpt_overhead_vs_chunk1000']:.3f} (vs chunk=1000, same chunking), "
        f"{1e3 * per_save:+.2f} ms per save inside fit. One save alone {ckpt['save_ms']:.2f} ms "
        f"median (min {ckpt['save_min_ms']:.2f}, {ckpt['file_bytes'] / 1024:.0f} KiB): to host "
        f"{ckpt['parts_ms']['to_host']:.2f}, npz encode {ckpt['parts_ms']['npz_encode']:.2f}, "
        f"write+fsync {ckpt['parts_ms']['write_fsync']:.2f} ms.",
    ]
    return "\n".join(lines), info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=1000, fewer repeats (<30 s)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for fit.json")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    n = cfg["n"]
    t_start = time.perf_counter()

    info = machine()
    print(f"fit benchmark{' (quick)' if args.quick else ''}: {describe_machine(info)}")
    print(
        f"  MLP {FEATURES}-{HIDDEN}-{CLASSES} (tanh), batch {BATCH}, adam({LR:g}), float32, "
        f"{n} updates; {cfg['reps']} interleaved repetitions after one untimed call",
        flush=True,
    )
    x, y = make_data(n)
    with tempfile.TemporaryDirectory(prefix="scanfit-bench-fit-") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "x.npy", x)
        np.save(tmp / "y.npy", y)
        mm = (np.load(tmp / "x.npy", mmap_mode="r"), np.load(tmp / "y.npy", mmap_mode="r"))
        mem = jax.block_until_ready(jax.device_put((x, y)))
        vs = variants(cfg, mem, mm, tmp / "ckpt-fit")
        try:
            checks, warm = verify(vs)
        except CheckFailed as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
        exact = len(checks) - 2 - len(DIAGNOSTIC)
        print(f"  checked bitwise equal to scan_train: {exact} fit variants", flush=True)
        saver = CheckpointTimer(warm["results"]["scan"], n, tmp / "ckpt-alone")
        per_round = -(-cfg["saves"] // cfg["reps"])
        times = interleaved(vs, cfg["reps"], lambda: saver.saves(per_round))
        ckpt = saver.summary(cfg["saves"])
        saver.directory.close()
        stream = streaming_costs(mm, n, cfg["mmap_chunks"], cfg["gathers"])
        del mm
    host = host_work(cfg["reps"])
    copies = scan_train_copies_data(n)

    rows = {}
    for name, (label, _, _) in vs.items():
        med = statistics.median(times[name])
        rows[name] = {
            "label": label,
            "median_s": med,
            "min_s": min(times[name]),
            "all_s": times[name],
            "first_call_s": warm["first_call_s"][name],
            "updates_per_s": n / med,
        }
    for name, r in rows.items():
        ref = "scan_key" if vs[name][1] == "scan_key" else "scan"
        r["ratio_to_scan"] = r["median_s"] / rows[ref]["median_s"]

    print()
    print(table(rows, n))
    print(
        f"\nmedian / min of {cfg['reps']} interleaved calls after an untimed one; "
        "'time / scan_train' against the unshuffled scan_train, shuffled rows against the "
        "shuffled one.\nEvery fit variant's losses and final params are bitwise equal to its "
        "scan_train run."
    )
    text, bd = breakdown(rows, n, ckpt, stream, cfg["mmap_chunks"], copies)
    print(text)
    print(
        f"host work per call of fit (fit - scan_train, {HOST_N} microbatches, shuffled): "
        + ", ".join(f"epochs={e}: {h['fit_minus_scan_train_ms']:+.2f} ms" for e, h in host.items())
        + "."
    )
    goal_lines, goal_info = goals(rows, ckpt, cfg["mmap_chunks"])
    print()
    print("\n".join(goal_lines))
    if args.quick:
        print(
            f"(quick: N={n}, runs of ~{1e3 * rows['scan']['median_s']:.0f} ms, where fit's fixed "
            "per-call host work (see 'host work per call' above)"
            " weighs; the goals are meant for the full run.)"
        )
    load_end = round(os.getloadavg()[0], 2)
    payload = {
        "benchmark": "fit",
        "quick": args.quick,
        "machine": info,
        "loadavg_1min_end": load_end,
        "note": "2-core machine; other processes (e.g. a test run) may share it, see loadavg",
        "workload": {
            "mlp": [FEATURES, HIDDEN, CLASSES],
            "activation": "tanh",
            "batch": BATCH,
            "optimizer": f"adam({LR:g})",
            "dtype": "float32",
            "n": n,
            "checkpoint_every": CKPT_EVERY,
        },
        "config": cfg,
        "checks": checks,
        "rows": rows,
        "checkpoint": ckpt,
        "breakdown": bd,
        "host_work_per_call": host,
        "goals": goal_lines,
        **goal_info,
        "wall_s": time.perf_counter() - t_start,
    }
    path = write_json(args.out / "fit.json", payload)
    print(
        f"\nwrote {path} ({payload['wall_s']:.0f} s in all; load {info['loadavg_1min']} at "
        f"start, {load_end} at end)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
