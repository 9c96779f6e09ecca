"""The host driver: the scan_train loop run as compiled chunks, with the host work around it.

Each chunk is one compiled call of ``chunk_steps`` updates (two shapes at most:
full chunks and the remainder). Between chunks the host streams the next
chunk's data, checks the finite flag carried in the graph, reports progress,
calls ``on_chunk`` and writes checkpoints; under ``nan_policy="raise"`` the next
chunk is already running meanwhile. Per-update work on the host is zero.
"""

from __future__ import annotations

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

from scanfit import _adapters, _checkpoint, _checks, _eval, _parallel, _progress
from scanfit._errors import CheckpointMismatchError, DivergenceError
from scanfit._loop import (
    PyTree,
    TrainResult,
    TrainState,
    epoch_order,
    eval_settings,
    init_state,
    result_of,
    run_chunk,
)

NAN_POLICIES = ("raise", "skip", "ignore")
_STATIC = ("loss_fn", "optimizer", "accumulate", "has_aux", "unroll", "skip_nonfinite", "extended")
_STATIC += ("evaluation", "layout", "log_every")
_chunk = jax.jit(run_chunk, static_argnames=_STATIC)
# Donating the carry lets XLA reuse the params' buffers. With nan_policy="raise"
# the chunk's start state is kept instead, to rebuild the last good state.
_chunk_donating = jax.jit(run_chunk, static_argnames=_STATIC, donate_argnames=("state",))


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

# The host-side epoch orders must equal scan_train's in-graph ones bitwise: same function.
_epoch_order = jax.jit(epoch_order, static_argnames="n")


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
    outputs: Any  # (new_state, losses, aux, params_finite), device futures


class _Source:
    """Where each chunk's microbatches come from.

    JAX arrays stay on the device and each update gathers its microbatches
    in-graph by index. NumPy arrays (memmaps included) stay on the host: the
    host gathers one chunk at a time and transfers it, so the device holds
    about two chunks, never the whole dataset.
    """

    def __init__(self, data: PyTree, key, n: int, accumulate: int, mesh):
        self.mesh = mesh
        multi_process = mesh is not None and _parallel._processes(mesh) > 1
        self.on_device = not multi_process and all(
            isinstance(a, jax.Array) for a in jax.tree.leaves(data)
        )
        if self.on_device and mesh is not None:
            data = _parallel.put_batches(data, mesh, batch_axis=1)
        self.data = data
        self.key = key
        self.n = n
        self.k = accumulate
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray | None:
        if self.key is None:
            return None
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = np.asarray(_epoch_order(self.key, epoch, n=self.n))
        return self._orders[epoch]

    def rows(self, start: int, count: int) -> tuple[np.ndarray | slice, ...]:
        """Microbatch rows of updates [start, start + count), one piece per epoch touched."""
        per_epoch = self.n // self.k
        pieces = []
        update, end = start, start + count
        while update < end:
            epoch, pos = divmod(update, per_epoch)
            stop = min(end, (epoch + 1) * per_epoch)
            lo, hi = pos * self.k, (pos + stop - update) * self.k
            order = self._order(epoch)
            pieces.append(slice(lo, hi) if order is None else order[lo:hi])
            update = stop
        return tuple(pieces)

    def inputs(self, start: int, count: int):
        """(data, idx) for run_chunk: device data with indices, or the chunk's own data."""
        rows = self.rows(start, count)
        shape = (count, self.k) if self.k > 1 else (count,)  # as group() lays out updates
        if self.on_device:
            idx = np.concatenate(
                [np.arange(r.start, r.stop) if isinstance(r, slice) else r for r in rows]
            )
            # A plain transfer: jnp.asarray(idx, jnp.int32) would also dispatch a convert op.
            return self.data, jax.device_put(idx.astype(np.int32).reshape(shape))

        def gather(a):
            # Slices read a memmap sequentially; index arrays read it row by row.
            block = np.concatenate([a[r] for r in rows]) if len(rows) > 1 else a[rows[0]]
            return block.reshape(*shape, *a.shape[1:])

        chunk = jax.tree.map(gather, self.data)
        if self.mesh is not None:
            return _parallel.put_batches(chunk, self.mesh, batch_axis=len(shape)), None
        return jax.device_put(chunk), None


