"""Run every benchmark suite in turn: python benchmarks/run.py [--quick]."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

# Modules in benchmarks/ that define main(argv) -> exit code. Append new suites here.
SUITES = [
    "seed",
    "lowering",
    "loop",
    "fit",
    "sources",
    "sweep",
    "models",
    "peers",
    "conv",
    "eval",
    "operations",
    "restart",
    "sharding",
    "steps",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="passed on to every suite")
    p.add_argument("--suites", nargs="+", choices=SUITES, default=SUITES, help="run only these")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # suites import _common by name

    failed = []
    for name in args.suites:
        print(f"===== {name} =====", flush=True)
        t0 = time.perf_counter()
        rc = importlib.import_module(name).main(["--quick"] if args.quick else [])
        print(
            f"===== {name}: {'ok' if rc == 0 else f'FAILED ({rc})'}, "
            f"{time.perf_counter() - t0:.1f} s =====\n",
            flush=True,
        )
        if rc:
            failed.append(name)
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
