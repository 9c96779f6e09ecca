"""The chunk loop of ``fit``: dispatch chunk k+1, collect chunk k, hand it to the observers.

A run is a sequence of compiled calls of ``chunk`` updates (``Program``). While
chunk k computes, the host already holds chunk k+1's inputs; under
``nan_policy="raise"`` (no donation) chunk k+1 is even dispatched before the
host waits on chunk k. After each chunk the host fetches its losses, aux,
evaluations and flags in one round trip, checks for divergence, and hands a
``ChunkInfo`` to each observer (progress bar, metrics log, checkpointer, the
user's ``on_chunk``); any of them, or early stopping in the carry, ends the run.
Per-update work on the host is zero.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from scanfit import _eval, _parallel, _sources, _xla_cpu
from scanfit._conv import canonical_convs
from scanfit._loop import TrainResult, result_of
from scanfit._scan import PyTree, TrainState, finite_per_update, run_chunk
from scanfit._sharding import Shardings, keeping_shardings

_STATIC = ("step", "unroll")  # step: the step factory (_scan.Step), static
# After a divergence: one re-run of the chunk that flags each update, to find the first bad one.
_finite_per_update = _xla_cpu.jit(canonical_convs(finite_per_update), static_argnames=_STATIC)
_CHUNK_STATIC = (*_STATIC, "evaluation", "layout", "log_every", "shardings")
_run_chunk = keeping_shardings(run_chunk)  # a sharded carry stays in its shardings
_chunk = _xla_cpu.jit(canonical_convs(_run_chunk), static_argnames=_CHUNK_STATIC)
# Donating the carry lets XLA reuse the params' buffers. With nan_policy="raise"
# the chunk's start state is kept instead, to rebuild the last good state.
_chunk_donating = _xla_cpu.jit(
    canonical_convs(_run_chunk), static_argnames=_CHUNK_STATIC, donate_argnames=("state",)
)

# Dispatching chunk k+1 ahead holds one more copy of the carry; above this size (big
# models, long chunks) the memory matters more than the ~0.5 ms a boundary costs.
_SPECULATE_MAX_BYTES = 256 * 2**20

_host = _parallel.to_host


def _int(x) -> int:
    return int(_host(x))


class ChunkInfo(NamedTuple):
    """What ``on_chunk`` (and every observer) receives after each chunk.

    Its arrays are the chunk's own. Under ``nan_policy="skip"`` or ``"ignore"``
    the carry is donated to the next chunk, so ``params``, ``opt_state`` and
    ``model_state`` are valid until ``on_chunk`` returns: copy them
    (``jax.tree.map(jnp.copy, info.params)``) to keep them. Under ``"raise"``
    they stay valid. ``losses``, ``aux`` and ``metrics`` are NumPy copies.
    """

    step: int  # updates done so far, counted over the whole run
    total: int  # updates in the whole run
    epoch: int  # epoch of the last update done, from 0
    elapsed: float  # seconds since this call of fit started
    losses: np.ndarray  # shape=(updates in this chunk,) (or log groups), this chunk's losses
    params: PyTree  # params after this chunk
    skipped: int  # updates skipped as non-finite so far
    aux: PyTree = None  # has_aux: the mean of each aux leaf over this chunk's updates
    metrics: dict | None = None  # this chunk's evaluations: {name: (evaluations,), "step": ...}
    opt_state: PyTree = None  # optimizer state after this chunk
    model_state: PyTree = None  # model state after this chunk (None without one)

    @property
    def state(self) -> PyTree:
        """``fit_steps``: the step's state after this chunk (there ``aux`` holds the mean of
        each metric over the chunk)."""
        return self.params


class Observer(Protocol):
    """What the driver hands each chunk to. None of them knows the others."""

    def on_chunk(self, info: ChunkInfo, state: TrainState, history: History) -> bool | None:
        """After each chunk; returning False stops the run (after this chunk). Raising
        KeyboardInterrupt (``Preempted``) ends it as Ctrl-C does, this chunk kept."""

    def on_end(self, state: TrainState, history: History) -> None:
        """Once, with the last state kept: at the end, a stop, a divergence, Ctrl-C."""


class _Flight(NamedTuple):
    """A dispatched chunk: where it started and what it returns once it completes."""

    state: TrainState  # the carry it started from (kept to rebuild the last good state)
    start: int  # updates done before it
    count: int  # updates in it
    inputs: Any  # (data, idx) it ran on
    outputs: Any  # (new_state, losses, aux, state_finite, metrics), device futures


class History:
    """Per-update losses and aux (and evaluations) gathered on the host, chunk by chunk."""

    def __init__(
        self,
        losses: np.ndarray,
        aux: PyTree,
        evaluation=None,
        sizes=(0, 0),
        metrics: dict | None = None,
        log_every: int | None = None,
        total: int = 0,
    ):
        self.losses = [losses]
        self.aux = [aux]
        self.metrics: list = [] if metrics is None else [metrics]
        self.evaluation = evaluation
        self.sizes = sizes  # (logged losses, evaluations) of the whole run, to pad after a stop
        self.log_every = log_every
        self.total = total  # updates in the whole run

    def like(self, losses: np.ndarray, aux: PyTree, metrics: dict | None) -> History:
        """A history of this run holding the given arrays (a checkpoint's)."""
        return History(
            losses, aux, self.evaluation, self.sizes, metrics, self.log_every, self.total
        )

    def rows(self, step: int) -> tuple[int, int]:
        """(logged losses, evaluations) of the first ``step`` updates of the run."""
        every = None if self.evaluation is None else self.evaluation.every
        evaluations = _eval.layout(0, step, every, self.total).evaluations if step else 0
        return -(-step // (self.log_every or 1)), evaluations  # a stop may end a log group

    def raw(self, step: int | None = None) -> tuple[np.ndarray, PyTree, dict | None]:
        """(losses, aux, metrics) so far, unpadded, up to update ``step``: what a checkpoint
        holds. (An early stop ends a chunk at ``step``; the chunk reported past it.)"""
        losses = np.concatenate(self.losses)
        aux = jax.tree.map(lambda *a: np.concatenate(a), *self.aux)
        metrics = None
        if self.metrics:
            metrics = jax.tree.map(lambda *m: np.concatenate(m), *self.metrics)
        if step is not None:
            n, evaluations = self.rows(step)
            losses, aux = losses[:n], jax.tree.map(lambda a: a[:n], aux)
            metrics = jax.tree.map(lambda m: m[:evaluations], metrics)
        return losses, aux, metrics

    def add(self, losses: np.ndarray, aux: PyTree, metrics: Any = None) -> None:
        self.losses.append(_host(losses))
        self.aux.append(_host(aux))
        if metrics is not None:
            self.metrics.append(_host(metrics))

    def result(self, state: TrainState) -> TrainResult:
        losses, aux, metrics = self.raw()
        if self.evaluation is not None and metrics is not None:  # after a stop, pad as scan_train
            losses = _eval.pad(losses, self.sizes[0])
            aux = jax.tree.map(lambda a: _eval.pad(a, self.sizes[0]), aux)
            metrics = jax.tree.map(lambda m: jax.device_put(_eval.pad(m, self.sizes[1])), metrics)
        # jax.device_put: a transfer; jnp.asarray would compile per shape
        return result_of(
            state, jax.device_put(losses), jax.device_put(aux), metrics, self.evaluation
        )


class Program:
    """The compiled chunk program of one run, and how its chunks are launched."""

    def __init__(self, *, policy, total, chunk, evaluation, eval_data, log_every, **static):
        self.policy, self.total, self.chunk, self.evaluation = policy, total, chunk, evaluation
        self.compiled = functools.partial(
            _chunk if policy == "raise" else _chunk_donating,
            **static,
            eval_data=eval_data,
            evaluation=evaluation,
            log_every=log_every,
        )
        self.search = functools.partial(_finite_per_update, **static)

    def speculates(self, state: TrainState) -> bool:
        """Whether chunk k+1 goes out before the host waits on chunk k.

        Without donation (nan_policy="raise") chunk k's outputs stay readable after
        chunk k+1 is dispatched on them, so the device does not idle while the host
        checks, reports and checkpoints. It costs a third copy of the state, worth it
        only while a chunk boundary (~0.5 ms) weighs against the chunk.
        """
        state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
        return self.policy == "raise" and state_bytes <= _SPECULATE_MAX_BYTES

    def run(self, *, state, data, idx, start):
        """Updates ``start ..`` on ``(data, idx)``, evaluations where the run has them."""
        count = jax.tree.leaves(data if idx is None else idx)[0].shape[0]
        every = None if self.evaluation is None else self.evaluation.every
        lay = None if every is None else _eval.layout(start, count, every, self.total)
        shardings = Shardings.of_arrays(state)
        return self.compiled(state=state, data=data, idx=idx, layout=lay, shardings=shardings)

    def launch(self, state: TrainState, start: int, inputs) -> _Flight:
        count = min(self.chunk, self.total - start)
        outputs = self.run(state=state, data=inputs[0], idx=inputs[1], start=start)
        return _Flight(state, start, count, inputs, outputs)


def _with_state(err: Exception, state: TrainState) -> Exception:
    err.state = state  # the last state kept, for the error fit raises
    return err


def stopped_at(state: TrainState) -> int:
    """The update at which early stopping ended the run, -1 while running or without eval.

    Read after the chunk's own fetch, so the chunk is done: no extra wait.
    """
    return -1 if state.evaluation is None else _int(state.evaluation.stopped_at)


class Diverged(Exception):
    """Raised by ``drive``: update ``step`` was non-finite; ``state`` is the last good one,
    and the history holds the updates before it."""

    def __init__(self, step: int, loss: float, state: TrainState):
        super().__init__(step)
        self.step, self.loss, self.state = step, loss, state


def drive(
    program: Program,
    source,
    state: TrainState,
    history: History,
    observers: Sequence[Observer],
    *,
    per_epoch: int,
) -> TrainState:
    """Runs the chunks from ``state.step`` to the end (or a stop); returns the last state.

    Raises:
      Diverged: nan_policy="raise" and an update was non-finite; the observers have
        seen ``on_end`` with the last good state.
      _sources.DataExhausted: an iterable ran dry; ``on_end`` saw the chunks before.
      KeyboardInterrupt: with ``.step``, after ``on_end`` with the last clean chunk.
    """
    total, t0 = program.total, time.perf_counter()

    def next_inputs(start: int):
        if start >= total:
            return None
        try:
            return source.inputs(start, min(program.chunk, total - start))
        except _sources.DataExhausted as err:
            return err  # raised once the chunks before it are kept

    flight, speculate = None, program.speculates(state)
    try:
        step = _int(state.step)
        if step < total and stopped_at(state) < 0:  # a stopped run stays stopped
            inputs = next_inputs(step)
            if isinstance(inputs, _sources.DataExhausted):
                raise _with_state(inputs, state)
            flight = program.launch(state, step, inputs)
        while flight is not None:
            nxt = flight.start + flight.count
            # The next chunk's transfer starts before this chunk is waited on.
            inputs = next_inputs(nxt)
            dry = inputs if isinstance(inputs, _sources.DataExhausted) else None
            inputs = None if dry else inputs
            new_state, losses, aux, state_finite, metrics = flight.outputs
            ahead = program.launch(new_state, nxt, inputs) if speculate and inputs else None
            # One round trip for everything the host needs; it waits for the chunk.
            losses, aux, metrics, bad, state_finite, skipped = _host(
                (losses, aux, metrics, new_state.first_nonfinite, state_finite, new_state.skipped)
            )
            if program.policy == "raise" and (int(bad) >= 0 or not bool(state_finite)):
                bad, state, loss = _divergence(program, flight, history, losses)
                raise Diverged(bad, loss, state)
            state, start, flight = new_state, flight.start, None
            history.add(losses, aux, metrics)
            halt = stopped_at(state)  # early stopping: the carry says so
            end = nxt if halt < 0 else halt  # a stop skips the chunk's updates after it
            done = history.rows(end)[0] - history.rows(start)[0]  # rows of the updates done
            info = ChunkInfo(
                end, total, (end - 1) // per_epoch, time.perf_counter() - t0, losses[:done],
                state.params, int(skipped), jax.tree.map(lambda a, n=done: a[:n].mean(0), aux),
                metrics, state.opt_state, state.model_state,
            )  # fmt: skip
            stop = halt >= 0
            for observer in observers:
                stop = (observer.on_chunk(info, state, history) is False) or stop
            if stop:
                break  # a chunk dispatched ahead is dropped
            if dry is not None:
                raise _with_state(dry, state)
            if ahead is None and inputs is not None:
                ahead = program.launch(state, nxt, inputs)
            flight = ahead
    except KeyboardInterrupt as interrupt:
        if flight is not None:  # the chunk waited on: keep it if it completes cleanly
            new_state, losses, aux, state_finite, metrics = flight.outputs
            clean = program.policy != "raise" or (
                _int(new_state.first_nonfinite) < 0 and bool(_host(state_finite))
            )
            if clean:
                state = new_state
                history.add(losses, aux, metrics)
        interrupt.step = _int(state.step)  # where a rerun resumes (the CLI says so)
        raise
    finally:
        source.close()
        for observer in observers:
            observer.on_end(state, history)
    return state


def _divergence(program: Program, flight: _Flight, history: History, losses) -> tuple:
    """Finds the chunk's first bad update and rebuilds the last good state before it.

    The loop checks only losses per update and the whole state once per chunk,
    so the culprit may be any update of the chunk (a param the loss ignores
    can go non-finite long before the loss does). One re-run of the chunk
    flags every update; a second, cut before the first bad one, gives the
    last good state: two compilations at most, whatever the chunk length.
    Returns ``(bad, good_state, loss)``; ``history`` gains the good updates.
    """
    data, idx = flight.inputs
    ok = np.asarray(_host(program.search(state=flight.state, data=data, idx=idx)))
    # Every update flagged finite cannot happen on a deterministic device; keep a sane cut.
    bad = flight.start + (int(np.argmin(ok)) if not ok.all() else flight.count - 1)
    good_count = bad - flight.start
    if good_count == 0:
        good_state = flight.state
    else:
        # Cut by index on the host: slicing device arrays would compile once per leaf.
        # A chunk's own microbatches (idx None) are rows 0..C-1 of it, whatever accumulate.
        rows = np.arange(good_count) if idx is None else np.asarray(idx)[:good_count]
        good_state, good_losses, good_aux, _, good_metrics = program.run(
            state=flight.state,
            data=data,
            idx=jax.device_put(rows.astype(np.int32)),
            start=flight.start,
        )
        history.add(good_losses, good_aux, good_metrics)
    return bad, good_state, float(losses[good_count])
