"""The ``scanfit`` command: parsing, printing and plotting; training lives in the library.

Bad input prints one line, ``scanfit: error: ...``, and exits with status 2; a
run that diverges exits with status 1. No traceback reaches the user.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scanfit import _data, _models
from scanfit._errors import (
    CheckpointLockedError,
    CheckpointMismatchError,
    CheckpointWriteError,
    DivergenceError,
)
from scanfit._fit import fit
from scanfit._linear import _grad, scan_training_step
from scanfit._sweep import rank, sweep

_DEFAULT_UPDATES = 2000


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
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _list_of(kind):
    def parse(text: str) -> list:
        return [kind(part) for part in text.split(",")]

    parse.__name__ = kind.__name__
    return parse


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scanfit", description="Compile a whole JAX training loop into one XLA program."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a model on a data file, or the seed problem on built-in data",
        description="Train with scanfit.fit. Without --data: the seed problem, y = true_w * x "
        "+ noise with the scalar model w, and its speed-up over a Python loop of a jitted "
        "step. Several --lr or --seed values run a sweep in one compiled program.",
    )
    data = train.add_argument_group("data")
    data.add_argument(
        "--data",
        type=Path,
        help=".npz with arrays x and y; .csv with a header, "
        "target last; .npy 2-D array, target last (memory-mapped)",
    )
    data.add_argument(
        "--steps",
        type=_positive_int,
        default=20_000,
        help="built-in data only: microbatches N (default 20000)",
    )
    data.add_argument("--true-w", type=float, default=3.0, help="built-in data: the true w")
    data.add_argument("--noise", type=float, default=0.1, help="built-in data: noise std")
    data.add_argument(
        "--val-fraction",
        type=_fraction,
        default=None,
        help="rows held out for validation (default 0.2 with --data, else 0)",
    )
    model = train.add_argument_group("model and optimizer")
    model.add_argument(
        "--model",
        choices=_models.MODELS,
        default=None,
        help="default: scalar for built-in data, linear for --data",
    )
    model.add_argument(
        "--hidden",
        type=_list_of(_positive_int),
        default=[64],
        help="mlp hidden layer sizes, comma-separated (default 64)",
    )
    model.add_argument(
        "--task",
        choices=_models.TASKS,
        default=None,
        help="default: classification for integer targets, else regression",
    )
    model.add_argument(
        "--optimizer",
        default=None,
        help="any optax optimizer taking a learning rate, by name (default: sgd for the scalar "
        "model, else adam)",
    )
    model.add_argument(
        "--lr",
        type=_list_of(_positive_float),
        default=None,
        help="learning rate; a comma-separated list runs a sweep "
        "(default 0.005 for the scalar model, else 0.001)",
    )
    loop = train.add_argument_group("training loop")
    loop.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="passes over the data (default: 1 on built-in data; with --data, "
        f"enough for about {_DEFAULT_UPDATES} updates)",
    )
    loop.add_argument("--batch-size", type=_positive_int, default=32)
    loop.add_argument("--accumulate", type=_positive_int, default=1)
    loop.add_argument(
        "--chunk-steps",
        type=_positive_int,
        default=None,
        help="updates per compiled call (default: a tenth of the run)",
    )
    loop.add_argument(
        "--seed",
        type=_list_of(_seed),
        default=[0],
        help="seed of init, shuffling and built-in data; a list runs a sweep",
    )
    loop.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="save checkpoints here and resume from them",
    )
    loop.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="data parallelism over this many local devices",
    )
    out = train.add_argument_group("output")
    out.add_argument("--plot", type=Path, default=None, help="PNG of the loss curve")
    out.add_argument("--json", type=Path, default=None, help="machine-readable summary")
    out.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    return parser


def _optimizer_factory(name: str):
    factory = getattr(optax, name, None)
    params = inspect.signature(factory).parameters if callable(factory) else {}
    if "learning_rate" not in params:
        known = "sgd, adam, adamw, lamb, lion, rmsprop, adagrad, adabelief, nadam, ..."
        raise _UsageError(
            f"--optimizer {name}: not an optax optimizer taking a learning rate (try {known})"
        )
    return lambda learning_rate: factory(learning_rate=learning_rate)


def _load(args) -> tuple[_data.Table, bool]:
    if args.data is None:
        return _data.synthetic_seed(
            args.steps * args.batch_size * args.accumulate, args.true_w, args.noise, args.seed[0]
        ), True
    return _data.load(args.data), False


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


def _seed_speedup(lr: float, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The same updates as one lax.scan (warm) against a Python loop of a jitted step."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    jax.block_until_ready(scan_training_step(0.0, lr, x, y))
    start = time.perf_counter()
    jax.block_until_ready(scan_training_step(0.0, lr, x, y))
    scan = (time.perf_counter() - start) / len(x)
    loop = _time_python_loop(lr, x, y, min(len(x), 2_000))
    return {
        "scan_us_per_update": scan * 1e6,
        "loop_us_per_update": loop * 1e6,
        "speedup": loop / scan,
    }


def _train(args) -> dict[str, Any]:
    table, builtin = _load(args)
    task = args.task or ("regression" if builtin else _data.infer_task(table.y))
    name = args.model or ("scalar" if builtin else "linear")
    features = table.x.shape[1]
    if name == "scalar" and (features != 1 or task != "regression"):
        raise _UsageError(
            f"--model scalar fits y = w * x: it needs one feature and a regression "
            f"target, the data has {features} features and a {task} target"
        )
    if task == "classification":
        if not np.issubdtype(table.y.dtype, np.integer) or table.y.min() < 0:
            raise _UsageError(
                "--task classification needs integer class labels 0, 1, 2, ... as targets"
            )
        outputs, y_dtype = int(table.y.max()) + 1, np.int32
    else:
        outputs, y_dtype = 1, np.float32
    lrs = args.lr or [0.005 if name == "scalar" else 0.001]
    args.optimizer = args.optimizer or ("sgd" if name == "scalar" else "adam")
    make_opt = _optimizer_factory(args.optimizer)
    val_fraction = args.val_fraction if args.val_fraction is not None else (0.0 if builtin else 0.2)
    split = _data.split(
        table,
        batch_size=args.batch_size,
        val_fraction=val_fraction,
        accumulate=args.accumulate,
        seed=args.seed[0],
        y_dtype=y_dtype,
    )
    model = _models.build(name, task, features, outputs, args.hidden)
    n = len(split.train[0])
    if args.epochs is None:
        args.epochs = 1 if builtin else max(1, -(-_DEFAULT_UPDATES * args.accumulate // n))
    total = args.epochs * n // args.accumulate
    summary: dict[str, Any] = {
        "data": "built-in seed problem" if builtin else str(args.data),
        "model": name,
        "task": task,
        "optimizer": args.optimizer,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "accumulate": args.accumulate,
        "microbatches": n,
        "updates": total,
        "dropped_rows": split.dropped,
    }
    if len(lrs) > 1 or len(args.seed) > 1:
        if args.devices or args.checkpoint_dir:
            raise _UsageError(
                "--devices and --checkpoint-dir train one configuration; give one "
                "--lr and one --seed with them"
            )
        return _sweep(args, model, make_opt, split, lrs, summary)
    return _single(args, model, make_opt(lrs[0]), split, lrs[0], builtin, summary, total)


def _single(args, model, optimizer, split, lr, builtin, summary, total) -> dict[str, Any]:
    val = split.val
    metric = jax.jit(model.metric) if val is not None else None
    curve: list[dict[str, float]] = []

    def on_chunk(info):
        point = {"step": info.step, "loss": float(np.mean(info.losses))}
        if metric is not None:
            point[model.metric_name] = float(metric(info.params, *val))
        curve.append(point)

    key = jax.random.key(args.seed[0])
    start = time.perf_counter()
    res = fit(
        model.loss,
        model.init(key),
        optimizer,
        split.train,
        epochs=args.epochs,
        key=key if args.epochs > 1 else None,
        accumulate=args.accumulate,
        chunk_steps=args.chunk_steps or max(1, -(-total // 10)),
        progress=False if args.quiet else None,
        on_chunk=on_chunk,
        checkpoint_dir=args.checkpoint_dir,
        devices=args.devices,
    )
    seconds = time.perf_counter() - start
    losses = np.asarray(res.losses)
    summary.update(
        lr=lr,
        seed=args.seed[0],
        wall_time_s=seconds,
        updates_per_s=len(losses) / seconds if seconds else None,
        final_loss=float(losses[-1]) if len(losses) else None,
        curve=curve,
    )
    if val is not None:
        summary[model.metric_name] = float(metric(res.params, *val))
    if builtin:
        summary.update(true_w=args.true_w, learned_w=float(res.params["w"]))
        summary.update(_seed_speedup(lr, split.train[0][..., 0], split.train[1]))
    summary["_losses"] = {"run": losses}
    return summary


def _sweep(args, model, make_opt, split, lrs, summary) -> dict[str, Any]:
    grid = {
        "learning_rate": np.repeat(np.asarray(lrs, np.float32), len(args.seed)),
        "seed": np.tile(np.asarray(args.seed), len(lrs)),
    }
    start = time.perf_counter()
    res = sweep(
        model.loss,
        model.init,
        make_opt,
        split.train,
        {"learning_rate": grid["learning_rate"]},
        seeds=grid["seed"],
        epochs=args.epochs,
        accumulate=args.accumulate,
    )
    jax.block_until_ready(res.losses)
    seconds = time.perf_counter() - start
    losses = np.asarray(res.losses)
    scores = None
    if split.val is not None:
        scores = np.asarray(jax.vmap(model.metric, in_axes=(0, None, None))(res.params, *split.val))
        if model.metric_name == "val_accuracy":
            scores = -scores  # rank ascending: best accuracy first
    window = max(1, losses.shape[1] // 10)
    ranked = rank(res, grid, scores=scores, window=window)
    for r in ranked:
        r["final_loss"] = float(losses[r["index"], -window:].mean())
        if scores is not None:
            r[model.metric_name] = float(abs(r.pop("score")))
        else:
            r.pop("score")
    summary.update(
        sweep=ranked, configs=len(ranked), wall_time_s=seconds, updates_per_s=losses.size / seconds
    )
    summary["_losses"] = {
        f"lr={lr:g} seed={s}": losses[i]
        for i, (lr, s) in enumerate(zip(grid["learning_rate"], grid["seed"]))
    }
    return summary


def _print(summary: dict[str, Any]) -> None:
    print(
        f"data       {summary['data']}: {summary['microbatches']} microbatches of "
        f"{summary['batch_size']}"
        + (
            f" ({summary['dropped_rows']} rows dropped to fill them)"
            if summary["dropped_rows"]
            else ""
        )
    )
    print(
        f"model      {summary['model']} ({summary['task']}), optimizer {summary['optimizer']}, "
        f"{summary['epochs']} epoch(s)"
    )
    if "sweep" in summary:
        print(
            f"sweep      {summary['configs']} configurations in one program, "
            f"{summary['wall_time_s']:.2f} s ({summary['updates_per_s']:,.0f} updates/s "
            "over all configs)"
        )
        keys = [k for k in summary["sweep"][0] if k != "index"]
        print("rank  " + "  ".join(f"{k:>14}" for k in keys))
        for i, row in enumerate(summary["sweep"], 1):
            print(f"{i:>4}  " + "  ".join(f"{row[k]:>14.6g}" for k in keys))
        return
    print(
        f"updates    {summary['updates']} in {summary['wall_time_s']:.2f} s "
        f"({summary['updates_per_s']:,.0f} updates/s, compilation included)"
    )
    print(f"final loss {summary['final_loss']:.6g}")
    for name in ("val_mse", "val_accuracy"):
        if name in summary:
            print(f"{name:<10} {summary[name]:.4f}")
    if "true_w" in summary:
        print(f"true w     {summary['true_w']:.6f}")
        print(f"learned w  {summary['learned_w']:.6f}")
        print(
            f"speed-up   {summary['speedup']:,.0f}x: the same updates as one lax.scan take "
            f"{summary['scan_us_per_update'] * 1e3:.0f} ns each, a Python loop of a jitted "
            f"step {summary['loop_us_per_update']:.1f} us"
        )


def _plot(path: Path, summary: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise _UsageError("--plot needs matplotlib: pip install 'scanfit[plot]'") from None
    curve = summary.get("curve", [])
    metric = next((k for k in ("val_accuracy", "val_mse") if curve and k in curve[0]), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(11 if metric else 6, 4), squeeze=False)
    ax = axes[0][0]
    for label, losses in summary["_losses"].items():
        window = max(1, len(losses) // 100)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window, smooth, label=label, lw=1)
    ax.set(
        xlabel="update",
        ylabel="training loss",
        title=f"{summary['model']} model, {summary['optimizer']}",
        yscale="log" if _positive(summary["_losses"]) else "linear",
    )
    if len(summary["_losses"]) > 1:
        ax.legend(fontsize=7)
    if metric:
        axes[0][1].plot([p["step"] for p in curve], [p[metric] for p in curve], marker="o")
        axes[0][1].set(
            xlabel="update", ylabel=metric.replace("_", " "), title="validation, per chunk"
        )
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise _UsageError(f"--plot {path}: cannot write it ({err.strerror})") from None
    finally:
        plt.close(fig)


def _positive(curves: dict[str, np.ndarray]) -> bool:
    return all(len(c) and np.all(c > 0) for c in curves.values())


def _write_json(path: Path, summary: dict[str, Any]) -> None:
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    public["final_losses"] = {
        k: (float(v[-1]) if len(v) else None) for k, v in summary["_losses"].items()
    }
    try:
        path.write_text(json.dumps(public, indent=2) + "\n")
    except OSError as err:
        raise _UsageError(f"--json {path}: cannot write it ({err.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = _train(args)
        if not args.quiet:
            _print(summary)
        if args.plot:
            _plot(args.plot, summary)
        if args.json:
            _write_json(args.json, summary)
    except (
        _UsageError,
        _data.DataError,
        CheckpointMismatchError,
        CheckpointLockedError,
        CheckpointWriteError,
    ) as err:
        print(f"scanfit: error: {err}", file=sys.stderr)
        return 2
    except DivergenceError as err:
        print(
            f"scanfit: error: training diverged at update {err.step}; lower --lr (now "
            f"{args.lr[0] if args.lr else 'the default'}) or try another --optimizer",
            file=sys.stderr,
        )
        return 1
    return 0
