"""The metrics log of ``fit(log_dir=...)``: ``metrics.jsonl`` and TensorBoard event files.

``metrics.jsonl`` holds one JSON object per line:
``{"step": ..., "kind": "chunk" | "eval", name: value, ...}``; when
``tensorboardX`` is installed the same scalars go to TensorBoard event files in
the same directory, tagged ``<kind>/<name>`` (``_event_files``). Both are the
records of one run, and as durable as its checkpoints:

- Every record reaches the OS when written: a killed process loses none.
- A new run (one starting from update 0) first moves an earlier run's
  ``metrics.jsonl`` and event files into ``previous-<k>/`` (``k`` counting up
  from 1), as ``fit(resume=False)`` does with checkpoints: nothing is deleted.
- A resumed run (from update ``s``) drops what the interrupted one logged past
  ``s``: each file is rewritten atomically (a copy written aside, fsynced,
  renamed over it), so a kill leaves the old file or the new, never a short one.
  It cuts only its own log: ``.scanfit-run`` names the run that wrote the files
  (a digest of its checkpoint fingerprint); another run's files are moved aside
  as for a new run, with a warning.
- A line torn by a kill mid-append is dropped with a ``RuntimeWarning`` naming
  the file.

Host code: files only, nothing traced.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from scanfit import _checkpoint, _event_files

FILE = "metrics.jsonl"
RUN = ".scanfit-run"  # which run wrote the files beside it
_TMP_PREFIX = ".tmp-log-"  # a rewrite's copy before it is renamed over the original


def learning_rate(opt_state: Any) -> float | None:
    """The learning rate an optimizer state exposes (``optax.inject_hyperparams``), or None."""
    found = []

    def visit(node):
        hyper = getattr(node, "hyperparams", None)
        if isinstance(hyper, dict) and "learning_rate" in hyper:
            found.append(hyper["learning_rate"])
        return node

    is_leaf = lambda n: hasattr(n, "hyperparams")  # noqa: E731
    jax.tree.map(visit, opt_state, is_leaf=is_leaf)
    if not found or np.ndim(found[0]) != 0:
        return None  # absent, or one per sweep config: not a single number
    return float(np.asarray(found[0]))


def _number(value: Any) -> float | int | None:
    """A JSON-able scalar; NaN and infinities become None (JSON has no spelling for them)."""
    value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records to ``log_dir/metrics.jsonl`` (and TensorBoard, when installed).

    Args:
      log_dir: the directory; created if missing.
      start: the update this run starts from. ``0``: a new run, which first moves an
        earlier run's files into ``log_dir/previous-<k>/``; above: a resumed run,
        which drops the records the interrupted run logged past ``start``.
      run: what identifies the run (the same string when it resumes), or None. Files
        of another run are moved aside even on resume; files that name no run are
        taken as this run's.
    """

    def __init__(self, log_dir: str | Path, start: int = 0, run: str | None = None):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.dir.glob(_TMP_PREFIX + "*"):  # a rewrite killed before its rename
            leftover.unlink()
        tensorboard = _has_tensorboard()
        if start == 0 or _another_run(self.dir, run, start):
            move_aside(self.dir)
        else:
            _cut_jsonl(self.dir / FILE, start)
            if tensorboard:
                for path in sorted(self.dir.glob(_event_files.PATTERN)):
                    _cut_events(path, start)
        if run is not None and _run_of(self.dir) != run:
            _replace(self.dir / RUN, run.encode())
        self._file = open(self.dir / FILE, "a")  # noqa: SIM115  (closed by close())
        self._tb = _event_files.EventFile(self.dir) if tensorboard else None

    def write(self, step: int, kind: str, scalars: dict[str, Any]) -> None:
        """Logs ``scalars`` (name -> number) at update ``step``, handed to the OS at once."""
        record = {"step": int(step), "kind": kind}
        record.update({name: _number(v) for name, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            values = {f"{kind}/{name}": float(np.asarray(v)) for name, v in scalars.items()}
            self._tb.add(int(step), values)
            self._tb.flush()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _has_tensorboard() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


def _run_of(log_dir: Path) -> str | None:
    """The run that wrote the files in ``log_dir``, None if they name none."""
    path = log_dir / RUN
    return path.read_text() if path.exists() else None


def _another_run(log_dir: Path, run: str | None, start: int) -> bool:
    """Whether a run resuming at ``start`` finds another run's files in ``log_dir``
    (with a warning: they are moved aside, and this run's log starts at ``start``)."""
    found = _run_of(log_dir)
    if run is None or found is None or found == run:
        return False
    warnings.warn(
        f"the metrics log in {str(log_dir)!r} was written by another run: it is moved into "
        f"previous-<k>/ there, and this run, resumed at update {start}, logs from there on.",
        RuntimeWarning,
        stacklevel=4,
    )
    return True


def move_aside(log_dir: Path) -> Path | None:
    """Moves ``metrics.jsonl``, the event files and the run's name of ``log_dir`` into a new
    ``log_dir/previous-<k>/``; returns it (None when there is nothing to move)."""
    names = [log_dir / FILE, *log_dir.glob(_event_files.PATTERN)]
    files = [p for p in names if p.is_file()]
    if not files:
        return None
    files += [log_dir / RUN] if (log_dir / RUN).is_file() else []
    k = 1
    while True:
        dest = log_dir / f"previous-{k}"
        try:
            dest.mkdir()
            break
        except FileExistsError:
            k += 1
    for path in files:
        os.replace(path, dest / path.name)
    _checkpoint.fsync_dir(log_dir)
    return dest


def _cut_jsonl(path: Path, step: int) -> None:
    """Drops the records of ``path`` past update ``step`` (and a torn last line)."""
    if not path.exists():
        return
    text = path.read_text()
    kept = [line for line, record in _parse(path, text) if record["step"] <= step]
    new = "".join(line + "\n" for line in kept)
    if new != text:
        _replace(path, new.encode())


def _cut_events(path: Path, step: int) -> None:
    """Drops the events of an event file past update ``step`` (and a torn last record)."""
    kept = _event_files.cut(path.read_bytes(), step)
    if kept is not None:
        _replace(path, kept)


def _replace(path: Path, data: bytes) -> None:
    """Replaces ``path`` by ``data`` atomically: a kill leaves the old file or the new."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _checkpoint.fsync_dir(path.parent)


def _parse(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for each record of ``text`` (the contents of ``path``).

    A line that is not a JSON object with a ``step`` is dropped with a RuntimeWarning:
    the last one as torn by a kill mid-append, any other as damaged.
    """
    lines = text.splitlines()
    parsed = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError:
            last = i == len(lines) - 1 and not text.endswith("\n")
            why = (
                "its last line is torn (a kill mid-append)" if last else f"line {i + 1} is damaged"
            )
            warnings.warn(f"{str(path)!r}: {why}; dropped: {line[:80]!r}", RuntimeWarning,
                          stacklevel=3)  # fmt: skip
            continue
        parsed.append((line, record))
    return parsed


def read(log_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``log_dir/metrics.jsonl``, in order (a torn last line dropped, warned)."""
    path = Path(log_dir) / FILE
    return [record for _, record in _parse(path, path.read_text())]
