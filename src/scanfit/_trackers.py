"""``fit(loggers=...)``: the records of ``metrics.jsonl`` sent to MLflow, W&B, trackio or any
object with ``log(metrics, step)`` and ``close()``.

A tracker gets each record of the metrics log as ``log({"<kind>/<name>": value}, step)``
(``chunk/loss``, ``eval/val_loss``: TensorBoard's tags), non-finite values as floats.
No step reaches a tracker twice, resumed runs included: with a
``checkpoint_dir``, a record is sent only once a checkpoint at or past its step
has landed (a run resumed from that checkpoint never makes it again), and
``log_dir/trackers.json`` notes, per tracker, the run it logs into and the last
step sent; a resumed run first sends what the metrics log holds past that step.
(A kill between a tracker's ``log`` and that note, microseconds, is not covered.)
Host code: files and the trackers' own clients.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from scanfit import _metrics_log, _observers

NAMES = ("mlflow", "wandb", "trackio")
STATE_FILE = "trackers.json"
_EXTRA = "pip install 'scanfit[trackers]'"


class Tracker(Protocol):
    """What ``loggers=`` accepts besides the names in ``NAMES``."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check(loggers: Any, log_dir: Any) -> list:
    """``loggers`` as a list of names and tracker objects; errors before training.

    Raises:
      ValueError: an unknown name, or loggers without ``log_dir``.
      TypeError: an object without ``log`` and ``close``.
      ImportError: a named tracker's package is not installed (names the extra).
    """
    if loggers is None:
        return []
    items = [loggers] if isinstance(loggers, str) or not isinstance(loggers, Sequence) else loggers
    if items and log_dir is None:
        raise ValueError(
            f"loggers={loggers!r} needs log_dir: the trackers get the records of "
            "log_dir/metrics.jsonl (and mlflow and wandb keep their runs there)."
        )
    for item in items:
        if isinstance(item, str):
            if item not in NAMES:
                raise ValueError(
                    f"loggers names one of {NAMES} or is an object with log(metrics, step) and "
                    f"close(); got {item!r}."
                )
            _import(item)
        elif not (callable(getattr(item, "log", None)) and callable(getattr(item, "close", None))):
            raise TypeError(
                "loggers must be 'mlflow', 'wandb', 'trackio' or objects with "
                f"log(metrics: dict, step: int) and close(), got {item!r}."
            )
    return list(items)


def _import(name: str) -> Any:
    module = {"mlflow": "mlflow.tracking", "wandb": "wandb", "trackio": "trackio"}[name]
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise ImportError(
            f"loggers={name!r} needs the {name} package: {_EXTRA} (or pip install {name})."
        ) from err


def as_tracker_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as a tracker gets it: ``{"<kind>/<name>": value}``."""
    kind = record["kind"]
    return {
        f"{kind}/{name}": math.nan if value is None else float(value)
        for name, value in record.items()
        if name not in ("step", "kind")
    }


def chunk_records(info, loss: bool = True) -> list[dict[str, Any]]:
    """The metrics-log records of one chunk, as metrics.jsonl holds them, in step order
    (trackers want steps ascending; an evaluation may fall before the chunk's end)."""
    found = []

    def collect(step: int, kind: str, scalars: dict[str, Any]) -> None:
        values = {k: _metrics_log._number(v) for k, v in scalars.items()}
        found.append({"step": int(step), "kind": kind, **values})

    _observers.write_records(collect, info, loss=loss)
    return sorted(found, key=lambda r: r["step"])


def _logged(log_dir: Path) -> list[dict[str, Any]]:
    """The records of ``log_dir/metrics.jsonl``, none if there is none."""
    return _metrics_log.read(log_dir) if (log_dir / _metrics_log.FILE).exists() else []


class Trackers:
    """The observer sending the metrics log's records to the trackers (a context manager).

    Args:
      loggers: as checked by ``check``.
      log_dir: the run's log directory (its metrics.jsonl, the trackers' local stores).
      start: the update the run starts from (its checkpoint's, 0 for a fresh run).
      final: ``final()`` is the step up to which records are final (the newest landed
        checkpoint's; no checkpoints: every record is final at once).
      loss: whether the run has a loss (a ``fit_steps`` step may report none).
    """

    def __init__(self, loggers: list, log_dir: Path, start: int, final: Callable[[], float],
                 loss: bool = True):  # fmt: skip
        self.dir, self.final, self.loss = Path(log_dir), final, loss
        saved = self._read_state() if start > 0 else {}
        self.sinks: list[list] = []  # [key, tracker, last step sent]
        try:
            for i, item in enumerate(loggers):
                key = item if isinstance(item, str) else f"{i}:{type(item).__name__}"
                mine = saved.get(key, {})
                tracker = _open(item, self.dir, mine.get("run")) if isinstance(item, str) else item
                self.sinks.append([key, tracker, mine.get("sent", -1)])
        except BaseException:
            self._close()
            raise
        # What the interrupted run logged past each tracker's last step, up to the start.
        logged = [r for r in _logged(self.dir) if r["step"] <= start]
        self.pending = sorted(logged, key=lambda r: r["step"])
        self._flush(start)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._flush(self.final())
        finally:
            self._close()

    def _close(self) -> None:
        for _, tracker, _ in self.sinks:
            tracker.close()

    def on_chunk(self, info, state, history) -> None:
        self.pending.extend(chunk_records(info, self.loss))
        self._flush(self.final())

    def on_end(self, state, history) -> None:
        pass  # sent in __exit__, after the last save landed (or failed)

    def _flush(self, upto: float) -> None:
        ready = [r for r in self.pending if r["step"] <= upto]
        self.pending = [r for r in self.pending if r["step"] > upto]
        for sink in self.sinks:
            _, tracker, sent = sink
            for record in ready:
                if record["step"] > sent:
                    tracker.log(as_tracker_metrics(record), record["step"])
            if ready:
                sink[2] = max(sent, max(r["step"] for r in ready))
        if ready:
            self._write_state()

    def _read_state(self) -> dict:
        path = self.dir / STATE_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def _write_state(self) -> None:
        state = {
            key: {"run": getattr(tracker, "run_id", None), "sent": sent}
            for key, tracker, sent in self.sinks
        }
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.dir / STATE_FILE)


