"""Preemption: SIGTERM stops a run at the next chunk boundary, with that chunk saved.

Slurm, Kubernetes and spot VMs send SIGTERM some seconds before they reclaim a
machine. For the length of a run, ``Preemption`` (a context manager, and the
last observer of the chunk loop) turns SIGTERM into a flag. After the next
chunk completes and every other observer has seen it, it raises
``Preempted``: the driver's interrupt path keeps that chunk and the
checkpointer's ``on_end`` saves it, exactly as for Ctrl-C. A signal handler
that raised at once would instead land anywhere, a checkpoint write included.

On many hosts every process must stop at the same chunk, or those that go on
wait forever in the next collective:

- under JAX's preemption service (on by default after
  ``jax.distributed.initialize()``), JAX's own handler catches SIGTERM and
  ``reached_preemption_sync_point`` names the boundary where all stop; the
  signal is left to JAX (replacing its handler would blind it);
- otherwise each process's flag is all-gathered at every boundary, a
  collective of a few bytes per chunk, only with several processes.
"""

from __future__ import annotations

import itertools
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from scanfit._errors import Preempted
from scanfit._parallel import to_host

# JAX's sync point is a call count that must grow by one per call, process-wide (the
# service agrees on "the fastest process's count + 1"): one count per chunk boundary.
_boundaries = itertools.count()


def _jax_sync_point() -> bool | None:
    """Whether all processes reached JAX's preemption sync point at this boundary; None
    where JAX's preemption service is off (no ``jax.distributed``, or switched off)."""
    if not jax.distributed.is_initialized():
        return None
    try:
        return multihost_utils.reached_preemption_sync_point(next(_boundaries))
    except RuntimeError:  # initialized with jax_enable_preemption_service=False
        return None


class Preemption:
    """SIGTERM during a run: the run stops after the chunk in flight, saved; an observer.

    Entered around the chunk loop: it installs a SIGTERM handler that only sets a
    flag, on the main thread only (Python lets no other thread set handlers: from
    another thread SIGTERM keeps its meaning, and only the other hosts' preemption is
    followed). A process that ignores SIGTERM (``SIG_IGN``), or whose handler was not
    set from Python, is left as it is. The previous handler is restored on exit,
    whatever ends the run.

    Args:
      checkpoint_dir: where the run saves, for ``Preempted.checkpoint_dir`` (or None).
    """

    def __init__(self, checkpoint_dir: Any = None):
        self.checkpoint_dir = checkpoint_dir
        self.received = False  # a SIGTERM reached this process during the run
        self._jax = False  # JAX's preemption service decides
        self._reached = False  # its sync point was reached before the first boundary
        self._previous: Any = None  # the handler replaced, restored on exit
        self._step: int | None = None  # the run's last step, seen by on_end

    def __enter__(self) -> Preemption:
        reached = _jax_sync_point()
        self._jax, self._reached = reached is not None, bool(reached)
        if not self._jax and threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            if previous not in (signal.SIG_IGN, None):
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        # A SIGTERM after the last boundary: the run is complete and saved; the process
        # is still asked to stop. (One that came with another error lets that error go.)
        if self.received and exc is None:
            raise Preempted(self._step, self.checkpoint_dir)

    def requested(self) -> bool:
        """Whether to stop at this chunk boundary: the same answer on every process.

        Called at every boundary on every process (each call may be a collective).
        """
        if self._jax:
            reached, self._reached = self._reached or bool(_jax_sync_point()), False
            return reached
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.int32(self.received))
            return bool(np.any(flags))
        return self.received

    def on_chunk(self, info, state, history) -> None:
        if self.requested():
            raise Preempted(info.step, self.checkpoint_dir)

    def on_end(self, state, history) -> None:
        self._step = int(to_host(state.step))
