"""The seed exercise: N gradient-descent updates of sum((w*x - y)**2) inside lax.scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scanfit._checks import check_learning_rate, check_numeric, check_scalar, describe
from scanfit._conv import canonical_convs


def _loss(w: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum((w * x - y) ** 2)


_grad = jax.grad(_loss)


@jax.jit
@canonical_convs  # no conv in this loss; kept so every scanfit program goes through it
def _scan_sgd(w: jax.Array, lr: jax.Array, x_batches: jax.Array, y_batches: jax.Array):
    # Promote inside the trace: casting outside costs four dispatches (~100 us) per call,
    # a fifth of the whole run at N=1e4, B=32.
    dtype = jnp.result_type(float, w, lr, x_batches, y_batches)
    w, lr, x_batches, y_batches = (jnp.asarray(v, dtype) for v in (w, lr, x_batches, y_batches))

    def step(w, batch):
        x, y = batch  # lax.scan hands the body (x_batches[i], y_batches[i])
        g = _grad(w, x, y)
        return w - lr * g, None  # lr is captured from the enclosing scope

    w_final, _ = lax.scan(step, w, (x_batches, y_batches))
    return w_final


def scan_training_step(w, lr, x_batches, y_batches) -> jax.Array:
    """Runs N gradient-descent updates of ``sum((w*x - y)**2)`` in one ``lax.scan``.

    Update ``i`` uses microbatch ``(x_batches[i], y_batches[i])``:
    ``w <- w - lr * d/dw sum((w * x - y) ** 2)``. The carry is ``w``; the xs are
    the microbatches stacked on axis 0. Works under ``jax.jit``, ``jax.vmap``
    and ``jax.grad``.

    Args:
      w: initial weight, a scalar (Python number, NumPy or JAX 0-d array).
      lr: learning rate, a scalar.
      x_batches: inputs, shape ``(N, B)``: N microbatches of B samples.
      y_batches: targets, shape ``(N, B)``.

    Returns:
      The final ``w``, a 0-d array. Its dtype is the floating type the inputs
      promote to: float64 when x64 is enabled and an input is float64, else
      float32 (integer inputs are promoted to float). With ``N == 0`` it is
      ``w`` unchanged.

    Raises:
      ValueError: ``w`` or ``lr`` is not a scalar; ``lr`` is not positive
        and finite (checked unless traced); ``x_batches`` or ``y_batches``
        is not 2-D; their shapes differ.
      TypeError: an argument is not numeric.

    Example:
      >>> import jax.numpy as jnp
      >>> import scanfit
      >>> x = jnp.ones((100, 8))
      >>> w = scanfit.scan_training_step(0.0, 0.05, x, 3.0 * x)
      >>> round(float(w), 4)
      3.0
    """
    # Nested lists become NumPy arrays; Python scalars stay weakly typed.
    w, lr, x_batches, y_batches = (
        np.asarray(v) if isinstance(v, (list, tuple)) else v for v in (w, lr, x_batches, y_batches)
    )
    check_scalar("w", w)
    check_scalar("lr", lr)
    check_learning_rate("lr", lr)
    for name, value in (("x_batches", x_batches), ("y_batches", y_batches)):
        check_numeric(name, value)
        if np.ndim(value) != 2:
            raise ValueError(
                f"{name} must be 2-D with shape (N, B) = (microbatches, batch size), "
                f"got {describe(value)}."
            )
    if np.shape(x_batches) != np.shape(y_batches):
        raise ValueError(
            "x_batches and y_batches must have the same shape (N, B), got "
            f"x_batches.shape={np.shape(x_batches)} and y_batches.shape={np.shape(y_batches)}."
        )
    return _scan_sgd(w, lr, x_batches, y_batches)