def _data_digest(data: PyTree) -> str:
    """A cheap content check: the bytes of the first and last microbatch of every leaf."""
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(data):
        h.update(np.ascontiguousarray(np.asarray(leaf[:1])).tobytes())
        h.update(np.ascontiguousarray(np.asarray(leaf[-1:])).tobytes())
    return h.hexdigest()


def _fingerprint(
    params, opt_state, model_state, data, *, key, rng, accumulate, has_aux
) -> dict[str, Any]:
    return {
        "params": _checkpoint.spec(params),
        "opt_state": _checkpoint.spec(opt_state),
        "model_state": _checkpoint.spec(model_state),
        "rng": _key_list(rng),
        "data": {**_checkpoint.spec(data), "content_sha1": _data_digest(data)},
        "accumulate": accumulate,
        "has_aux": has_aux,
        "key": _key_list(key),
    }


def _key_list(key) -> list | None:
    return None if key is None else np.asarray(jax.random.key_data(key)).tolist()


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


def _check_fit_settings(
    *,
    chunk_steps,
    checkpoint_dir,
    checkpoint_every,
    keep,
    nan_policy,
    on_chunk,
    progress,
) -> None:
    for name, value in (("chunk_steps", chunk_steps), ("checkpoint_every", checkpoint_every)):
        if value is not None and (not _checks._is_int(value) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}.")
    if not _checks._is_int(keep) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1 (checkpoints kept), got {keep!r}.")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}.")
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


