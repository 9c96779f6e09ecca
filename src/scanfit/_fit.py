"""fit: the scan_train loop run as compiled chunks, with the host work around it.

``fit`` validates its arguments and wires the parts: a data source
(``_sources``), the compiled chunk program and the chunk loop (``_driver``),
and the observers that see each chunk (``_observers``: progress bar, metrics
log, the user's ``on_chunk``; ``_checkpointer``). Per-update work on the host
is zero.
"""

from __future__ import annotations

import contextlib
import functools
import os
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
    _checkpoint_dir,
    _checkpointer,
    _checks,
    _compile_cache,
    _driver,
    _eval,
    _nonfinite,
    _observers,
    _parallel,
    _preempt,
    _sharding,
    _sources,
    _trackers,
)
from scanfit._driver import ChunkInfo, History
from scanfit._errors import DataExhaustedError, DivergenceError
from scanfit._loop import OptaxStep, TrainResult, eval_settings
from scanfit._scan import PyTree, TrainState, init_state

NAN_POLICIES = ("raise", "skip", "ignore")
__all__ = ["ChunkInfo", "fit"]


@functools.partial(jax.jit, static_argnames=("optimizer", "shardings"))
def _fresh_state(
    params: PyTree, opt_state: PyTree, model_state: PyTree, optimizer, shardings=None
) -> TrainState:
    """The initial carry in new device buffers (donating it must never delete the caller's
    arrays), ``optimizer.init(params)`` when ``opt_state`` is None: one call, not one
    dispatch per leaf. ``shardings``: the ``_sharding.Shardings`` of sharded (params,
    opt_state, model_state), where the optimizer and model state are created in shards."""
    if opt_state is None:
        opt_state = optimizer.init(params)
    if shardings is not None:
        params, opt_state, model_state = shardings.constrain((params, opt_state, model_state))
    return jax.tree.map(jnp.copy, init_state(params, opt_state, model_state))


# Without chunk_steps a chunk holds at most this many updates and this many bytes of
# per-update outputs: a run of 10**9 updates must neither compile as one program nor
# stack gigabytes of losses on the device before it reports anything.
_DEFAULT_CHUNK_STEPS = 2**16
_DEFAULT_CHUNK_OUTPUT_BYTES = 64 * 2**20


