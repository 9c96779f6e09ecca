"""Compile options for scanfit's programs on XLA:CPU, and a ``jax.jit`` that applies them.

XLA:CPU (jax 0.10.2) runs a program's independent operations concurrently
under its "concurrency optimized" scheduler. A vmapped PPO program (gymnax
CartPole, 4 seeds, rollouts and minibatch epochs nested in the update scan)
once stalled under it in ``block_until_ready`` with every XLA thread idle, in
5 of 5 tries; compiled without that scheduler it ran 8 of 8, with the same
numbers (DESIGN.md). Later, 15 runs of such programs without the option
(examples/ppo_cartpole.py vmapped over 4 seeds: the whole run, chunks of 100
updates, with in-graph evaluation under lax.cond, PureJaxRL's own wrappers, 1
or 4 CPU devices) all finished, and the option changed neither their numbers
nor their speed: it stays, as a guard that costs nothing. It is per program (a field of
XLA's DebugOptions passed as ``jax.jit(..., compiler_options=...)``), so
scanfit sets it on its own loop programs and nowhere else: other programs in
the process, and other backends, compile as they always do.

The backend is read when a program is first called (or lowered), not at
import, so that ``jax.config`` (device counts, platforms) can still be set
after ``import scanfit``. JAX takes ``compiler_options`` on top-level programs
only: a call staged into an enclosing ``jax.jit`` (``jax.jit(jax.vmap(...))``
of ``scan_steps``, say) compiles as part of that program, which the caller
compiles, so it goes through a plain ``jax.jit``. Under ``jax.vmap`` or
``jax.grad`` alone the program is still top-level and keeps the options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

try:  # one check that the call is staged into an enclosing jit (or scan, cond...)
    from jax._src.core import unsafe_am_i_under_a_jit as _staged
except ImportError:  # pragma: no cover - another JAX: options at the top level only
    from jax._src.core import trace_state_clean

    def _staged() -> bool:
        return not trace_state_clean()


# XLA's DebugOptions field; an unknown name would fail the compile ("No such
# compile option"), so a program that compiles has it applied.
OPTIONS: dict[str, Any] = {"xla_cpu_enable_concurrency_optimized_scheduler": False}


def cpu_options(backend: str | None = None) -> dict[str, Any]:
    """The ``compiler_options`` for a scanfit loop program compiled for ``backend``.

    Args:
      backend: a platform name ("cpu", "gpu", "tpu", ...); None reads
        ``jax.default_backend()``, which initialises JAX's backends.

    Returns:
      A new dict: ``OPTIONS`` on "cpu", empty on any other backend.

    Example:
      >>> cpu_options("cpu")
      {'xla_cpu_enable_concurrency_optimized_scheduler': False}
      >>> cpu_options("gpu")
      {}
    """
    backend = jax.default_backend() if backend is None else backend
    return dict(OPTIONS) if backend == "cpu" else {}


class _Jit:
    """``jax.jit(fun, **kwargs)``, compiled with ``cpu_options`` of the backend in use."""

    def __init__(self, fun: Callable, kwargs: dict[str, Any]):
        self._fun = fun
        self._kwargs = kwargs
        # One jax.jit per backend, each with its cache; "staged": inside another jit.
        self._by_backend: dict[str, Any] = {}
        functools.update_wrapper(self, fun)

    def _jitted(self):
        backend = "staged" if _staged() else jax.default_backend()
        jitted = self._by_backend.get(backend)
        if jitted is None:
            options = None if backend == "staged" else cpu_options(backend) or None
            jitted = jax.jit(self._fun, compiler_options=options, **self._kwargs)
            self._by_backend[backend] = jitted
        return jitted

    def __call__(self, *args, **kwargs):
        return self._jitted()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """As ``jax.jit(...).lower``; the options apply when the lowered program compiles."""
        return self._jitted().lower(*args, **kwargs)

    def __getattr__(self, name: str):
        # The rest of jax.jit's surface (eval_shape, trace, _cache_size, ...), as it is.
        if name.startswith("__") or name in ("_fun", "_kwargs", "_by_backend"):
            raise AttributeError(name)
        return getattr(self._jitted(), name)


def jit(fun: Callable, **kwargs) -> Callable:
    """A drop-in for ``jax.jit`` at scanfit's loop programs: on XLA:CPU they get ``OPTIONS``.

    Args:
      fun: the function to compile.
      **kwargs: ``jax.jit``'s keyword arguments (``static_argnames``,
        ``donate_argnames``, ...), except ``compiler_options``.

    Returns:
      A callable with ``jax.jit``'s surface (``__call__``, ``lower``, ...).

    Raises:
      TypeError: ``compiler_options`` given (this function owns it).

    Example:
      >>> import jax.numpy as jnp
      >>> double = jit(lambda x: 2 * x)
      >>> double(jnp.arange(3))
      Array([0, 2, 4], dtype=int32)
    """
    if "compiler_options" in kwargs:
        raise TypeError(
            "scanfit._xla_cpu.jit sets compiler_options itself (OPTIONS on XLA:CPU); "
            f"got compiler_options={kwargs['compiler_options']!r}."
        )
    return _Jit(fun, kwargs)
