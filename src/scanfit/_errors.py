"""Typed exceptions the host raises."""

from __future__ import annotations

from typing import Any


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss, parameters or optimizer state.

    Attributes:
      step: index (0-based, counted over the whole run) of the first update
        whose loss, new parameters or new optimizer state were non-finite.
      state: the last good state, before update ``step``: a ``TrainResult``
        whose ``losses`` cover updates ``0 .. step - 1``.
    """

    def __init__(self, message: str, *, step: int, state: Any = None):
        super().__init__(message)
        self.step = step
        self.state = state


class DataExhaustedError(ValueError):
    """An iterable of microbatches ran out before an epoch was complete.

    Attributes:
      step: updates completed (and kept) before the data ran out.
      state: the state after those updates: a ``TrainResult`` whose ``losses``
        cover updates ``0 .. step - 1`` (also checkpointed).
    """

    def __init__(self, message: str, *, step: int, state: Any = None):
        super().__init__(message)
        self.step = step
        self.state = state


class CheckpointMismatchError(ValueError):
    """The newest checkpoint in ``checkpoint_dir`` belongs to another run: the message names
    what differs (the update program, initial params, data contents, key, settings)."""


class CheckpointLockedError(RuntimeError):
    """Another run holds ``checkpoint_dir``: one writer per directory."""


class CheckpointWriteError(OSError):
    """``checkpoint_dir`` cannot be written: not writable, read-only, or the disk is full.

    Attributes:
      errno: the operating system's error number (``errno.ENOSPC``, ``errno.EROFS``, ...).
      filename: the path that could not be written.
      state: when raised while saving, the trained state that could not be saved: a
        ``TrainResult`` like ``DivergenceError.state``; None when raised before training.
    """

    def __init__(self, message: str, *, errno: int | None, path: str, state: Any = None):
        super().__init__(message)
        self.errno = errno
        self.filename = path
        self.state = state

    def __str__(self) -> str:  # OSError's own would print "[Errno 28] ..." without our message
        return self.args[0]


class CheckpointWarning(UserWarning):
    """A checkpoint file is damaged or not this run's: it is skipped and left in place."""


class Preempted(KeyboardInterrupt):
    """``fit`` was asked to stop by SIGTERM (Slurm, Kubernetes and spot VMs send it before
    reclaiming a machine): the chunk in flight completed and was kept, a checkpoint was
    saved (with ``checkpoint_dir``), and the run stopped there.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it too; on many hosts
    every process raises it at the same step.

    Attributes:
      step: updates done and kept: where a rerun with the same ``checkpoint_dir`` resumes.
      checkpoint_dir: where that state was saved, or None (nothing saved: a rerun starts
        afresh).
    """

    def __init__(self, step: int, checkpoint_dir: Any = None):
        super().__init__(step, checkpoint_dir)
        self.step = step
        self.checkpoint_dir = checkpoint_dir

    def __str__(self) -> str:
        if self.checkpoint_dir is None:
            return f"preempted (SIGTERM) at update {self.step}; nothing saved (no checkpoint_dir)"
        return (
            f"preempted (SIGTERM) at update {self.step}; checkpoint saved in "
            f"{str(self.checkpoint_dir)!r}: run again to resume"
        )
