"""Restarts: a resumed process's time to its first chunk, with and without ``compile_cache``.

    python benchmarks/restart.py [--quick]

The NNX tutorial CNN of ``models.py`` on the 8x8 digits (adamw, chunks of one
epoch). A first process trains one chunk with a checkpoint and fills a
compilation cache. Then fresh processes, alternated, each resume that
checkpoint and stop after their first chunk: with ``compile_cache=`` that
cache, and without. Timed in each process from the ``fit`` call to the first
chunk's ``on_chunk`` (the span the cache can shorten: tracing, lowering,
compiling or reading back, the chunk itself); the process's whole time
(imports, building the model) is reported beside it. Goal: cached <= 0.35x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS_DIR, describe_machine, format_table, machine, write_json

QUICK = {"reps": 1}
FULL = {"reps": 5}
CHUNK = 44  # one epoch of the digits in microbatches of 32


def child(checkpoint_dir: str, cache: str) -> None:
    """One process: resume (or start) the CNN run, stop after its first chunk, print timings."""
    started = time.perf_counter()
    import optax
    from models import cnn_loss, digits, make_cnn

    import scanfit

    train, _ = digits()
    model = make_cnn()
    first = []

    def on_chunk(info):
        first.append(time.perf_counter())
        return False  # one chunk is all a restart is timed on

    t0 = time.perf_counter()
    scanfit.fit(
        cnn_loss, model, optax.adamw(1e-3), train, epochs=3, chunk_steps=CHUNK, progress=False,
        checkpoint_dir=checkpoint_dir, on_chunk=on_chunk,
        compile_cache=None if cache == "none" else cache,
    )  # fmt: skip
    print(json.dumps({"fit_to_first_chunk_s": first[0] - t0, "process_s": first[0] - started}))


def _run_child(checkpoint_dir: Path, cache: Path | None) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(checkpoint_dir), str(cache or "none")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(reps: int, work: Path) -> dict:
    cache, first = work / "cache", work / "first"
    cold = _run_child(first, cache)  # one chunk saved, every program compiled into the cache
    times = {"cached": [], "uncached": []}
    for _ in range(reps):  # alternated, so drifting machine load hits both
        for name in times:
            resumed = work / f"resume-{name}"
            shutil.rmtree(resumed, ignore_errors=True)
            shutil.copytree(first, resumed)  # each resumes the same checkpoint
            times[name].append(_run_child(resumed, cache if name == "cached" else None))
    out = {"cold_first_process": cold}
    for name, runs in times.items():
        out[name] = {
            key: statistics.median(r[key] for r in runs)
            for key in ("fit_to_first_chunk_s", "process_s")
        }
    out["ratio_fit_to_first_chunk"] = (
        out["cached"]["fit_to_first_chunk_s"] / out["uncached"]["fit_to_first_chunk_s"]
    )
    out["ratio_process"] = out["cached"]["process_s"] / out["uncached"]["process_s"]
    out["cache_bytes"] = sum(p.stat().st_size for p in cache.iterdir())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one process of each kind")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for restart.json")
    p.add_argument("--child", nargs=2, metavar=("CHECKPOINT_DIR", "CACHE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    cfg = QUICK if args.quick else FULL
    info = machine()
    print(f"restart benchmark{' (quick)' if args.quick else ''}: {describe_machine(info)}")
    with tempfile.TemporaryDirectory() as work:
        result = measure(cfg["reps"], Path(work))
    rows = [
        [name, f"{result[name]['fit_to_first_chunk_s']:.2f}", f"{result[name]['process_s']:.2f}"]
        for name in ("cached", "uncached")
    ]
    print(format_table(["resumed process", "fit to 1st chunk s", "whole process s"], rows))
    print(
        f"cached / uncached: {result['ratio_fit_to_first_chunk']:.2f}x from the fit call "
        f"(goal <= 0.35x), {result['ratio_process']:.2f}x of the whole process; "
        f"cache {result['cache_bytes'] / 2**20:.1f} MiB"
    )
    payload = {"benchmark": "restart", "quick": args.quick, "machine": info, "config": cfg}
    path = write_json(args.out / "restart.json", {**payload, **result})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
