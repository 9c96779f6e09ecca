"""The ``scanfit`` command: parsing, printing and plotting; training lives in the library.

Bad input prints one line, ``scanfit: error: ...``, and exits with status 2; a
run that diverges exits with status 1; Ctrl-C exits with status 130 and
SIGTERM (a scheduler reclaiming the machine) with status 143, after saying
where the run stopped. No traceback reaches the user. Sizes are
checked before anything big is allocated or compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scanfit import _checks, _compile_cache, _data, _models, _trackers
from scanfit._errors import (
    CheckpointLockedError,
    CheckpointMismatchError,
    CheckpointWriteError,
    DivergenceError,
    Preempted,
)
from scanfit._fit import fit
from scanfit._linear import _grad, scan_training_step
from scanfit._sweep import rank, sweep

_DEFAULT_UPDATES = 2000
# Chunks report progress; past this they would stack needless per-update outputs.
_MAX_CHUNK_STEPS = 2**16
_MAX_SEED = 2**31 - 1  # jax.random.key of a vmapped sweep takes int32 seeds


class _UsageError(Exception):
    """A bad flag or input: printed as one line, exit status 2."""


class _Interrupted(Exception):
    """Ctrl-C during training: printed as one line, exit status 130 (143 after SIGTERM)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


class _Terminated(BaseException):
    """SIGTERM outside training (loading, a sweep, reporting): one line, exit status 143.

    A BaseException, as KeyboardInterrupt is: no ``except Exception`` swallows it.
    """


_SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended


