"""Typed exceptions the host raises."""

from __future__ import annotations

from typing import Any


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or parameters.

    Attributes:
      step: index (0-based, counted over the whole run) of the first update
        whose loss or new parameters were non-finite.
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
    """The newest checkpoint in ``checkpoint_dir`` belongs to another run (tree, shapes, data)."""