class _History:
    """Per-update losses and aux gathered on the host, chunk by chunk."""

    def __init__(self, losses: np.ndarray, aux: PyTree, evaluation=None, sizes=(0, 0)):
        self.losses = [losses]
        self.aux = [aux]
        self.metrics: list = []
        self.evaluation = evaluation
        self.sizes = sizes  # (logged losses, evaluations) of the whole run, to pad after a stop

    def add(self, losses: np.ndarray, aux: PyTree, metrics: Any = None) -> None:
        self.losses.append(_host(losses))
        self.aux.append(_host(aux))
        if metrics is not None:
            self.metrics.append(_host(metrics))

    def result(self, state: TrainState) -> TrainResult:
        losses = np.concatenate(self.losses)
        aux = jax.tree.map(lambda *a: np.concatenate(a), *self.aux)
        metrics = None
        if self.evaluation is not None and self.metrics:  # after a stop, pad as scan_train does
            losses = _eval.pad(losses, self.sizes[0])
            aux = jax.tree.map(lambda a: _eval.pad(a, self.sizes[0]), aux)
            metrics = jax.tree.map(lambda *m: np.concatenate(m), *self.metrics)
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
    chunk_steps: int | None = None,
    progress: bool | None = None,
    on_chunk: Callable[[ChunkInfo], Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    resume: bool = True,
    nan_policy: str = "raise",
    mesh: Any = None,
    devices: Any = None,
    eval_fn: Callable | None = None,
    eval_data: PyTree = None,
    eval_every: int | None = None,
    best: tuple[str, str] | None = None,
    patience: int | None = None,
    log_every: int | None = None,
) -> TrainResult:
    """Runs the ``scan_train`` loop in compiled chunks, with checkpoints and resume.

    The result is bitwise equal (on CPU) to ``scan_train`` with the same
    arguments, whatever ``chunk_steps`` is.

    Args:
      loss_fn, params, optimizer, data, opt_state, epochs, key, accumulate,
        has_aux, unroll, skip_nonfinite: as for ``scan_train``. ``data``
        leaves may be JAX arrays (kept on the device) or NumPy arrays,
        ``np.load(..., mmap_mode="r")`` memmaps included (streamed to the
        device one chunk at a time, the next chunk's transfer overlapping the
        current chunk's compute).
      chunk_steps: updates per compiled call; ``None``: ``checkpoint_every``
        if given, else the whole run in one call.
      progress: a progress bar (rich, on stderr) updated after each chunk;
        ``None``: on when stderr is a terminal.
      on_chunk: called as ``on_chunk(info: ChunkInfo)`` after each chunk;
        returning ``False`` stops training cleanly (with a final checkpoint).
      checkpoint_dir: where to save checkpoints (``ckpt-<step>.npz``), at
        chunk boundaries and at the end.
      checkpoint_every: save when at least this many updates have passed
        since the last save; ``None``: after every chunk.
      keep: how many of the newest checkpoints to keep.
      resume: continue from the newest valid checkpoint in ``checkpoint_dir``.
        A checkpoint of another run (other tree, shapes or data) is an error.
      nan_policy: ``"raise"``: after a chunk with a non-finite loss, gradient
        or params, raise ``DivergenceError`` with the exact first bad update
        and the last good state (also checkpointed); ``"skip"``: skip such
        updates (``skip_nonfinite=True`` means the same); ``"ignore"``: go on.
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
      scanfit.CheckpointMismatchError: the checkpoint in ``checkpoint_dir``
        belongs to another run.
      ValueError, TypeError: bad arguments, as for ``scan_train``.
      KeyboardInterrupt: re-raised after saving the last completed chunk.
    """
    params_in, model_state_in = params, model_state
    model = _adapters.adapt(
        loss_fn, params, model_state=_checks.check_model_state(model_state), rng=rng,
        has_aux=has_aux,
    )  # fmt: skip
    loss_fn, model_state = model.loss_fn, model.model_state
    params, optimizer, lr, n, key, (loss_spec, aux_spec) = _checks.check_train_args(
        loss_fn,
        model.params,
        optimizer,
        data,
        opt_state=opt_state,
        epochs=epochs,
        key=key,
        accumulate=accumulate,
        unroll=unroll,
        has_aux=has_aux,
        model_state=model_state,
        rng=rng,
        extended=model.extended,
    )
    _check_fit_settings(
        chunk_steps=chunk_steps,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        keep=keep,
        nan_policy=nan_policy,
        on_chunk=on_chunk,
        progress=progress,
    )
    mesh = _parallel.make_mesh(mesh, devices)
    if mesh is not None:
        _parallel.check_batch(data, mesh)
        if eval_data is not None:  # evaluated whole on every device (the same on every host)
            eval_data = _parallel.put_replicated(eval_data, mesh)
    optimizer = optimizer if optimizer is not None else optax.sgd(lr)
    policy = "skip" if skip_nonfinite else nan_policy
    per_epoch = n // accumulate
    total = epochs * per_epoch
    chunk = max(1, min(chunk_steps or checkpoint_every or total, total))
    evaluation = eval_settings(
        eval_fn, eval_data, eval_every=eval_every, best=best, patience=patience,
        log_every=log_every, params=params_in, model_state=model_state_in, model=model,
        updates=total,
    )  # fmt: skip
    _checks.check_log_every(log_every, total, chunk)
    source = _Source(data, key, n, accumulate, mesh)

    empty_aux = jax.tree.map(lambda s: np.zeros((0, *s.shape), s.dtype), aux_spec)
    state = _fresh_state(params, opt_state, model_state, optimizer=optimizer)
    if evaluation is not None:
        state = state._replace(evaluation=_eval_init(evaluation, params, model_state, eval_data))
    if mesh is not None:
        state = _parallel.put_replicated(state, mesh)
    every = None if evaluation is None else evaluation.every
    log_dtype = np.result_type(loss_spec.dtype, np.float32) if log_every else loss_spec.dtype
    sizes = (total // (log_every or 1), _eval.layout(0, total, every, total).evaluations)
    history = _History(np.zeros((0,), log_dtype), empty_aux, evaluation, sizes)
    ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    fingerprint = None  # only checkpoints need it: hashing data costs ~0.4 ms a call
    if ckpt_dir is not None:
        fingerprint = _fingerprint(
            params,
            state.opt_state,
            model_state,
            data,
            key=key,
            rng=rng,
            accumulate=accumulate,
            has_aux=has_aux,
        )
    if ckpt_dir is not None and ckpt_dir.is_dir():
        _checkpoint.clean_temporaries(ckpt_dir)
        if resume:
            restored = _restore(ckpt_dir, fingerprint, state, empty_aux, total, epochs, mesh)
            if restored is not None and evaluation is not None:
                raise NotImplementedError(
                    f"resuming a run with eval_fn from {str(ckpt_dir)!r} is not supported yet: "
                    "its checkpoints do not hold the best state and patience count. Pass "
                    "resume=False or another checkpoint_dir."
                )
            if restored is not None:
                state, history = restored

    def save(state: TrainState) -> None:
        if ckpt_dir is None or jax.process_index() != 0:  # one writer, whatever the hosts
            return
        step = _int(state.step)
        result = history.result(state)
        _checkpoint.save(
            ckpt_dir,
            step,
            {
                "params": state.params,
                "opt_state": state.opt_state,
                "model_state": _keys_as_data(state.model_state),
                "counters": {"skipped": state.skipped, "first_nonfinite": state.first_nonfinite},
                "losses": result.losses,
                "aux": result.aux,
            },
            {
                "fingerprint": fingerprint,
                "epoch": step // per_epoch if per_epoch else 0,
                "scanfit_version": _version(),
            },
            keep,
        )

    compiled = functools.partial(
        _chunk if policy == "raise" else _chunk_donating,
        loss_fn=loss_fn,
        optimizer=optimizer,
        accumulate=accumulate,
        has_aux=has_aux,
        unroll=unroll,
        skip_nonfinite=policy == "skip",
        extended=model.extended,
        rng=rng,
        eval_data=eval_data,
        evaluation=evaluation,
        log_every=log_every,
    )

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
        return source.inputs(start, min(chunk, total - start)) if start < total else None

    t0 = time.perf_counter()
    step = _int(state.step)
    last_saved = step
    flight = None  # the chunk the host waits on next
    with _progress.ChunkProgress(total, step, _progress.wanted(progress)) as bar:
        try:
            if step < total:
                flight = launch(state, step, next_inputs(step))
            while flight is not None:
                nxt = flight.start + flight.count
                # The next chunk's transfer starts before this chunk is waited on.
                inputs = next_inputs(nxt)
                new_state, losses, aux, params_finite, metrics = flight.outputs
                ahead = launch(new_state, nxt, inputs) if speculate and inputs is not None else None
                # One round trip for everything the host needs; it waits for the chunk.
                losses, aux, bad, params_finite, skipped = _host(
                    (losses, aux, new_state.first_nonfinite, params_finite, new_state.skipped)
                )
                bad, skipped = int(bad), int(skipped)
                if policy == "raise" and bad < 0 and not bool(params_finite):
                    bad = nxt  # the last update's loss was finite, its new params are not
                if policy == "raise" and bad >= 0:
                    err = _divergence(
                        run, flight.state, flight.inputs, flight.start, bad, history, save,
                        losses, ckpt_dir,
                    )  # fmt: skip
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
                if ahead is None and inputs is not None:
                    ahead = launch(state, step, inputs)
                flight = ahead
        except KeyboardInterrupt:
            if flight is not None:  # the chunk waited on: keep it if it completes cleanly
                new_state, losses, aux, params_finite, metrics = flight.outputs
                clean = policy != "raise" or (
                    _int(new_state.first_nonfinite) < 0 and bool(_host(params_finite))
                )
                if clean:
                    state = new_state
                    history.add(losses, aux, metrics)
            if _int(state.step) > last_saved:
                save(state)
            raise
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


def _restore(ckpt_dir, fingerprint, state, empty_aux, total, epochs, mesh):
    found = _checkpoint.newest_valid(ckpt_dir)
    if found is None:
        return None
    meta, arrays = found
    diffs = _checkpoint.differences(meta["fingerprint"], fingerprint)
    if diffs:
        raise CheckpointMismatchError(
            f"the newest checkpoint in {str(ckpt_dir)!r} (step {meta['step']}) belongs to another "
            "run: " + "; ".join(diffs) + ". Use another checkpoint_dir, or resume=False to "
            "start afresh (its checkpoints are then replaced as the new run saves)."
        )
    step = meta["step"]
    if step > total:
        raise CheckpointMismatchError(
            f"the newest checkpoint in {str(ckpt_dir)!r} is at update {step}, past the "
            f"{total} updates of this run (epochs={epochs})."
        )

    def as_device(like, prefix):
        # NumPy saves ml_dtypes arrays (bfloat16) as raw void bytes: view them back.
        def restore(old, saved):
            return jnp.asarray(saved.view(old.dtype) if saved.dtype.kind == "V" else saved)

        return jax.tree.map(restore, like, _checkpoint.unflatten(prefix, like, arrays))

    try:
        counters = _checkpoint.unflatten(
            "counters",
            {"skipped": state.skipped, "first_nonfinite": state.first_nonfinite},
            arrays,
        )
        model_state = _keys_from_data(
            state.model_state, as_device(_keys_as_data(state.model_state), "model_state")
        )
        restored = TrainState(
            as_device(state.params, "params"),
            as_device(state.opt_state, "opt_state"),
            model_state,
            jnp.asarray(step, jnp.int32),
            jnp.asarray(counters["skipped"]),
            jnp.asarray(counters["first_nonfinite"]),
        )
        aux = (
            _checkpoint.unflatten("aux", empty_aux, arrays)
            if jax.tree.leaves(empty_aux)
            else empty_aux
        )
        losses = arrays["losses"]
    except KeyError as err:  # a fingerprint that matches over arrays that do not
        raise CheckpointMismatchError(
            f"the newest checkpoint in {str(ckpt_dir)!r} (step {step}) has no array {err}: "
            f"it was written by scanfit {meta.get('scanfit_version')!r} or edited since. "
            "Use another checkpoint_dir, or resume=False to start afresh."
        ) from None
    if mesh is not None:
        restored = _parallel.put_replicated(restored, mesh)
    return restored, _History(losses, aux)


def _divergence(run, start_state, inputs, start, bad, history, save, losses, ckpt_dir):
    """Re-runs the chunk from its start up to the bad update to recover the last good state.

    ``bad`` is the first update with a non-finite loss (or one past the chunk if
    only the final params are non-finite). The loop checks losses only, so if
    the params before ``bad`` are already non-finite, the culprit is an earlier
    update whose loss was still finite: step back until the state is finite.
    """
    data, idx = inputs
    while True:
        good_count = bad - start
        if good_count == 0:
            good_state, good_losses, good_aux = start_state, losses[:0], None
            break
        cut = lambda a, n=good_count: a[:n]  # noqa: E731
        good_state, good_losses, good_aux, params_finite, good_metrics = run(
            state=start_state,
            data=jax.tree.map(cut, data) if idx is None else data,
            idx=None if idx is None else cut(idx),
            start=start,
        )
        if bool(_host(params_finite)):
            break
        bad -= 1
    if good_count:
        history.add(good_losses, good_aux, good_metrics)
    save(good_state)
    where = f" and saved in {str(ckpt_dir)!r}" if ckpt_dir is not None else ""
    loss = float(losses[bad - start]) if bad - start < len(losses) else float("nan")
    return DivergenceError(
        f"training diverged at update {bad}: its loss was {loss} and/or its new params were "
        f"non-finite. The last good state, before update {bad}, is "
        f"attached as .state{where}. Lower the learning rate, clip gradients "
        "(optax.clip_by_global_norm), or pass nan_policy='skip' to skip such updates.",
        step=bad,
        state=history.result(good_state),
    )
