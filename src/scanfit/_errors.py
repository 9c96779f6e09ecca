"""Errors a user can cause, raised in Python before anything is traced."""

from __future__ import annotations

from typing import Any

import numpy as np


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


def describe(value: Any) -> str:
    """A short description of ``value`` for an error message: shape and dtype, or its type."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"an array of shape {tuple(shape)} and dtype {dtype}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"{value!r} of type {type(value).__name__}"


def check_numeric(name: str, value: Any) -> None:
    """Raise TypeError unless ``value`` is a number or a numeric array (bool excluded)."""
    try:
        dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
    except (TypeError, ValueError):  # ragged lists, objects NumPy cannot convert
        dtype = None
    if dtype is None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(
            f"{name} must be a real number or an array of real numbers, got {describe(value)}."
        )


def check_scalar(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is 0-d (a Python number, NumPy or JAX scalar)."""
    check_numeric(name, value)
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar (shape ()), got {describe(value)}.")