def _memory_budget() -> int:
    """Bytes a run may plan to use: half of this machine's memory (8 GiB if unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


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
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {_MAX_SEED}, got {text}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _directory(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a directory name, got ''")
    return Path(text)


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
        # One line: a bad flag then prints two, not the whole option list.
        usage="scanfit train [options]  (scanfit train --help lists them)",
        help="train a model on a data file, or the seed problem on built-in data",
        description="Train with scanfit.fit. Without --data: the seed problem, y = true_w * x "
        "+ noise with the scalar model w, and its speed-up over a Python loop of a jitted "
        "step. Several --lr or --seed values run a sweep in one compiled program.",
    )
    _data_flags(train.add_argument_group("data"))
    _model_flags(train.add_argument_group("model and optimizer"))
    _loop_flags(train.add_argument_group("training loop"))
    _output_flags(train.add_argument_group("output"))
    return parser


def _data_flags(data) -> None:
    data.add_argument(
        "--data",
        type=Path,
        help=".npz with arrays x and y; .csv with a header row (required: a first row of "
        "numbers is refused), target last; .npy 2-D array, target last (memory-mapped)",
    )
    data.add_argument(
        "--steps",
        type=_positive_int,
        default=20_000,
        help="built-in data only: microbatches N (default 20000)",
    )
    data.add_argument("--true-w", type=_finite_float, default=3.0, help="built-in data: the true w")
    data.add_argument(
        "--noise", type=_non_negative_float, default=0.1, help="built-in data: noise std"
    )
    data.add_argument(
        "--val-fraction",
        type=_fraction,
        default=None,
        help="rows held out for validation (default 0.2 with --data, else 0)",
    )


def _model_flags(model) -> None:
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


def _loop_flags(loop) -> None:
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
        type=_directory,
        default=None,
        help="save checkpoints here and resume from them",
    )
    loop.add_argument(
        "--compile-cache",
        type=_directory,
        default=None,
        help="JAX's persistent compilation cache: a rerun reads the compiled programs from "
        "here instead of compiling them (default: CHECKPOINT_DIR/compile-cache with "
        "--checkpoint-dir, else none)",
    )
    loop.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="no compilation cache, not even under --checkpoint-dir",
    )
    loop.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="evaluate the validation rows inside the compiled program every N updates and "
        "after the last, as microbatches of --batch-size rows (the last rows that do not fill "
        "one are dropped); reports the best and the final validation metric (default: every "
        "epoch when there are validation rows and one --lr and --seed)",
    )
    loop.add_argument(
        "--patience",
        type=_positive_int,
        default=None,
        help="stop P evaluations after the best validation metric (highest accuracy, lowest mse)",
    )
    loop.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="data parallelism over this many local devices",
    )


def _output_flags(out) -> None:
    out.add_argument("--plot", type=Path, default=None, help="PNG of the loss curve")
    out.add_argument("--json", type=Path, default=None, help="machine-readable summary")
    out.add_argument(
        "--log-dir",
        type=_directory,
        default=None,
        help="write metrics.jsonl (and TensorBoard events if tensorboardX is installed) here",
    )
    out.add_argument(
        "--logger",
        action="append",
        choices=_trackers.NAMES,
        default=None,
        help="also send the metrics to this tracker (repeatable; needs --log-dir): mlflow "
        "(file store in the log dir), wandb (offline), trackio (local)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def _optimizer_factory(name: str):
    """optax.<name>(learning_rate=...), refused unless it trains with that alone.

    A factory with other required arguments (``dpsgd``), or whose ``update``
    needs more than gradients, state and params (``lbfgs`` wants the loss
    value), would fail only once traced: it is tried on a scalar here.
    """
    known = "sgd, adam, adamw, lamb, lion, rmsprop, adagrad, adabelief, nadam, ..."
    shown = name if name.isidentifier() else repr(name)
    with warnings.catch_warnings():  # optax names deprecated aliases on lookup (dpsgd)
        warnings.simplefilter("ignore", DeprecationWarning)
        factory = getattr(optax, name, None) if name.isidentifier() else None
    try:
        params = inspect.signature(factory).parameters if callable(factory) else {}
    except (TypeError, ValueError):  # a builtin without a signature: not an optimizer
        params = {}
    required = [
        p
        for p in params.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if "learning_rate" not in params:
        raise _UsageError(
            f"--optimizer {shown}: not an optax optimizer taking a learning rate (try {known})"
        )
    if [p.name for p in required] not in ([], ["learning_rate"]):
        raise _UsageError(
            f"--optimizer {name}: optax.{name} also needs "
            f"{', '.join(p.name for p in required if p.name != 'learning_rate')}, which "
            f"scanfit train cannot give (try {known})"
        )
    try:
        opt = factory(learning_rate=1e-3)
        w = jnp.zeros(2)
        jax.eval_shape(opt.update, w, opt.init(w), w)
    except Exception as err:  # noqa: BLE001  any failure means it cannot train here
        raise _UsageError(
            f"--optimizer {name}: optax.{name} cannot train with gradients alone "
            f"({type(err).__name__}); try {known}"
        ) from None
    return lambda learning_rate: factory(learning_rate=learning_rate)


def _check_paths(args) -> None:
    """Output paths and devices, checked before any data is read or trained on."""
    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        if path is None:
            continue
        if path.is_dir():
            raise _UsageError(f"{flag} {path}: is a directory, give a file name")
        if not path.parent.is_dir():
            raise _UsageError(f"{flag} {path}: directory {path.parent} does not exist")
    if args.plot is not None:
        _check_plot_format(args.plot)
    ckpt = args.checkpoint_dir
    if ckpt is not None:
        if ckpt.exists() and not ckpt.is_dir():
            raise _UsageError(f"--checkpoint-dir {ckpt}: exists and is not a directory")
        where = ckpt if ckpt.exists() else next((p for p in ckpt.parents if p.exists()), None)
        if where is not None and not where.is_dir():
            raise _UsageError(f"--checkpoint-dir {ckpt}: {where} is not a directory")
        if where is not None and not os.access(where, os.W_OK | os.X_OK):
            raise _UsageError(f"--checkpoint-dir {ckpt}: {where} is not writable")
    if args.compile_cache is not None and args.no_compile_cache:
        raise _UsageError(f"--compile-cache {args.compile_cache} and --no-compile-cache: give one")
    for flag, path in (("--log-dir", args.log_dir), ("--compile-cache", args.compile_cache)):
        if path is not None and path.exists() and not path.is_dir():
            raise _UsageError(f"{flag} {path}: exists and is not a directory")
    if args.logger:
        if args.log_dir is None:
            raise _UsageError("--logger needs --log-dir (the trackers mirror its metrics.jsonl)")
        try:
            _trackers.check(args.logger, args.log_dir)
        except ImportError as err:
            raise _UsageError(f"--logger: {err}") from None
    _check_eval_flags(args)
    if args.devices is not None and args.devices > jax.local_device_count():
        raise _UsageError(
            f"--devices {args.devices}: this machine has {jax.local_device_count()} "
            f"{jax.default_backend()} device(s)"
        )
    if args.devices is not None and args.batch_size % args.devices:
        raise _UsageError(
            f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}: "
            "each device takes an equal share of every batch"
        )


def _check_eval_flags(args) -> None:
    """--eval-every and --patience: what they need, before any data is read."""
    pairs = (("--eval-every", args.eval_every), ("--patience", args.patience))
    given = [(flag, value) for flag, value in pairs if value is not None]
    if not given:
        return
    flag, value = given[0]
    if len(args.lr or ()) > 1 or len(args.seed) > 1:
        raise _UsageError(f"{flag} trains one configuration; give one --lr and one --seed")
    defaulted_to_none = args.val_fraction is None and args.data is None  # built-in data
    if args.val_fraction == 0 or defaulted_to_none:
        raise _UsageError(
            f"{flag} {value} needs validation rows; give --val-fraction > 0"
            + (" (built-in data holds none out by default)" if defaulted_to_none else "")
        )


def _check_plot_format(path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise _UsageError("--plot needs matplotlib: pip install 'scanfit[plot]'") from None
    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise _UsageError(
            f"--plot {path}: unknown image format {suffix or '(none)'!r}; use one of "
            f"{', '.join(sorted(formats))}"
        )


# Bytes per row of the built-in data while it is made: x, y and their float64 draws,
# and the shuffled copies the split makes.
_SEED_ROW_BYTES = 48


def _load(args) -> tuple[_data.Table, bool]:
    if args.data is None:
        rows = args.steps * args.batch_size * args.accumulate
        if rows * _SEED_ROW_BYTES > _memory_budget():
            raise _UsageError(
                f"--steps {args.steps} x --batch-size {args.batch_size}"
                + (f" x --accumulate {args.accumulate}" if args.accumulate > 1 else "")
                + f" = {rows:,} rows of built-in data need about "
                f"{_gib(rows * _SEED_ROW_BYTES)}, more than {_gib(_memory_budget())} "
                "(half this machine's memory)"
            )
        _check_updates(args.epochs or 1, args.steps)
        return _data.synthetic_seed(rows, args.true_w, args.noise, args.seed[0]), True
    return _data.load(args.data), False


def _check_updates(epochs: int, updates_per_epoch: int) -> None:
    total = epochs * updates_per_epoch
    if total > _checks.MAX_UPDATES:
        raise _UsageError(
            f"--epochs {epochs} x {updates_per_epoch} updates per epoch = {total:,} updates, "
            f"more than the {_checks.MAX_UPDATES:,} one run can count"
        )


def _check_model_size(args, name, task, features, outputs, configs) -> None:
    """Refuses a model whose training would not fit in memory, before building it."""
    sizes = [features, *(args.hidden if name == "mlp" else ()), outputs]
    count = 1 if name == "scalar" else sum(m * n + n for m, n in zip(sizes[:-1], sizes[1:]))
    # params, gradients and two optimizer moments; activations and their gradients.
    activations = 2 * args.batch_size * sum(sizes[1:])
    need = 4 * configs * (4 * count + activations)
    if need > _memory_budget():
        why = (
            f"; its targets make {outputs:,} classes (labels 0 to {outputs - 1:,}): are they "
            "class labels? Try --task regression"
            if task == "classification" and outputs > 1000
            else "; use a smaller --hidden"
        )
        raise _UsageError(
            f"the {name} model ({' -> '.join(f'{n:,}' for n in sizes)}) has {count:,} "
            f"parameters{f' x {configs} configs' if configs > 1 else ''} and needs about "
            f"{_gib(need)} to train, more than {_gib(_memory_budget())} (half this "
            f"machine's memory){why}"
        )


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
    if args.optimizer is None:
        args.optimizer = "sgd" if name == "scalar" else "adam"
    make_opt = _optimizer_factory(args.optimizer)
    _check_model_size(args, name, task, features, outputs, len(lrs) * len(args.seed))
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
    _check_updates(args.epochs, n // args.accumulate)
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
        try:  # a sweep is one program: all its float32 losses are stacked at once
            _checks.check_stacked_outputs(
                total,
                4,
                configs=len(lrs) * len(args.seed),
                remedy="give fewer --epochs, --lr or --seed values",
            )
        except ValueError as err:
            raise _UsageError(str(err)) from None
        return _sweep(args, model, make_opt, split, lrs, summary)
    return _single(args, model, make_opt(lrs[0]), split, lrs[0], builtin, summary, total)


@contextlib.contextmanager
def _library_errors(args):
    """fit's and sweep's refusals of what the flags built, and file errors, as one line.

    Ctrl-C becomes ``_Interrupted``, saying where a rerun resumes: ``fit`` saves
    the last completed chunk and tags the interrupt with its update. SIGTERM
    (``Preempted``) too, with exit status 143.
    """
    try:
        yield
    except (ValueError, TypeError) as err:  # CheckpointMismatchError included
        raise _UsageError(str(err)) from None
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise _UsageError(f"{err.strerror or err}{where}") from None
    except KeyboardInterrupt as err:
        step = getattr(err, "step", 0)
        what, code = (
            ("preempted (SIGTERM)", _SIGTERM_EXIT)
            if isinstance(err, Preempted)
            else ("interrupted", 130)
        )
        if args.checkpoint_dir is not None and step > 0:
            raise _Interrupted(
                f"{what} at update {step}; checkpoint saved in {args.checkpoint_dir}; "
                "run again to resume",
                code,
            ) from None
        raise _Interrupted(
            f"{what} at update {step}; nothing saved"
            + ("" if args.checkpoint_dir is not None else " (no --checkpoint-dir)"),
            code,
        ) from None


def _default_chunk(total: int, eval_every: int | None) -> int:
    """A tenth of the run; with evaluation, a multiple of ``eval_every``.

    Chunks that start on an evaluation all lay out their updates alike, so they
    share one compiled program instead of compiling one each.
    """
    chunk = min(max(1, -(-total // 10)), _MAX_CHUNK_STEPS)
    if eval_every is None or eval_every > _MAX_CHUNK_STEPS:
        return chunk
    return max(eval_every, chunk // eval_every * eval_every)


def _eval_batches(val, batch_size: int) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """Validation rows as M full eval microbatches, and how many rows that leaves out.

    Rows past the last full microbatch are dropped, not padded: every microbatch
    then weighs the same, so the in-graph mean over the M microbatch means is
    exactly the mean over the rows evaluated. Fewer rows than ``batch_size``
    make one microbatch of them all.
    """
    x, y = val
    size = min(batch_size, len(x))
    m = len(x) // size
    used = m * size
    return (x[:used].reshape(m, size, -1), y[:used].reshape(m, size)), len(x) - used


def _eval_settings(args, model, eval_data, every: int) -> dict[str, Any]:
    """fit's keywords for in-graph evaluation of the model's metric and loss."""

    def eval_fn(params, batch):
        return {
            model.metric_name: model.metric(params, *batch),
            "val_loss": model.loss(params, batch),
        }

    mode = "max" if model.metric_name == "val_accuracy" else "min"
    return {
        "eval_fn": eval_fn,
        "eval_data": eval_data,
        "eval_every": every,
        "best": (model.metric_name, mode),
        "patience": args.patience,
    }


def _single(args, model, optimizer, split, lr, builtin, summary, total) -> dict[str, Any]:
    """One configuration through ``fit``; ``summary`` gains its results.

    With validation rows the program evaluates them every epoch (or every
    ``--eval-every`` updates) and keeps the best; the final metric is then
    recomputed on the host from the same rows.
    """
    val = split.val
    evaluation: dict[str, Any] = {}
    # Keras's convention: validation rows are evaluated every epoch unless told otherwise.
    per_epoch = summary["microbatches"] // args.accumulate
    every = args.eval_every or (per_epoch if val is not None else None)
    if every is not None:
        eval_data, val_dropped = _eval_batches(val, args.batch_size)
        val = tuple(a.reshape(-1, *a.shape[2:]) for a in eval_data)  # the rows evaluated
        evaluation = _eval_settings(args, model, eval_data, every)
        summary.update(
            eval_every=every,
            eval_microbatches=len(eval_data[0]),
            eval_batch_size=eval_data[0].shape[1],
            eval_dropped_rows=val_dropped,
        )
    metric = jax.jit(model.metric) if val is not None else None
    curve: list[dict[str, float]] = []

    def on_chunk(info):
        point = {"step": info.step, "loss": float(np.nanmean(info.losses))}
        if metric is not None and not evaluation:  # with --eval-every the program evaluates
            point[model.metric_name] = float(metric(info.params, *val))
        curve.append(point)

    key = jax.random.key(args.seed[0])
    start = time.perf_counter()
    with _library_errors(args):
        res = fit(
            model.loss,
            model.init(key),
            optimizer,
            split.train,
            epochs=args.epochs,
            key=key if args.epochs > 1 else None,
            accumulate=args.accumulate,
            chunk_steps=args.chunk_steps or _default_chunk(total, every),
            progress=False if args.quiet else None,
            on_chunk=on_chunk,
            checkpoint_dir=args.checkpoint_dir,
            devices=args.devices,
            **evaluation,
            # Passed only when given, so that runs without it need no fit(log_dir=).
            **({"log_dir": args.log_dir} if args.log_dir is not None else {}),
            **({"loggers": args.logger} if args.logger else {}),
        )
    seconds = time.perf_counter() - start
    losses = np.asarray(res.losses)
    stopped_at = int(res.stopped_at) if evaluation else -1
    done = losses[:stopped_at] if stopped_at >= 0 else losses  # skipped updates read NaN
    summary.update(
        lr=lr,
        seed=args.seed[0],
        wall_time_s=seconds,
        updates_per_s=len(done) / seconds if seconds else None,
        final_loss=float(done[-1]) if len(done) else None,
        curve=curve,
    )
    if val is not None:  # the params after the last update done, on the host
        summary[model.metric_name] = float(metric(res.params, *val))
    if evaluation:
        summary.update(_eval_summary(res, model.metric_name, args.patience))
    if builtin:
        summary.update(true_w=args.true_w, learned_w=float(res.params["w"]))
        summary.update(_seed_speedup(lr, split.train[0][..., 0], split.train[1]))
    summary["_losses"] = {"run": done}
    return summary


def _eval_summary(res, name: str, patience: int | None) -> dict[str, Any]:
    """The in-graph evaluations done (those skipped after a stop dropped), best and stop."""
    metrics = {k: np.asarray(v) for k, v in res.metrics.items()}
    history = [
        {"step": int(step), **{k: float(v[i]) for k, v in metrics.items() if k != "step"}}
        for i, step in enumerate(metrics["step"])
        if step >= 0
    ]
    best_step = int(res.best_step)
    best = next((e[name] for e in history if e["step"] == best_step), None)
    return {
        "evaluations": history,
        f"best_{name}": best,
        "best_step": best_step,
        "stopped_at": int(res.stopped_at),
        "patience": patience,
    }


def _sweep(args, model, make_opt, split, lrs, summary) -> dict[str, Any]:
    grid = {
        "learning_rate": np.repeat(np.asarray(lrs, np.float32), len(args.seed)),
        "seed": np.tile(np.asarray(args.seed), len(lrs)),
    }
    start = time.perf_counter()
    with _library_errors(args):
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
    done = summary.get("stopped_at", -1)
    print(
        f"updates    {done if done >= 0 else summary['updates']}"
        + (f" of {summary['updates']}" if done >= 0 else "")
        + f" in {summary['wall_time_s']:.2f} s "
        f"({summary['updates_per_s']:,.0f} updates/s, compilation included)"
    )
    print(f"final loss {summary['final_loss']:.6g}")
    if "eval_microbatches" in summary:
        print(
            f"validation {summary['eval_microbatches']} microbatches of "
            f"{summary['eval_batch_size']}"
            " evaluated in the program"
            + (
                f" ({summary['eval_dropped_rows']} rows dropped to fill them)"
                if summary["eval_dropped_rows"]
                else ""
            )
        )
    for name in ("val_mse", "val_accuracy"):
        if name in summary:
            print(f"{name:<10} {summary[name]:.4f}")
        if summary.get(f"best_{name}") is not None:
            print(f"best {name} {summary[f'best_{name}']:.4f} at update {summary['best_step']}")
    if summary.get("stopped_at", -1) >= 0:
        print(f"stopped at update {summary['stopped_at']} (patience {summary['patience']})")
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
    # The in-graph evaluations with --eval-every, else the host's at each chunk.
    curve = summary.get("evaluations") or summary.get("curve", [])
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
            xlabel="update",
            ylabel=metric.replace("_", " "),
            title="validation" + ("" if "evaluations" in summary else ", per chunk"),
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


def _compile_cache_dir(args) -> Path | None:
    """--compile-cache, else CHECKPOINT_DIR/compile-cache: a resumed run does not compile."""
    if args.no_compile_cache:
        return None
    if args.compile_cache is None and args.checkpoint_dir is not None:
        return args.checkpoint_dir / "compile-cache"
    return args.compile_cache


@contextlib.contextmanager
def _sigterm_ends_the_command() -> Any:
    """SIGTERM outside ``fit`` (which saves and raises ``Preempted``) raises ``_Terminated``.

    Set from the main thread only (Python's rule), and put back afterwards.
    """

    def terminate(signum, frame):
        raise _Terminated("terminated (SIGTERM)")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Runs ``scanfit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0: done; 1: training diverged; 2: bad input (argparse exits with 2 itself);
    130: interrupted by Ctrl-C; 143: stopped by SIGTERM.
    """
    args = _parser().parse_args(argv)
    with _sigterm_ends_the_command():
        return _run(args)


def _run(args) -> int:
    """``main`` after parsing: every outcome as an exit status and at most one line."""
    try:
        _check_paths(args)
        with _compile_cache.persistent(_compile_cache_dir(args)):
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
        return _fail(err, 2)
    except MemoryError:
        return _fail("out of memory; use a smaller --batch-size, --hidden or --steps", 2)
    except DivergenceError as err:
        lr = args.lr[0] if args.lr else "the default"
        return _fail(
            f"training diverged at update {err.step}; lower --lr (now {lr}) or try another "
            "--optimizer",
            1,
        )
    except _Interrupted as err:
        print(f"scanfit: {err}", file=sys.stderr)
        return err.code
    except _Terminated as err:  # outside training: whatever was saved stays
        kept = f"; checkpoints in {args.checkpoint_dir} are kept" if args.checkpoint_dir else ""
        print(f"scanfit: {err}{kept}", file=sys.stderr)
        return _SIGTERM_EXIT
    except KeyboardInterrupt:  # outside training: nothing to save
        print("scanfit: interrupted", file=sys.stderr)
        return 130
    return 0


def _fail(message, code: int) -> int:
    print(f"scanfit: error: {message}", file=sys.stderr)
    return code
