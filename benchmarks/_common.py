"""Helpers shared by the benchmark scripts: timing, machine description, tables, JSON.

jax is imported inside the functions, not at module level, so a script can import this
module and still pin its CPU affinity before jax starts (XLA sizes its thread pool then).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# SCANFIT_BENCH_RESULTS redirects the output (the test suite's --quick run writes to a tmp dir).
RESULTS_DIR = Path(
    os.environ.get("SCANFIT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)


def time_it(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time in seconds of ``fn()`` over ``repeats`` calls, and the last result.

    ``warmup`` untimed calls come first so compilation and caches stay out of the numbers.
    Each call ends with ``jax.block_until_ready``: JAX dispatch is asynchronous, so without
    it we would time the launch, not the work.
    """
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def alternated_medians(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds of each function, alternated rep by rep, after one warm-up each.

    Alternating spreads the machine's other work over every variant alike.
    """
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores we may use, library versions, date."""
    import jax
    import jaxlib
    import numpy as np

    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        # Other work on the machine skews timings; record how busy it was when we started.
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_machine(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu_model']}, {m['cpus_allowed']}/{m['cpu_count']} CPUs usable, "
        f"Python {m['python']}, jax {m['jax']} ({m['jax_backend']}), numpy {m['numpy']}, "
        f"load {m['loadavg_1min']}, {m['date']}"
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table, columns right-aligned to their widest cell."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
