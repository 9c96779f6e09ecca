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

from scanfit import _adapters, _checkpoint, _checks, _parallel, _progress, _sources
from scanfit._errors import CheckpointMismatchError, DataExhaustedError, DivergenceError
from scanfit._loop import PyTree, TrainResult, TrainState, init_state, run_chunk

NAN_POLICIES = ("raise", "skip", "ignore")
_STATIC = ("loss_fn", "optimizer", "accumulate", "has_aux", "unroll", "skip_nonfinite", "extended")
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

    def __init__(self, losses: np.ndarray, aux: PyTree):
        self.losses = [losses]
        self.aux = [aux]

    def add(self, losses: np.ndarray, aux: PyTree) -> None:
        self.losses.append(_host(losses))
        self.aux.append(_host(aux))

    def result(self, state: TrainState) -> TrainResult:
        losses = np.concatenate(self.losses)
        aux = jax.tree.map(lambda *a: np.concatenate(a), *self.aux)
        return TrainResult(
            state.params,
            state.opt_state,
            jax.device_put(losses),  # a transfer; jnp.asarray would compile per shape
            jax.device_put(aux),
            state.skipped,
            state.first_nonfinite,
            state.model_state,
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
    steps_per_epoch: int | None = None,
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
      steps_per_epoch: for an iterable ``data``: updates per epoch (each
        takes ``accumulate`` microbatches); required when ``len(data)`` is
        unknown, else ``len(data) // accumulate``.

    Returns:
      A ``TrainResult``, ``losses`` covering every update of the run, resumed
      ones included.

    Raises:
      DivergenceError: ``nan_policy="raise"`` and training diverged.
      DataExhaustedError: an iterable ``data`` ran out before an epoch was
        complete; the completed chunks are kept (attached, checkpointed).
      scanfit.CheckpointMismatchError: the checkpoint in ``checkpoint_dir``
        belongs to another run.
      ValueError, TypeError: bad arguments, as for ``scan_train``.
      KeyboardInterrupt: re-raised after saving the last completed chunk.
    """
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
        _parallel.check_batch(checked, mesh)
    optimizer = optimizer if optimizer is not None else optax.sgd(lr)
    policy = "skip" if skip_nonfinite else nan_policy
    per_epoch = n // accumulate
    total = epochs * per_epoch
    chunk = max(1, min(chunk_steps or checkpoint_every or total, total))
    source = _sources.make_source(
        data,
        stream,
        key=key,
        n=n,
        accumulate=accumulate,
        mesh=mesh,
        track=checkpoint_dir is not None,
    )

    empty_aux = jax.tree.map(lambda s: np.zeros((0, *s.shape), s.dtype), aux_spec)
    state = _fresh_state(params, opt_state, model_state, optimizer=optimizer)
    if mesh is not None:
        state = _parallel.put_replicated(state, mesh)
    history = _History(np.zeros((0,), loss_spec.dtype), empty_aux)
    ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    fingerprint = None  # only checkpoints need it: hashing data costs ~0.4 ms a call
    if ckpt_dir is not None:
        fingerprint = _fingerprint(
            params,
            state.opt_state,
            model_state,
            data if stream is None else {},
            key=key,
            rng=rng,
            accumulate=accumulate,
            has_aux=has_aux,
        )
        if stream is not None:  # contents hashed as they stream: see _sources.StreamSource
            fingerprint["data"] = stream.fingerprint()
    if ckpt_dir is not None and ckpt_dir.is_dir():
        _checkpoint.clean_temporaries(ckpt_dir)
        if resume:
            restored = _restore(
                ckpt_dir, fingerprint, state, empty_aux, total, epochs, mesh, source
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
                "source": source.checkpoint_state(step),
                "scanfit_version": _version(),
            },
            keep,
        )

    run = functools.partial(
        _chunk if policy == "raise" else _chunk_donating,
        loss_fn=loss_fn,
        optimizer=optimizer,
        accumulate=accumulate,
        has_aux=has_aux,
        unroll=unroll,
        skip_nonfinite=policy == "skip",
        extended=model.extended,
        rng=rng,
    )
    # Without donation (nan_policy="raise") chunk k's outputs stay readable after chunk k+1
    # is dispatched on them, so k+1 goes out before the host waits on k: the device does not
    # idle while the host checks, reports and checkpoints. It costs a third copy of the
    # state, worth it only while a chunk boundary (~0.5 ms) weighs against the chunk.
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    speculate = policy == "raise" and state_bytes <= _SPECULATE_MAX_BYTES

    def launch(state: TrainState, start: int, inputs) -> _Flight:
        count = min(chunk, total - start)
        return _Flight(state, start, count, inputs, run(state=state, data=inputs[0], idx=inputs[1]))

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
    with _progress.ChunkProgress(total, step, _progress.wanted(progress)) as bar:
        try:
            if step < total:
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
                new_state, losses, aux, params_finite = flight.outputs
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
                history.add(losses, aux)
                bar.update(step, float(np.mean(losses)), skipped)
                stop = False
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
                    stop = on_chunk(info) is False
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
        except KeyboardInterrupt:
            if flight is not None:  # the chunk waited on: keep it if it completes cleanly
                new_state, losses, aux, params_finite = flight.outputs
                clean = policy != "raise" or (
                    _int(new_state.first_nonfinite) < 0 and bool(_host(params_finite))
                )
                if clean:
                    state = new_state
                    history.add(losses, aux)
            if _int(state.step) > last_saved:
                save(state)
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


def _int(x) -> int:
    return int(_host(x))


def _version() -> str:
    from scanfit import __version__

    return __version__


def _restore(ckpt_dir, fingerprint, state, empty_aux, total, epochs, mesh, source):
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
    source.restore(meta.get("source"), step)
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
        good_state, good_losses, good_aux, params_finite = run(
            state=start_state,
            data=jax.tree.map(cut, data) if idx is None else data,
            idx=None if idx is None else cut(idx),
        )
        if bool(_host(params_finite)):
            break
        bad -= 1
    if good_count:
        history.add(good_losses, good_aux)
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
