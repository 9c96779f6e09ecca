"""The host driver: the scan_train loop run as compiled chunks, with the host work around it.

Each chunk is one compiled call of ``chunk_steps`` updates (two shapes at most:
full chunks and the remainder). Between chunks the host streams the next
chunk's data, checks the finite flag carried in the graph, reports progress,
calls ``on_chunk`` and writes checkpoints; under ``nan_policy="raise"`` the next
chunk is already running meanwhile. Per-update work on the host is zero.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scanfit import (
    _adapters,
    _checkpoint,
    _checkpoint_dir,
    _checks,
    _eval,
    _fingerprint,
    _parallel,
    _progress,
    _sources,
)
from scanfit._conv import canonical_convs
from scanfit._errors import (
    CheckpointMismatchError,
    CheckpointWriteError,
    DataExhaustedError,
    DivergenceError,
)
from scanfit._loop import (
    PyTree,
    TrainResult,
    TrainState,
    eval_settings,
    finite_per_update,
    init_state,
    result_of,
    run_chunk,
)

NAN_POLICIES = ("raise", "skip", "ignore")
_STATIC = ("loss_fn", "optimizer", "accumulate", "has_aux", "unroll", "skip_nonfinite", "extended")
# After a divergence: one re-run of the chunk that flags each update, to find the first bad one.
_finite_per_update = jax.jit(canonical_convs(finite_per_update), static_argnames=_STATIC)
_CHUNK_STATIC = (*_STATIC, "evaluation", "layout", "log_every")
_chunk = jax.jit(canonical_convs(run_chunk), static_argnames=_CHUNK_STATIC)
# Donating the carry lets XLA reuse the params' buffers. With nan_policy="raise"
# the chunk's start state is kept instead, to rebuild the last good state.
_chunk_donating = jax.jit(
    canonical_convs(run_chunk), static_argnames=_CHUNK_STATIC, donate_argnames=("state",)
)


@functools.partial(jax.jit, static_argnames="optimizer")
def _fresh_state(params: PyTree, opt_state: PyTree, model_state: PyTree, optimizer) -> TrainState:
    """The initial carry in new device buffers (donating it must never delete the caller's
    arrays), ``optimizer.init(params)`` when ``opt_state`` is None: one call, not one
    dispatch per leaf."""
    if opt_state is None:
        opt_state = optimizer.init(params)
    return jax.tree.map(jnp.copy, init_state(params, opt_state, model_state))


# Dispatching chunk k+1 ahead holds one more copy of the carry; above this size (big
# models, long chunks) the memory matters more than the ~0.5 ms a boundary costs.
_SPECULATE_MAX_BYTES = 256 * 2**20


class ChunkInfo(NamedTuple):
    """What ``on_chunk`` receives after each chunk."""

    step: int  # updates done so far, counted over the whole run
    total: int  # updates in the whole run
    epoch: int  # epoch of the last update done, from 0
    elapsed: float  # seconds since this call of fit started
    losses: np.ndarray  # shape=(updates in this chunk,), this chunk's losses
    params: PyTree  # params after this chunk
    skipped: int  # updates skipped as non-finite so far


class _Flight(NamedTuple):
    """A dispatched chunk: where it started and what it returns once it completes."""

    state: TrainState  # the carry it started from (kept to rebuild the last good state)
    start: int  # updates done before it
    count: int  # updates in it
    inputs: Any  # (data, idx) it ran on
    outputs: Any  # (new_state, losses, aux, state_finite), device futures


def _fingerprint_of(
    loss_fn, optimizer, state, data, stream, *, extended, **entries
) -> dict[str, Any]:
    """What decides the result of this run, hashed (``_fingerprint``); ``entries`` are the
    run's other inputs and settings, by name (``rng``, ``accumulate`` and ``has_aux`` among
    them). An iterable's contents are hashed as they stream (``_sources.StreamSource``):
    here only its structure, shapes and length."""
    program = _update_program(
        loss_fn, optimizer, state, data, entries["rng"],
        accumulate=entries["accumulate"], has_aux=entries["has_aux"], extended=extended,
    )  # fmt: skip
    fingerprint = _fingerprint.fingerprint(
        program=program,
        params=_host(state.params),
        opt_state=_host(state.opt_state),
        model_state=_host(_keys_as_data(state.model_state)),
        data=data if stream is None else {},
        **entries,
    )
    if stream is not None:
        fingerprint["data"] = stream.fingerprint()
    elif jax.process_count() > 1:  # each process holds its share: hash all shares, everywhere
        from jax.experimental import multihost_utils

        mine = np.frombuffer(bytes.fromhex(fingerprint["data"]["sha256"]), np.uint8)
        every = np.asarray(multihost_utils.process_allgather(mine))
        fingerprint["data"]["sha256"] = hashlib.sha256(every.tobytes()).hexdigest()
    return fingerprint


def _update_program(loss_fn, optimizer, state, data, rng, **settings) -> str:
    """The text of one update as fit compiles it: the loss, the optimizer and every
    hyper-parameter they close over. Lowered on abstract values of one update's
    microbatches, so where the data lives and how long the run is leave it unchanged;
    non-finite handling is left out (it is a fingerprint entry of its own)."""
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)  # noqa: E731
    k = settings["accumulate"]
    lead = (1, k) if k > 1 else (1,)
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((*lead, *a.shape[1:]), a.dtype), data)
    return _chunk.lower(
        loss_fn=loss_fn,
        optimizer=optimizer,
        state=jax.tree.map(spec, state),
        data=one,
        idx=None,
        rng=rng,
        unroll=1,
        skip_nonfinite=False,
        **settings,
    ).as_text()


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _keys_as_data(tree: PyTree) -> PyTree:
    """Typed PRNG keys (e.g. in an NNX module's RNG streams) as their uint32 data, for saving."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _keys_from_data(like: PyTree, tree: PyTree) -> PyTree:
    """The inverse of _keys_as_data, with each key's implementation taken from ``like``."""

    def restore(old, x):
        return jax.random.wrap_key_data(x, impl=jax.random.key_impl(old)) if _is_key(old) else x

    return jax.tree.map(restore, like, tree)


# Without chunk_steps a chunk holds at most this many updates and this many bytes of
# per-update outputs: a run of 10**9 updates must neither compile as one program nor
# stack gigabytes of losses on the device before it reports anything.
_DEFAULT_CHUNK_STEPS = 2**16
_DEFAULT_CHUNK_OUTPUT_BYTES = 64 * 2**20


def _chunk_size(chunk_steps, checkpoint_every, total: int, per_update_bytes: int) -> int:
    """Updates per compiled call: ``chunk_steps``, else a bounded default (see fit)."""
    if chunk_steps is not None:
        _checks.check_stacked_outputs(
            min(chunk_steps, total), per_update_bytes, remedy="pass a smaller chunk_steps"
        )
        return min(chunk_steps, total)
    bound = min(_DEFAULT_CHUNK_STEPS, _DEFAULT_CHUNK_OUTPUT_BYTES // max(1, per_update_bytes))
    return max(1, min(total, checkpoint_every or bound, bound))


def _check_fit_settings(
    *,
    chunk_steps,
    checkpoint_dir,
    checkpoint_every,
    keep,
    nan_policy,
    skip_nonfinite,
    on_chunk,
    progress,
    resume,
) -> str:
    """Checks fit's own settings; returns the nan policy in force."""
    for name, value in (("chunk_steps", chunk_steps), ("checkpoint_every", checkpoint_every)):
        if value is not None and (not _checks._is_int(value) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}.")
    if not _checks._is_int(keep) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1 (checkpoints kept), got {keep!r}.")
    if nan_policy is not None and nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}.")
    if skip_nonfinite and nan_policy not in (None, "skip"):
        raise ValueError(
            f"skip_nonfinite=True contradicts nan_policy={nan_policy!r}: skipping means "
            "nan_policy='skip'; pass one of them."
        )
    _checks.check_bool("resume", resume)
    if on_chunk is not None and not callable(on_chunk):
        raise TypeError(f"on_chunk must be callable as on_chunk(info) or None, got {on_chunk!r}.")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (auto), got {progress!r}.")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path or None, got {checkpoint_dir!r}.")
    if (
        checkpoint_dir is not None
        and Path(checkpoint_dir).exists()
        and not Path(checkpoint_dir).is_dir()
    ):
        raise ValueError(f"checkpoint_dir {str(checkpoint_dir)!r} exists and is not a directory.")
    if skip_nonfinite:
        return "skip"
    return nan_policy or "raise"


