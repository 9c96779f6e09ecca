"""Host-side data: loading tables from files, and laying rows out as microbatches.

Every problem a user's file can have becomes a ``DataError`` with one line
that says what is wrong and where.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np


class DataError(ValueError):
    """A data file that cannot be used, with a message fit for one line."""


class Table(NamedTuple):
    x: np.ndarray  # shape=(rows, features); a memmap view for .npy files
    y: np.ndarray  # shape=(rows,)


def synthetic_seed(rows: int, true_w: float, noise: float, seed: int) -> Table:
    """The seed problem's data: y = true_w * x + N(0, noise^2), one feature."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 1)).astype(np.float32)
    with np.errstate(over="ignore"):
        y = (true_w * x[:, 0] + noise * rng.normal(size=rows)).astype(np.float32)
    if not np.isfinite(y).all():
        raise DataError(
            f"--true-w {true_w} and --noise {noise} overflow float32 in the built-in data"
        )
    return Table(x, y)


def load(path: str | Path) -> Table:
    """Reads ``.npz`` (arrays ``x`` and ``y``), ``.csv`` (a header row; the last column is
    the target) or ``.npy`` (a 2-D array, last column the target, memory-mapped).

    A CSV whose first row is all numbers has no header: it is refused rather than
    read as one, which would drop a row of data. Blank CSV lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            table = _load_npz(path)
        elif suffix == ".csv":
            table = _load_csv(path)
        elif suffix == ".npy":
            table = _load_npy(path)
        else:
            raise DataError(
                f"--data {path}: unknown format {suffix or '(none)'}; use .npz, .csv or .npy"
            )
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"--data {path}: cannot read it ({err})") from err
    return _checked(path, table)


def _load_npz(path: Path) -> Table:
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("x", "y") if k not in f.files]
        if missing:
            raise DataError(
                f"--data {path}: missing array {' and '.join(repr(m) for m in missing)}"
                f" (found {', '.join(f.files) or 'none'}); save with np.savez(path, "
                "x=..., y=...)"
            )
        x, y = f["x"], f["y"]
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(
            f"--data {path}: x and y must be arrays of rows, got shapes {x.shape} and {y.shape}"
        )
    return Table(x.reshape(len(x), -1) if x.ndim != 2 else x, y)


def _load_npy(path: Path) -> Table:
    table = np.load(path, mmap_mode="r", allow_pickle=False)
    if table.ndim != 2 or table.shape[1] < 2:
        raise DataError(
            f"--data {path}: a .npy file must hold a 2-D array (rows, features + 1) "
            f"with the target last, got shape {table.shape}"
        )
    return Table(table[:, :-1], table[:, -1])


def _load_csv(path: Path) -> Table:
    with open(path, newline="") as f:
        # Blank lines (a trailing newline too many) are not rows; keep file line numbers.
        rows = [(i, row) for i, row in enumerate(csv.reader(f), start=1) if row]
    if len(rows) < 2:
        raise DataError(f"--data {path}: needs a header row and at least one data row")
    (_, header), body = rows[0], rows[1:]
    if len(header) < 2:
        raise DataError(f"--data {path}: needs at least two columns (features, then the target)")
    if all(_is_number(cell) for cell in header):
        # Read as a header, a first row of data would silently be lost.
        raise DataError(
            f"--data {path}: the first row ({','.join(header)[:40]}) is all numbers, not a "
            "header; add a header row naming the columns (the target last)"
        )
    values = np.empty((len(body), len(header)), np.float64)
    for r, (i, row) in enumerate(body):
        if len(row) != len(header):
            raise DataError(
                f"--data {path}: line {i} has {len(row)} cells, the header has {len(header)}"
            )
        for j, cell in enumerate(row):
            try:
                values[r, j] = float(cell)
            except ValueError:
                raise DataError(
                    f"--data {path}: line {i}, column {header[j]!r}: {cell!r} is not a number"
                ) from None
    x = values[:, :-1].astype(np.float32)
    y = values[:, -1]
    return Table(x, y.astype(np.int64) if _integral(y) else y.astype(np.float32))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _integral(y: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(y)) and np.all(y == np.round(y)))


def _checked(path: Path, table: Table) -> Table:
    x, y = table
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise DataError(f"--data {path}: x and y must be numeric, got {x.dtype} and {y.dtype}")
    if np.iscomplexobj(x) or np.iscomplexobj(y):
        raise DataError(f"--data {path}: x and y must be real numbers, got {x.dtype} and {y.dtype}")
    if y.ndim != 1:
        raise DataError(f"--data {path}: y must be 1-D (one target per row), got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"--data {path}: x has {len(x)} rows but y has {len(y)}")
    if len(x) == 0:
        raise DataError(f"--data {path}: no rows")
    for name, a in (("x", x), ("y", y)):
        if np.issubdtype(a.dtype, np.floating):
            bad = ~np.isfinite(a)
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                raise DataError(f"--data {path}: {name} has NaN or inf values (first at row {row})")
    return table


def infer_task(y: np.ndarray) -> str:
    """Integer targets mean classification; anything else regression."""
    return "classification" if np.issubdtype(y.dtype, np.integer) else "regression"


class Split(NamedTuple):
    train: tuple[np.ndarray, np.ndarray]  # shapes=(N, B, features), (N, B): microbatches
    val: tuple[np.ndarray, np.ndarray] | None  # shapes=(rows, features), (rows,)
    dropped: int  # training rows left out so that every microbatch is full


def split(
    table: Table, *, batch_size: int, val_fraction: float, accumulate: int, seed: int, y_dtype
) -> Split:
    """Shuffles in-memory rows (a memmap keeps its order: the tail is validation), holds
    out ``val_fraction`` of them, and lays the rest out as (N, batch_size, ...)."""
    x, y = table
    rows = len(x)
    if not isinstance(x, np.memmap) and not isinstance(getattr(x, "base", None), np.memmap):
        order = np.random.default_rng(seed).permutation(rows)
        x, y = x[order], y[order]
    n_val = int(round(rows * val_fraction))
    n_train = rows - n_val
    if val_fraction > 0 and n_val == 0:
        raise DataError(f"--val-fraction {val_fraction} of {rows} rows holds out no row")
    per_update = batch_size * accumulate
    if n_train < per_update:
        raise DataError(
            f"--batch-size {batch_size}"
            + (f" x --accumulate {accumulate}" if accumulate > 1 else "")
            + f" needs at least {per_update} training rows, the data has {n_train}"
        )
    n = (n_train // per_update) * accumulate
    used = n * batch_size
    train = (x[:used].reshape(n, batch_size, -1), y[:used].reshape(n, batch_size).astype(y_dtype))
    val = (x[n_train:], y[n_train:].astype(y_dtype)) if n_val else None
    return Split(train, val, n_train - used)