def _chunk_size(chunk_steps, checkpoint_every, total: int, output_spec) -> int:
    """Updates per compiled call: ``chunk_steps``, else a bounded default (see fit).

    ``output_spec``: the shapes and dtypes of one update's (loss, aux).
    """
    per_update_bytes = _checks.output_bytes(*output_spec)
    if chunk_steps is not None:
        _checks.check_stacked_outputs(
            min(chunk_steps, total), per_update_bytes, remedy="pass a smaller chunk_steps"
        )
        return min(chunk_steps, total)
    bound = min(_DEFAULT_CHUNK_STEPS, _DEFAULT_CHUNK_OUTPUT_BYTES // max(1, per_update_bytes))
    return max(1, min(total, checkpoint_every or bound, bound))


def check_fit_settings(
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
    log_dir=None,
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
    if log_dir is not None and (not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir)):
        raise TypeError(f"log_dir must be a non-empty path or None, got {log_dir!r}.")
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


@_checks.integer_settings
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
    log_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    resume: bool = True,
    nan_policy: str | None = None,
    mesh: Any = None,
    devices: Any = None,
    steps_per_epoch: int | None = None,
    restore_best: bool = False,
    compile_cache: str | os.PathLike | None = None,
    loggers: Any = None,
    param_sharding: Any = None,
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
        ``key`` does not apply (the loader shuffles). Every microbatch the
        run takes, over all epochs, is chained into a hash saved with each
        checkpoint; on resume the iterable is read again from its start up to
        the checkpoint and checked against it (that costs reading them), or
        an iterator with ``get_state()``/``set_state()`` (grain) is set to
        its state one chunk before the checkpoint and that chunk checked.
      chunk_steps: updates per compiled call; ``None``: ``checkpoint_every``
        if given, else the whole run in one call, in both cases at most
        65,536 updates and 64 MiB of per-update losses and aux per call (so
        a run of 10**9 updates reports and checkpoints as it goes).
      progress: a progress bar (rich, on stderr) updated after each chunk;
        ``None``: on when stderr is a terminal.
      on_chunk: called as ``on_chunk(info: ChunkInfo)`` after each chunk;
        returning ``False`` stops training cleanly (with a final checkpoint).
      log_dir: a directory for the metrics log: ``metrics.jsonl`` gets one
        JSON object per chunk (``step``, mean ``loss``, the mean of each aux
        leaf, ``learning_rate`` where the optimizer state exposes it, e.g.
        ``optax.inject_hyperparams``) and one per evaluation (its metrics);
        with ``tensorboardX`` installed (the ``tensorboard`` extra), the same
        scalars go to TensorBoard event files there. Each record is written
        when logged (a killed run keeps it). After an early stop the last
        chunk record is at ``stopped_at``, its means over the updates done.
        A new run (from update 0: no checkpoint to resume, or
        ``resume=False``) first moves the ``metrics.jsonl`` and event files
        of an earlier run there into ``log_dir/previous-<k>/`` (nothing is
        deleted; TensorBoard shows each as a run). A resumed run drops what
        the interrupted one logged past its checkpoint, rewriting both logs
        atomically (written aside, fsynced, renamed: a kill leaves the old
        or the new, never a short file), so each (tag, step) is logged once
        and the log equals an uninterrupted run's (a log another run wrote
        there since is moved aside instead, with a ``RuntimeWarning``). A last
        line torn by a kill is dropped with a ``RuntimeWarning`` naming the file.
      checkpoint_dir: where to save checkpoints (``ckpt-<step>.npz``), at
        chunk boundaries and at the end. The run holds a lock on it
        (``.lock``) from start to end, and checks it is writable before
        training. Every array and the metadata are checksummed; a checkpoint
        that fails the check is skipped with a ``CheckpointWarning``, never
        loaded and never deleted. Each checkpoint is hashed and written on a
        host thread while the next chunk computes (at most one in flight;
        ``fit`` returns once the last has landed); ``scanfit.load`` reads
        the newest back.
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
        Params and model state equal to those the newest checkpoint holds (its
        last update's or best evaluation's: an NNX module this run trained in
        place, passed again) continue that run.
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
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` and/or an ``"fsdp"``
        axis: every data leaf's batch axis (axis 1) is sharded over them,
        params and optimizer state replicated unless placed on the mesh or
        sharded by ``param_sharding``; XLA inserts the gradient all-reduce (or
        the all-gathers and reduce-scatters of sharded params). Across hosts
        (after ``jax.distributed.initialize()``), each process passes its own
        share of every microbatch as ``data``; process 0 writes the
        checkpoints, and each process its own shards of arrays split over
        several processes.
      devices: an int n instead of ``mesh``: a 1-D ``"data"`` mesh over the
        first n local devices. The batch size must divide by it.
      steps_per_epoch: for an iterable ``data``: updates per epoch (each
        takes ``accumulate`` microbatches); required when ``len(data)`` is
        unknown, else ``len(data) // accumulate``.
      loggers: trackers that get the records of ``log_dir``'s metrics log (required
        with them): ``"mlflow"`` (an MLflow run in the file store
        ``log_dir/mlruns``), ``"wandb"`` (an offline W&B run under ``log_dir``),
        ``"trackio"`` (a run in trackio's local store), or objects with
        ``log(metrics: dict, step: int)`` and ``close()``; one or a list. Each
        gets ``{"<kind>/<name>": value}`` (``chunk/loss``, ``eval/val_loss``) per
        record. With ``checkpoint_dir`` a record is sent once a checkpoint at or
        past its step has landed, so a resumed run never sends a step twice.
        The packages are in the ``trackers`` extra.
      param_sharding: how params (and with them the optimizer state) are
        sharded over the mesh (FSDP): ``None`` (as given: params placed on the
        mesh as ``NamedSharding`` stay so, as do NNX params made under
        ``nnx.with_partitioning``; others are replicated), ``"fsdp"`` (each
        leaf split along its largest dimension that the mesh's ``"fsdp"``
        axis, or ``"data"`` where it has none, divides; leaves under 1024
        elements replicated), a pytree of ``PartitionSpec`` matching params,
        or a function ``(path, leaf) -> PartitionSpec``. Needs ``mesh=`` or
        ``devices=`` (or params already on a mesh). The batch is sharded over
        the mesh's ``"data"`` and ``"fsdp"`` axes.
      eval_fn, eval_data, eval_every, best, patience, log_every: as for
        ``scan_train``, with the same results at any ``chunk_steps``: an
        evaluation falls where the run's update count crosses a multiple of
        ``eval_every``, wherever chunks start (one compiled program per
        position of those boundaries in a chunk: pick ``chunk_steps`` a multiple
        of ``eval_every`` for one). After an early stop no further chunk is
        dispatched. ``chunk_steps`` must be a multiple of ``log_every``.
      restore_best: as for ``scan_train``: with ``best``, ``res.params`` and
        ``res.model_state`` (and an NNX module, in place) end at the best
        evaluation, an Equinox module's ``res.params`` is the best module.
        Checkpoints hold the last update's state as always (and the best
        one); calling ``fit`` again with the NNX module so left resumes.
      compile_cache: a directory for JAX's persistent compilation cache (created if
        missing): every program this call compiles is written there (process 0
        writes, all read), and a rerun, a resume after preemption included, reads
        them back instead of compiling (it still traces and lowers them). Global
        while ``fit`` runs: JAX's cache settings (``jax_compilation_cache_dir``,
        ``jax_enable_compilation_cache``, ``jax_persistent_cache_min_compile_time_secs``
        set to 0, ``jax_persistent_cache_min_entry_size_bytes`` to -1) apply to every
        compilation in the process, any thread's; they are restored afterwards and
        JAX's cache object reset, so the process's own cache, if any, is used again
        from its next compilation. Trust the directory as you trust code: JAX loads
        executables from it.

    SIGTERM (what Slurm, Kubernetes and spot VMs send before reclaiming a machine)
    is handled like Ctrl-C, but at a chunk boundary: the chunk in flight completes,
    every observer sees it, it is checkpointed, and ``Preempted`` is raised. Its
    handler is installed for the run only, from the main thread only (from another
    thread SIGTERM keeps its meaning), not over ``SIG_IGN``, and the previous one is
    restored whatever ends the run. On many hosts every process stops at the same
    chunk: under JAX's preemption service (on by default after
    ``jax.distributed.initialize()``) at JAX's preemption sync point, which JAX
    sets asynchronously, possibly a chunk or more after the signal; else at the
    first boundary after it, agreed by an all-gather of each process's flag.

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
        intact, and the trained state is attached as ``.state`` (raised at
        the chunk boundary after the failed save, or at the end).
      ValueError, TypeError: bad arguments, as for ``scan_train`` (which
        also rejects more than 2**31 - 1 updates); ``skip_nonfinite=True``
        with a ``nan_policy`` other than ``"skip"``; ``resume`` or
        ``progress`` not a bool; a ``chunk_steps`` whose per-update outputs
        would exceed 1 GiB.
      KeyboardInterrupt: re-raised after saving the last completed chunk; its
        ``step`` attribute is the update that saved state reached.
      scanfit.Preempted: a ``KeyboardInterrupt`` after SIGTERM; ``.step`` (the
        update a rerun resumes from) and ``.checkpoint_dir``. A SIGTERM that comes
        after the last chunk boundary raises it as ``fit`` returns; one that comes
        with another error lets that error through.
    """
    cache_dir = _compile_cache.check_dir(compile_cache)
    params_in, model_state_in = params, model_state
    _adapters.check_restore_best(restore_best, best)
    model = _adapters.adapt(
        loss_fn, params, model_state=_checks.check_model_state(model_state), rng=rng,
        has_aux=has_aux,
    )  # fmt: skip
    loss_fn, model_state = model.loss_fn, model.model_state
    checked, stream = _sources.open_data(
        data, key=key, accumulate=accumulate, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    params, optimizer, lr, n, key, output_spec = _checks.check_train_args(
        loss_fn, model.params, optimizer, checked, opt_state=opt_state, epochs=epochs, key=key,
        accumulate=accumulate, unroll=unroll, has_aux=has_aux, model_state=model_state, rng=rng,
        extended=model.extended, skip_nonfinite=skip_nonfinite,
    )  # fmt: skip
    policy = check_fit_settings(
        chunk_steps=chunk_steps, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        keep=keep, nan_policy=nan_policy, skip_nonfinite=skip_nonfinite, on_chunk=on_chunk,
        progress=progress, resume=resume, log_dir=log_dir,
    )  # fmt: skip
    loggers = _trackers.check(loggers, log_dir)
    mesh, eval_data = on_mesh(mesh, devices, checked, eval_data)
    optimizer = optimizer if optimizer is not None else optax.sgd(lr)
    total = epochs * (n // accumulate)
    evaluation = eval_settings(
        eval_fn, eval_data, eval_every=eval_every, best=best, patience=patience,
        log_every=log_every, params=params_in, model_state=model_state_in, model=model,
        updates=total, data=checked,
    )  # fmt: skip
    step = OptaxStep(loss_fn, optimizer, accumulate, has_aux, policy == "skip", model.extended)
    init = functools.partial(
        initial_state, params, opt_state, model_state, optimizer, evaluation, eval_data, mesh,
        param_sharding,
    )  # fmt: skip
    run = Run(
        step=step, init=init, params=params, model_state=model_state, data=data,
        checked=checked, stream=stream, n=n, epochs=epochs,
        key=key, rng=rng, evaluation=evaluation, eval_data=eval_data, log_every=log_every,
        mesh=mesh, policy=policy, output_spec=output_spec, finish=model.finish,
        unroll=unroll, fingerprint={"accumulate": accumulate, "has_aux": has_aux,
        **_checkpointer.eval_entries(evaluation, params, model_state, eval_data)},
    )  # fmt: skip
    state, history = execute(
        run, chunk_steps=chunk_steps, progress=progress, on_chunk=on_chunk, log_dir=log_dir,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep=keep,
        resume=resume, compile_cache=cache_dir, loggers=loggers,
    )  # fmt: skip
    _warn_if_all_skipped(policy, total, state)
    result = history.result(state)
    _nonfinite.warn_nonfinite_metrics(result, stacklevel=4)
    return model.finish(_adapters.at_best(result) if restore_best else result)


class Run(NamedTuple):
    """What a run of ``fit`` or ``fit_steps`` is, checked: the pieces ``execute`` wires."""

    step: Any  # the step factory (_scan.Step): loss + optax, or the user's step
    init: Callable[[], TrainState]  # the initial carry in fresh buffers, on the mesh
    params: Any  # the initial params (fit_steps: state), checked
    model_state: Any  # the initial model state, or None
    data: Any  # the data as given (arrays, memmaps, an iterable), or None
    checked: Any  # the data as _sources.open_data checked it (an iterable's first chunk)
    stream: Any  # an iterable's stream, or None
    n: int  # microbatches per epoch (steps with data=None)
    epochs: int
    key: Any
    rng: Any
    evaluation: Any  # _eval.EvalSpec or None
    eval_data: Any
    log_every: int | None
    mesh: Any
    policy: str  # the nan policy in force
    output_spec: tuple  # shapes and dtypes of one update's (loss, aux)
    finish: Callable  # TrainResult -> what the user gets (modules, StepsResult)
    unroll: int = 1
    fingerprint: dict | None = None  # more fingerprint entries (settings, eval program)
    has_loss: bool = True  # a loss to report (fit_steps: a "loss" metric)


def execute(
    run: Run, *, chunk_steps, progress, on_chunk, log_dir, checkpoint_dir, checkpoint_every,
    keep, resume, compile_cache, loggers=None,
) -> tuple[TrainState, History]:  # fmt: skip
    """Runs ``run`` in compiled chunks with the observers; returns the last carry and the
    history. Shared by ``fit`` and ``fit_steps``: one driver for every form."""
    accumulate = run.step.accumulate
    per_epoch, total = run.n // accumulate, run.epochs * (run.n // accumulate)
    chunk = _chunk_size(chunk_steps, checkpoint_every, total, run.output_spec)
    _checks.check_log_every(run.log_every, total, chunk)
    source = _sources.make_source(
        run.data, run.stream, key=run.key, n=run.n, accumulate=accumulate, mesh=run.mesh,
        track=checkpoint_dir is not None,
    )  # fmt: skip
    history = _history(*run.output_spec, run.evaluation, run.params, run.model_state,
                       run.eval_data, run.log_every, total)  # fmt: skip
    program = _driver.Program(
        policy=run.policy, total=total, chunk=chunk, evaluation=run.evaluation,
        eval_data=run.eval_data, log_every=run.log_every, step=run.step, unroll=run.unroll,
        rng=run.rng,
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.enter_context(_compile_cache.persistent(compile_cache))  # before any compilation
        state = run.init()
        saver = None
        if checkpoint_dir is not None:
            saver = stack.enter_context(_checkpointer.Checkpointer(
                _checkpoint_dir.check_path(checkpoint_dir), keep=keep, every=checkpoint_every,
                per_epoch=per_epoch, source=source, finish=run.finish,
                donated=run.policy != "raise",
            ))  # fmt: skip
            fingerprint = functools.partial(
                _checkpointer.fingerprint_of, run.step, run.checked, run.stream,
                key=run.key, rng=run.rng, nan_policy=run.policy, log_every=run.log_every,
                **(run.fingerprint or {}),
            )  # fmt: skip
            state, history = saver.open(
                fingerprint, state, history, resume=resume, total=total, epochs=run.epochs,
                mesh=run.mesh,
            )  # fmt: skip
        observers = _watchers(
            stack, state, total, progress=progress, log_dir=log_dir, on_chunk=on_chunk,
            run=saver.fingerprint if saver else None, loss=run.has_loss,
        )  # fmt: skip
        observers += [saver] if saver else []
        start = int(_driver._host(state.step))
        observers += _trackers.enter(stack, loggers, log_dir, start, saver, loss=run.has_loss)
        # Last: it raises Preempted after every other observer has seen the chunk.
        observers.append(stack.enter_context(_preempt.Preemption(checkpoint_dir)))
        first = [state]  # handed over, not kept here: the first carry dies after chunk 1
        del state
        try:
            state = _driver.drive(
                program, source, first.pop(), history, observers, per_epoch=per_epoch
            )
        except (_driver.Diverged, _sources.DataExhausted) as err:
            raise _run_error(err, history, run.finish, checkpoint_dir, accumulate) from None
    return state, history


def on_mesh(mesh, devices, data, eval_data):
    """The mesh to train on (or None), and eval_data replicated over it."""
    mesh = _parallel.make_mesh(mesh, devices)
    if mesh is not None:
        _parallel.check_batch(data, mesh)
        if eval_data is not None:  # evaluated whole on every device (the same on every host)
            eval_data = _parallel.put_replicated(eval_data, mesh)
    return mesh, eval_data


def _watchers(stack, state, total, *, progress, log_dir, on_chunk, run=None, loss=True) -> list:
    """The observers besides the checkpointer, entered in ``stack``: they close with it.
    ``run``: the checkpoint fingerprint, which names the run in the metrics log; ``loss``:
    whether the run has a loss to report."""
    start = int(_driver._host(state.step))
    observers = [stack.enter_context(_observers.ProgressBar(total, start, progress, loss))]
    if log_dir is not None:
        logger = _observers.MetricsLogger(log_dir, start, run, loss)
        observers.append(stack.enter_context(logger))
    if on_chunk is not None:
        observers.append(_observers.Callback(on_chunk))
    return observers


def initial_state(
    params, opt_state, model_state, optimizer, evaluation, eval_data, mesh, param_sharding=None
):
    """The first carry: fresh buffers, the evaluation bookkeeping, on the mesh: sharded
    params (as given or by ``param_sharding``) with their optimizer state in the same
    shards, everything else replicated."""
    params, shardings = _sharding.carry(
        params, opt_state, model_state, optimizer=optimizer, mesh=mesh,
        param_sharding=param_sharding,
    )  # fmt: skip
    state = _fresh_state(params, opt_state, model_state, optimizer=optimizer, shardings=shardings)
    if evaluation is not None:
        evaluation = _eval_init(evaluation, state.params, state.model_state, eval_data)
        state = state._replace(evaluation=evaluation)
    return state if mesh is None else _parallel.put_on_mesh(state, mesh)


def _history(loss_spec, aux_spec, evaluation, params, model_state, eval_data, log_every,
             total) -> History:  # fmt: skip
    """An empty history of the run: losses (or log-group means), aux, evaluations."""
    every = None if evaluation is None else evaluation.every
    log_dtype = np.result_type(loss_spec.dtype, np.float32) if log_every else loss_spec.dtype
    sizes = (total // (log_every or 1), _eval.layout(0, total, every, total).evaluations)
    empty_aux = jax.tree.map(lambda s: np.zeros((0, *s.shape), s.dtype), aux_spec)
    empty = _empty_metrics(evaluation, params, model_state, eval_data)
    return History(np.zeros((0,), log_dtype), empty_aux, evaluation, sizes, empty, log_every, total)


@functools.partial(jax.jit, static_argnames="spec")
def _eval_init(spec, params, model_state, eval_data):
    return _eval.init(spec, params, model_state, eval_data)


def _empty_metrics(evaluation, params, model_state, eval_data) -> dict | None:
    """The run's evaluations as zero-length arrays: ``{name: (0,), "step": (0,)}``."""
    if evaluation is None:
        return None
    shapes = jax.eval_shape(
        functools.partial(_eval.evaluate, evaluation), params, model_state, eval_data
    )
    empty = {name: np.zeros((0,), s.dtype) for name, s in shapes.items()}
    return {**empty, "step": np.zeros((0,), np.int32)}


def _run_error(err, history: History, finish, checkpoint_dir, accumulate) -> Exception:
    """The user's error for a run that ended early: a divergence, or an iterable run dry.

    The last good state is attached in the user's terms (and was checkpointed).
    """
    state = finish(history.result(err.state))
    where = f" and saved in {str(checkpoint_dir)!r}" if checkpoint_dir is not None else ""
    if isinstance(err, _sources.DataExhausted):
        step = int(_driver._host(err.state.step))
        message = _sources.ran_dry(
            err, step=step, accumulate=accumulate, saved=checkpoint_dir is not None
        )
        return DataExhaustedError(message, step=step, state=state)
    return DivergenceError(
        f"training diverged at update {err.step}: its loss was {err.loss} and/or its new "
        f"params or optimizer state were non-finite. The last good state, before update "
        f"{err.step}, is attached as .state{where}. Lower the learning rate, clip gradients "
        "(optax.clip_by_global_norm), or pass nan_policy='skip' to skip such updates.",
        step=err.step,
        state=state,
    )


def _warn_if_all_skipped(policy: str, total: int, state: TrainState) -> None:
    if policy == "skip" and total and int(_driver._host(state.skipped)) == total:
        warnings.warn(
            f"every update of this run ({total} of {total}) was skipped as non-finite "
            "(nan_policy='skip'): params are unchanged. Check the loss at the initial params, "
            "the learning rate, or the dtype (float16 overflows above 65504).",
            RuntimeWarning,
            stacklevel=3,
        )