class _History:
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

    def like(self, losses: np.ndarray, aux: PyTree, metrics: dict | None) -> _History:
        """A history of this run holding the given arrays (a checkpoint's)."""
        return _History(
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


def fit(
    loss_fn: Callable,
    params: PyTree,
    optimizer: optax.GradientTransformation | float,
    data: PyTree,
    *,
    opt_state: PyTree = None,
    epochs: int = 1,
    key: jax.Array | None = None,
    accumulate: int = 1,
    has_aux: bool = False,
    unroll: int = 1,
    skip_nonfinite: bool = False,
    model_state: PyTree = None,
    rng: jax.Array | None = None,
    eval_fn: Callable | None = None,
    eval_data: PyTree = None,
    eval_every: int | None = None,
    best: tuple[str, str] | None = None,
    patience: int | None = None,
    log_every: int | None = None,
    chunk_steps: int | None = None,
    progress: bool | None = None,
    on_chunk: Callable[[ChunkInfo], Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    resume: bool = True,
    nan_policy: str | None = None,
    mesh: Any = None,
    devices: Any = None,
    steps_per_epoch: int | None = None,
) -> TrainResult:
    """Runs the ``scan_train`` loop in compiled chunks, with checkpoints and resume.

    The result is bitwise equal (on CPU) to ``scan_train`` with the same
    arguments, whatever ``chunk_steps`` is.

    Args:
      loss_fn, params, optimizer, data, opt_state, epochs, key, accumulate,
        has_aux, unroll, skip_nonfinite, model_state, rng: as for
        ``scan_train`` (Flax NNX and Equinox modules included; the model
        state is checkpointed and resumed with the params, and replicated
        over ``mesh``, where batch statistics are those of the global batch). ``data``
        leaves may be JAX arrays (kept on the device) or NumPy arrays,
        ``np.load(..., mmap_mode="r")`` memmaps included (streamed to the
        device one chunk at a time, the next chunk's transfer overlapping the
        current chunk's compute). ``data`` may also be an iterable of
        microbatches, each a pytree of arrays of one microbatch (a generator,
        a grain or torch DataLoader with NumPy collation, ``tf.data`` as
        NumPy): see "Data from loaders" in the README. Each epoch calls
        ``iter(data)`` again (a one-shot iterator allows ``epochs=1`` only);
        ``key`` does not apply (the loader shuffles). On resume, an iterator
        with ``get_state()``/``set_state()`` (grain) is set to its saved
        state; any other is re-read past the microbatches already used in
        the current epoch (that costs reading them), which are checked
        against a hash saved with the checkpoint.
      chunk_steps: updates per compiled call; ``None``: ``checkpoint_every``
        if given, else the whole run in one call, in both cases at most
        65,536 updates and 64 MiB of per-update losses and aux per call (so
        a run of 10**9 updates reports and checkpoints as it goes).
      progress: a progress bar (rich, on stderr) updated after each chunk;
        ``None``: on when stderr is a terminal.
      on_chunk: called as ``on_chunk(info: ChunkInfo)`` after each chunk;
        returning ``False`` stops training cleanly (with a final checkpoint).
      checkpoint_dir: where to save checkpoints (``ckpt-<step>.npz``), at
        chunk boundaries and at the end. The run holds a lock on it
        (``.lock``) from start to end, and checks it is writable before
        training. Every array and the metadata are checksummed; a checkpoint
        that fails the check is skipped with a ``CheckpointWarning``, never
        loaded and never deleted.
      checkpoint_every: save when at least this many updates have passed
        since the last save; ``None``: after every chunk.
      keep: how many of this run's newest checkpoints to keep. Other files
        (damaged ones, another run's) are left in place and not counted.
      resume: continue from the newest sound checkpoint in ``checkpoint_dir``.
        It must be this run's: its fingerprint covers the update program (the
        loss and the optimizer with every setting, e.g. the learning rate),
        the initial params, optimizer state and model state, every byte of
        ``data``, ``key``, ``rng``, ``accumulate``, ``has_aux``, and the
        non-finite policy (``"raise"`` and ``"ignore"`` count as one until an
        update is non-finite). A difference raises ``CheckpointMismatchError``
        naming it. ``epochs`` may differ: the run goes on to its new end.
        Fingerprinting hashes all the data once per call (about 0.8 s per GiB
        here) and lowers one update; it is done only with ``checkpoint_dir``.
        ``False``: start afresh; the checkpoints already there are moved into
        ``checkpoint_dir/previous-<k>/`` (nothing is deleted), so a later
        resume finds this run's.
      nan_policy: ``"raise"`` (what ``None`` means, unless
        ``skip_nonfinite=True``): after a chunk with a non-finite loss,
        params or optimizer state, raise ``DivergenceError`` with the exact
        first bad update and the last good state (also checkpointed);
        ``"skip"``: skip such updates (``skip_nonfinite=True`` means the same;
        with any other policy it is a contradiction, a ValueError);
        ``"ignore"``: go on.
        Under ``"raise"`` the carry is not donated, so each chunk is
        dispatched before the host checks the one before it: the device does
        not wait on the host's checks, progress and checkpoints. (A chunk
        dispatched ahead of an early stop or a divergence still runs; its
        results are dropped.) That holds three copies of the params and
        optimizer state at a time (a chunk's start, its end, the next one's
        end), so it is done only while they take at most 256 MiB; above,
        chunks run one after the other, holding two. ``"skip"`` and
        ``"ignore"`` donate the carry and hold one.
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis: every data leaf's
        batch axis (axis 1) is sharded over it, params and optimizer state
        replicated; XLA inserts the gradient all-reduce. Across hosts (after
        ``jax.distributed.initialize()``), each process passes its own share
        of every microbatch as ``data``; process 0 writes the checkpoints.
      devices: an int n instead of ``mesh``: a 1-D ``"data"`` mesh over the
        first n local devices. The batch size must divide by it.
      steps_per_epoch: for an iterable ``data``: updates per epoch (each
        takes ``accumulate`` microbatches); required when ``len(data)`` is
        unknown, else ``len(data) // accumulate``.
      eval_fn, eval_data, eval_every, best, patience, log_every: as for
        ``scan_train``, with the same results at any ``chunk_steps``: an
        evaluation falls where the run's update count crosses a multiple of
        ``eval_every``, wherever chunks start (one compiled program per
        position of those boundaries in a chunk: pick ``chunk_steps`` a multiple
        of ``eval_every`` for one). After an early stop no further chunk is
        dispatched. ``chunk_steps`` must be a multiple of ``log_every``.

    Returns:
      A ``TrainResult``, ``losses`` covering every update of the run, resumed
      ones included.

    Raises:
      DivergenceError: ``nan_policy="raise"`` and training diverged.
      DataExhaustedError: an iterable ``data`` ran out before an epoch was
        complete; the completed chunks are kept (attached, checkpointed).
      scanfit.CheckpointMismatchError: the checkpoint in ``checkpoint_dir``
        belongs to another run.
      scanfit.CheckpointLockedError: another run holds ``checkpoint_dir``.
      scanfit.CheckpointWriteError: ``checkpoint_dir`` is not writable (before
        training), or saving failed (disk full, read-only...): the message
        names the path and the reason, the checkpoints saved before are
        intact, and the trained state is attached as ``.state``.
      ValueError, TypeError: bad arguments, as for ``scan_train`` (which
        also rejects more than 2**31 - 1 updates); ``skip_nonfinite=True``
        with a ``nan_policy`` other than ``"skip"``; ``resume`` or
        ``progress`` not a bool; a ``chunk_steps`` whose per-update outputs
        would exceed 1 GiB.
      KeyboardInterrupt: re-raised after saving the last completed chunk; its
        ``step`` attribute is the update that saved state reached.
    """
    params_in, model_state_in = params, model_state
    model = _adapters.adapt(
        loss_fn, params, model_state=_checks.check_model_state(model_state), rng=rng,
        has_aux=has_aux,
    )  # fmt: skip
    loss_fn, model_state = model.loss_fn, model.model_state
    checked, stream = _sources.open_data(
        data, key=key, accumulate=accumulate, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    params, optimizer, lr, n, key, (loss_spec, aux_spec) = _checks.check_train_args(
        loss_fn,
        model.params,
        optimizer,
        checked,
        opt_state=opt_state,
        epochs=epochs,
        key=key,
        accumulate=accumulate,
        unroll=unroll,
        has_aux=has_aux,
        model_state=model_state,
        rng=rng,
        extended=model.extended,
        skip_nonfinite=skip_nonfinite,
    )
    policy = _check_fit_settings(
        chunk_steps=chunk_steps,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        keep=keep,
        nan_policy=nan_policy,
        skip_nonfinite=skip_nonfinite,
        on_chunk=on_chunk,
        progress=progress,
        resume=resume,
    )
    mesh = _parallel.make_mesh(mesh, devices)
    if mesh is not None:
        _parallel.check_batch(checked, mesh)
        if eval_data is not None:  # evaluated whole on every device (the same on every host)
            eval_data = _parallel.put_replicated(eval_data, mesh)
    optimizer = optimizer if optimizer is not None else optax.sgd(lr)
    per_epoch = n // accumulate
    total = epochs * per_epoch
    per_update_bytes = _checks.output_bytes(loss_spec, aux_spec)
    chunk = _chunk_size(chunk_steps, checkpoint_every, total, per_update_bytes)
    evaluation = eval_settings(
        eval_fn, eval_data, eval_every=eval_every, best=best, patience=patience,
        log_every=log_every, params=params_in, model_state=model_state_in, model=model,
        updates=total,
    )  # fmt: skip
    _checks.check_log_every(log_every, total, chunk)
    source = _sources.make_source(
        data, stream, key=key, n=n, accumulate=accumulate, mesh=mesh,
        track=checkpoint_dir is not None,
    )  # fmt: skip

    empty_aux = jax.tree.map(lambda s: np.zeros((0, *s.shape), s.dtype), aux_spec)
    state = _fresh_state(params, opt_state, model_state, optimizer=optimizer)
    if evaluation is not None:
        state = state._replace(evaluation=_eval_init(evaluation, params, model_state, eval_data))
    if mesh is not None:
        state = _parallel.put_replicated(state, mesh)
    every = None if evaluation is None else evaluation.every
    log_dtype = np.result_type(loss_spec.dtype, np.float32) if log_every else loss_spec.dtype
    sizes = (total // (log_every or 1), _eval.layout(0, total, every, total).evaluations)
    empty_metrics = _empty_metrics(evaluation, params, model_state, eval_data)
    history = _History(
        np.zeros((0,), log_dtype), empty_aux, evaluation, sizes, empty_metrics, log_every, total
    )
    ckpt_dir = None if checkpoint_dir is None else _checkpoint_dir.check_path(checkpoint_dir)
    checkpoints = None  # locked from here to the end of the run
    if ckpt_dir is not None:
        checkpoints = _checkpoint_dir.CheckpointDir(
            ckpt_dir,
            keep=keep,
            writer=jax.process_index() == 0,  # one writer, whatever the hosts
        )
        with checkpoints.closing_on_error():
            fingerprint = _fingerprint_of(
                loss_fn, optimizer, state, checked, stream, extended=model.extended, key=key,
                rng=rng,
                accumulate=accumulate, has_aux=has_aux, nan_policy=policy, log_every=log_every,
                **_eval_entries(evaluation, params, model_state, eval_data),
            )  # fmt: skip
            checkpoints.differences = functools.partial(_differences, current=fingerprint)
            restored = None
            if resume:
                restored = _restore(checkpoints, state, history, total, epochs, mesh, source)
            else:
                checkpoints.move_aside()
            if restored is not None:
                state, history = restored

    def save(state: TrainState) -> None:
        if checkpoints is None or not checkpoints.writer:
            return
        step = _int(state.step)
        losses, aux, metrics = history.raw(step)
        skipped, first_bad = _host((state.skipped, state.first_nonfinite))
        try:
            checkpoints.save(
                step,
                {
                    "params": state.params,
                    "opt_state": state.opt_state,
                    "model_state": _keys_as_data(state.model_state),
                    "counters": {"skipped": skipped, "first_nonfinite": first_bad},
                    "losses": losses,
                    "aux": aux,
                    # The best state so far, the patience count and whether the run stopped.
                    "evaluation": _keys_as_data(state.evaluation),
                    "metrics": metrics,
                },
                {
                    "fingerprint": fingerprint,
                    "nonfinite_seen": bool(skipped > 0 or first_bad >= 0),
                    "epoch": step // per_epoch if per_epoch else 0,
                    "source": source.checkpoint_state(step),
                    "scanfit_version": _version(),
                },
            )
        except CheckpointWriteError as err:
            raise CheckpointWriteError(
                f"{err}. The checkpoints saved before are intact; the trained state (update "
                f"{step}) is attached as .state.",
                errno=err.errno,
                path=err.filename,
                state=model.finish(history.result(state)),
            ) from err

    static = dict(
        loss_fn=loss_fn,
        optimizer=optimizer,
        accumulate=accumulate,
        has_aux=has_aux,
        unroll=unroll,
        skip_nonfinite=policy == "skip",
        extended=model.extended,
        rng=rng,
    )
    compiled = functools.partial(
        _chunk if policy == "raise" else _chunk_donating,
        **static,
        eval_data=eval_data,
        evaluation=evaluation,
        log_every=log_every,
    )
    search = functools.partial(_finite_per_update, **static)

    def run(*, state, data, idx, start):
        count = jax.tree.leaves(data if idx is None else idx)[0].shape[0]
        lay = None if evaluation is None else _eval.layout(start, count, every, total)
        return compiled(state=state, data=data, idx=idx, layout=lay)

    # Without donation (nan_policy="raise") chunk k's outputs stay readable after chunk k+1
    # is dispatched on them, so k+1 goes out before the host waits on k: the device does not
    # idle while the host checks, reports and checkpoints. It costs a third copy of the
    # state, worth it only while a chunk boundary (~0.5 ms) weighs against the chunk.
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    speculate = policy == "raise" and state_bytes <= _SPECULATE_MAX_BYTES

    def launch(state: TrainState, start: int, inputs) -> _Flight:
        count = min(chunk, total - start)
        outputs = run(state=state, data=inputs[0], idx=inputs[1], start=start)
        return _Flight(state, start, count, inputs, outputs)

    def next_inputs(start: int):
        if start >= total:
            return None
        try:
            return source.inputs(start, min(chunk, total - start))
        except _sources.DataExhausted as err:
            return err  # raised once the chunks before it are kept

    def ran_dry(err: _sources.DataExhausted, state: TrainState) -> DataExhaustedError:
        step = _int(state.step)
        if ckpt_dir is not None and step > last_saved:
            save(state)
        message = _sources.ran_dry(
            err, step=step, accumulate=accumulate, saved=ckpt_dir is not None
        )
        return DataExhaustedError(message, step=step, state=model.finish(history.result(state)))

    t0 = time.perf_counter()
    step = _int(state.step)
    last_saved = step
    flight = None  # the chunk the host waits on next
    with (
        _progress.ChunkProgress(total, step, _progress.wanted(progress)) as bar,
        checkpoints or contextlib.nullcontext(),  # releases the directory's lock
    ):
        try:
            if step < total and _stopped_at(state) < 0:  # a stopped run stays stopped
                inputs = next_inputs(step)
                if isinstance(inputs, _sources.DataExhausted):
                    raise ran_dry(inputs, state)
                flight = launch(state, step, inputs)
            while flight is not None:
                nxt = flight.start + flight.count
                # The next chunk's transfer starts before this chunk is waited on.
                inputs = next_inputs(nxt)
                dry = inputs if isinstance(inputs, _sources.DataExhausted) else None
                inputs = None if dry else inputs
                new_state, losses, aux, state_finite, metrics = flight.outputs
                ahead = launch(new_state, nxt, inputs) if speculate and inputs is not None else None
                # One round trip for everything the host needs; it waits for the chunk.
                losses, aux, bad, state_finite, skipped = _host(
                    (losses, aux, new_state.first_nonfinite, state_finite, new_state.skipped)
                )
                bad, skipped = int(bad), int(skipped)
                if policy == "raise" and (bad >= 0 or not bool(state_finite)):
                    err = _divergence(run, search, flight, history, save, losses, ckpt_dir)
                    err.state = model.finish(err.state)
                    raise err
                state, step, flight = new_state, nxt, None
                history.add(losses, aux, metrics)
                bar.update(step, float(np.mean(losses)), skipped)
                stop = _stopped_at(new_state) >= 0  # early stopping: the carry says so
                if on_chunk is not None:
                    info = ChunkInfo(
                        step,
                        total,
                        (step - 1) // per_epoch,
                        time.perf_counter() - t0,
                        losses,
                        state.params,
                        skipped,
                    )
                    stop = (on_chunk(info) is False) or stop
                if ckpt_dir is not None and (
                    stop
                    or step == total
                    or checkpoint_every is None
                    or step - last_saved >= checkpoint_every
                ):
                    save(state)
                    last_saved = step
                if stop:
                    break  # a chunk dispatched ahead is dropped
                if dry is not None:
                    raise ran_dry(dry, state)
                if ahead is None and inputs is not None:
                    ahead = launch(state, step, inputs)
                flight = ahead
        except KeyboardInterrupt as interrupt:
            if flight is not None:  # the chunk waited on: keep it if it completes cleanly
                new_state, losses, aux, state_finite, metrics = flight.outputs
                clean = policy != "raise" or (
                    _int(new_state.first_nonfinite) < 0 and bool(_host(state_finite))
                )
                if clean:
                    state = new_state
                    history.add(losses, aux, metrics)
            if _int(state.step) > last_saved:
                save(state)
            interrupt.step = _int(state.step)  # where a rerun resumes (the CLI says so)
            raise
        finally:
            source.close()
    if policy == "skip" and total and _int(state.skipped) == total:
        warnings.warn(
            f"every update of this run ({total} of {total}) was skipped as non-finite "
            "(nan_policy='skip'): params are unchanged. Check the loss at the initial params, "
            "the learning rate, or the dtype (float16 overflows above 65504).",
            RuntimeWarning,
            stacklevel=2,
        )
    return model.finish(history.result(state))


_host = _parallel.to_host


@functools.partial(jax.jit, static_argnames="spec")
def _eval_init(spec, params, model_state, eval_data):
    return _eval.init(spec, params, model_state, eval_data)


def _stopped_at(state: TrainState) -> int:
    """The update at which early stopping ended the run, -1 while running or without eval.

    Read after the chunk's own fetch, so the chunk is done: no extra wait.
    """
    return -1 if state.evaluation is None else _int(state.evaluation.stopped_at)


def _int(x) -> int:
    return int(_host(x))


def _version() -> str:
    from scanfit import __version__

    return __version__


def _differences(meta: dict[str, Any], *, current: dict[str, Any]) -> list[str]:
    """How a checkpoint's run differs from this one (``_fingerprint.differences``)."""
    saved = meta.get("fingerprint")
    if not isinstance(saved, dict):
        return ["it holds no fingerprint"]
    # "raise" and "ignore" compile the same program: until an update is non-finite they are
    # the same run ("skip" compiles another, which rounds differently).
    policies = {saved.get("nan_policy"), current["nan_policy"]}
    same = policies <= {"raise", "ignore"} and not meta.get("nonfinite_seen", True)
    return _fingerprint.differences(saved, current, ignore=("nan_policy",) if same else ())


def _restore(checkpoints, state, history, total, epochs, mesh, source):
    """(state, history) from the newest checkpoint that verifies, or None if there is none.

    Damaged checkpoints are skipped with a warning; if the newest sound one belongs to
    another run (or lies past this one's end), that is an error, never a silent restart.
    """
    for found in checkpoints.verified():
        where = f"the newest checkpoint in {str(checkpoints.path)!r} (step {found.step})"
        if found.differences:
            raise CheckpointMismatchError(
                f"{where} belongs to another run: " + "; ".join(found.differences) + ". Pass "
                "another checkpoint_dir, or resume=False to start afresh (the checkpoints "
                "there are then moved into previous-<k>/, nothing is deleted)."
            )
        if found.step > total:
            raise CheckpointMismatchError(
                f"the newest checkpoint in {str(checkpoints.path)!r} is at update {found.step}, "
                f"past the {total} updates of this run (epochs={epochs})."
            )
        try:
            restored = _unpack(found.step, found.arrays, state, history, mesh)
        except _checkpoint.Unusable as err:
            checkpoints.reject(found.path, str(err))
            continue
        source.restore(found.meta.get("source"), found.step)  # an iterable's position
        return restored
    return None


def _unpack(step, arrays, state, history, mesh):
    """The saved arrays as (TrainState, _History); ``_checkpoint.Unusable`` if they do not
    fit this run or hold counters no run can reach. ``state`` and ``history`` are the
    fresh ones of this run: the structures to fill."""
    like = {"skipped": state.skipped, "first_nonfinite": state.first_nonfinite}
    counters = _checkpoint.unflatten("counters", like, arrays)
    skipped, first_bad = int(counters["skipped"]), int(counters["first_nonfinite"])
    if not (0 <= skipped <= step and -1 <= first_bad < step):
        raise _checkpoint.Unusable(
            f"its counters are out of range for update {step}: skipped={skipped}, "
            f"first_nonfinite={first_bad}"
        )
    rows, evaluations = history.rows(step)
    losses = arrays.get("losses")
    if losses is None or losses.shape != (rows,):
        shape = None if losses is None else losses.shape
        raise _checkpoint.Unusable(f"its losses have shape {shape}, not ({rows},)")
    empty_losses, empty_aux, empty_metrics = history.raw()
    aux = _checkpoint.unflatten("aux", empty_aux, arrays, rows=rows)
    metrics = None
    if empty_metrics is not None:
        metrics = _checkpoint.unflatten("metrics", empty_metrics, arrays, rows=evaluations)

    def as_device(like, prefix):  # PRNG keys (NNX RNG streams) are saved as their data
        saved = _checkpoint.unflatten(prefix, _keys_as_data(like), arrays)
        return _keys_from_data(like, jax.tree.map(jnp.asarray, saved))

    restored = TrainState(
        as_device(state.params, "params"),
        as_device(state.opt_state, "opt_state"),
        as_device(state.model_state, "model_state"),
        jnp.asarray(step, jnp.int32),
        jnp.asarray(skipped, jnp.int32),
        jnp.asarray(first_bad, jnp.int32),
        as_device(state.evaluation, "evaluation"),
    )
    if mesh is not None:
        restored = _parallel.put_replicated(restored, mesh)
    return restored, history.like(losses, aux, metrics)


def _empty_metrics(evaluation, params, model_state, eval_data) -> dict | None:
    """The run's evaluations as zero-length arrays: ``{name: (0,), "step": (0,)}``."""
    if evaluation is None:
        return None
    shapes = jax.eval_shape(
        functools.partial(_eval.evaluate, evaluation), params, model_state, eval_data
    )
    empty = {name: np.zeros((0,), s.dtype) for name, s in shapes.items()}
    return {**empty, "step": np.zeros((0,), np.int32)}


def _eval_entries(evaluation, params, model_state, eval_data) -> dict[str, Any]:
    """Fingerprint entries of the evaluation: its settings, its program and its data."""
    if evaluation is None:
        return {}
    program = (
        jax.jit(functools.partial(_eval.evaluate, evaluation))
        .lower(params, model_state, eval_data)
        .as_text()
    )
    return {
        "eval_settings": repr((evaluation.every, evaluation.best, evaluation.patience)),
        "eval_program": _fingerprint.program_digest(program),
        "eval_data": _host(eval_data),
    }


def _divergence(run, search, flight: _Flight, history, save, losses, ckpt_dir):
    """Finds the chunk's first bad update and rebuilds the last good state before it.

    The loop checks only losses per update and the whole state once per chunk,
    so the culprit may be any update of the chunk (a param the loss ignores
    can go non-finite long before the loss does). One re-run of the chunk
    flags every update; a second, cut before the first bad one, gives the
    last good state: two compilations at most, whatever the chunk length.
    """
    data, idx = flight.inputs
    ok = np.asarray(_host(search(state=flight.state, data=data, idx=idx)))
    # Every update flagged finite cannot happen on a deterministic device; keep a sane cut.
    bad = flight.start + (int(np.argmin(ok)) if not ok.all() else flight.count - 1)
    good_count = bad - flight.start
    if good_count == 0:
        good_state = flight.state
    else:
        # Cut by index on the host: slicing device arrays would compile once per leaf.
        # A chunk's own microbatches (idx None) are rows 0..C-1 of it, whatever accumulate.
        rows = np.arange(good_count) if idx is None else np.asarray(idx)[:good_count]
        good_state, good_losses, good_aux, _, good_metrics = run(
            state=flight.state,
            data=data,
            idx=jax.device_put(rows.astype(np.int32)),
            start=flight.start,
        )
        history.add(good_losses, good_aux, good_metrics)
    save(good_state)
    where = f" and saved in {str(ckpt_dir)!r}" if ckpt_dir is not None else ""
    loss = float(losses[good_count])
    return DivergenceError(
        f"training diverged at update {bad}: its loss was {loss} and/or its new params or "
        f"optimizer state were non-finite. The last good state, before update {bad}, is "
        f"attached as .state{where}. Lower the learning rate, clip gradients "
        "(optax.clip_by_global_norm), or pass nan_policy='skip' to skip such updates.",
        step=bad,
        state=history.result(good_state),
    )
