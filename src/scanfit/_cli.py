"""The ``scanfit`` command: argument parsing and printing only; training lives in the library."""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from scanfit._linear import _grad, scan_training_step


class _UsageError(Exception):
    """A bad flag or input: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scanfit", description="Compile a whole JAX training loop into one XLA program."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train on built-in synthetic data (y = true_w * x + noise)",
        description="Train the seed model w on y = true_w * x + noise with one lax.scan, "
        "and compare its speed with a Python loop of a jitted step.",
    )
    train.add_argument("--steps", type=_positive_int, default=20_000, help="microbatches N")
    train.add_argument("--batch-size", type=_positive_int, default=32, help="samples per step B")
    train.add_argument("--lr", type=_positive_float, default=0.005, help="learning rate")
    train.add_argument("--true-w", type=float, default=3.0, help="the w that made the data")
    train.add_argument("--noise", type=float, default=0.1, help="std of the target noise")
    train.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    return parser


def _seed_data(steps: int, batch: int, true_w: float, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, batch)).astype(np.float32)
    y = (true_w * x + noise * rng.normal(size=(steps, batch))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _time_python_loop(lr: float, x, y, steps: int) -> float:
    """Seconds per update of the alternative: a Python loop over a jitted step."""
    step = jax.jit(lambda w, lr, x, y: w - lr * _grad(w, x, y))
    rows = [(x[i], y[i]) for i in range(steps)]
    w = jax.block_until_ready(step(jnp.float32(0.0), lr, *rows[0]))  # compile outside the clock
    start = time.perf_counter()
    for xi, yi in rows:
        w = step(w, lr, xi, yi)
    jax.block_until_ready(w)
    return (time.perf_counter() - start) / steps


def _train(args: argparse.Namespace) -> None:
    x, y = _seed_data(args.steps, args.batch_size, args.true_w, args.noise, args.seed)
    start = time.perf_counter()
    jax.block_until_ready(scan_training_step(0.0, args.lr, x, y))
    compile_seconds = time.perf_counter() - start  # the first call compiles
    start = time.perf_counter()
    w = jax.block_until_ready(scan_training_step(0.0, args.lr, x, y))
    seconds = time.perf_counter() - start
    if not np.isfinite(float(w)):
        raise _UsageError(
            f"training diverged (w = {float(w)}): lower --lr, now {args.lr}, "
            f"below about {1 / (2 * args.batch_size):.3g} for --batch-size {args.batch_size}"
        )
    per_step_loop = _time_python_loop(args.lr, x, y, min(args.steps, 2_000))
    print(
        f"data      y = {args.true_w:g} * x + N(0, {args.noise:g}^2), "
        f"{args.steps} microbatches of {args.batch_size}"
    )
    print(f"true w    {args.true_w:.6f}")
    print(f"learned w {float(w):.6f}")
    print(
        f"time      {seconds * 1e3:.2f} ms for {args.steps} updates in one lax.scan "
        f"({args.steps / seconds:,.0f} updates/s; compiling took {compile_seconds:.2f} s)"
    )
    print(
        f"speed-up  {per_step_loop * args.steps / seconds:,.0f}x over a Python loop of a "
        f"jitted step ({per_step_loop * 1e6:.1f} us/update)"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            _train(args)
    except _UsageError as err:
        print(f"scanfit: error: {err}", file=sys.stderr)
        return 2
    return 0