def enter(stack, loggers: list, log_dir, start: int, saver, loss=True) -> list[Trackers]:
    """The trackers' observer, entered in ``stack`` (none without ``loggers``; only
    process 0 logs). ``saver``: the run's Checkpointer, or None (records final at once);
    ``loss``: whether the run has a loss (a ``fit_steps`` step may report none)."""
    import jax

    if not loggers or jax.process_index() != 0:
        return []
    final = saver.landed if saver is not None else (lambda: math.inf)
    return [stack.enter_context(Trackers(loggers, Path(log_dir), start, final, loss))]


def _open(name: str, log_dir: Path, run: str | None) -> Tracker:
    return {"mlflow": _MLflow, "wandb": _Wandb, "trackio": _Trackio}[name](log_dir, run)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


class _MLflow:
    """An MLflow run in the file store ``log_dir/mlruns`` (experiment "scanfit"), through
    an ``MlflowClient``: no active run is set in the process."""

    def __init__(self, log_dir: Path, run: str | None):
        tracking = _import("mlflow")
        # MLflow 3 refuses a file store unless this is set; only while the store opens.
        with _env("MLFLOW_ALLOW_FILE_STORE", "true"):
            self.client = tracking.MlflowClient(tracking_uri=(log_dir / "mlruns").as_uri())
            found = self.client.get_experiment_by_name("scanfit")
            exp = found.experiment_id if found else self.client.create_experiment("scanfit")
            self.run_id = run or self.client.create_run(exp, run_name=log_dir.name).info.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = 0  # the step orders the records; wall time would differ on a rerun
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()]
        )

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    """A W&B run in offline mode under ``log_dir/wandb`` (``wandb sync`` uploads it);
    ``wandb.init`` sets ``wandb.run`` for the process until ``close``."""

    def __init__(self, log_dir: Path, run: str | None):
        wandb = _import("wandb")
        self.run = wandb.init(
            mode="offline", dir=str(log_dir), project="scanfit", name=log_dir.name,
            id=run, resume="allow" if run else None, reinit="create_new",
            settings=wandb.Settings(silent=True),
        )  # fmt: skip
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """A trackio run in its local store (``TRACKIO_DIR``, by default
    ``~/.cache/huggingface/trackio``), project "scanfit", named after ``log_dir``."""

    def __init__(self, log_dir: Path, run: str | None):
        trackio = _import("trackio")
        self.run_id = run or f"{log_dir.name}-{os.getpid()}-{id(self):x}"
        self.run = trackio.init(
            project="scanfit", name=self.run_id, resume="allow" if run else "never",
            embed=False, auto_log_gpu=False, auto_log_cpu=False,
        )  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
