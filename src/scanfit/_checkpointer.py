"""The checkpointing observer of ``fit``: fingerprint, restore at start, save at chunk ends.

A checkpoint resumes only the run that wrote it (``_fingerprint``: the update
program, initial state, data contents and settings); the files are checksummed
and written atomically by ``_checkpoint`` in a locked ``_checkpoint_dir``.
Saved with the state: the loss history, the evaluation carry (best state,
patience count, stop) and an iterable source's position.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scanfit import _checkpoint, _checkpoint_dir, _eval, _fingerprint, _parallel, _sharding
from scanfit._driver import _chunk, _int
from scanfit._errors import CheckpointMismatchError, CheckpointWriteError
from scanfit._scan import PyTree, TrainState

_host = _parallel.to_host


class Checkpointer:
    """Saves when ``every`` updates have passed since the last save (every chunk with
    None), and at the end of the run, whatever ends it; one writer per directory.

    Each save is written on a host thread while the next chunk computes (at most one
    in flight); ``on_end`` returns once the last one landed. A failed save is raised
    (``CheckpointWriteError``) at the next chunk boundary or at the end.
    """

    def __init__(self, path: Path, *, keep: int, every: int | None, per_epoch: int, source,
                 finish, donated: bool = True):  # fmt: skip
        self.dir = _checkpoint_dir.CheckpointDir(
            path,
            keep=keep,
            writer=jax.process_index() == 0,  # one writer, whatever the hosts
        )
        self.path, self.every, self.per_epoch = path, every, per_epoch
        self.source, self.finish = source, finish  # finish: TrainResult in the user's terms
        self.donated = donated  # the carry is donated to the next chunk (nan_policy != "raise")
        self.fingerprint: dict[str, Any] = {}
        self.last_saved = 0
        self.failed = False
        self._landed = 0  # the newest checkpoint on disk this run saved or resumed from
        self._flying: int | None = None  # the step of the save in flight

    def __enter__(self) -> Checkpointer:
        self.dir.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.dir.__exit__(*exc)  # releases the directory's lock

    def open(self, fingerprint_of, state, history, *, resume: bool, total, epochs, mesh):
        """``(state, history)`` to start from: the newest checkpoint of this run, or as given.

        ``fingerprint_of(state=state)`` computes this run's fingerprint (inside, so that any error
        releases the lock). ``resume=False`` moves the checkpoints there aside.

        A run whose initial params and model state are those the newest checkpoint holds
        (its last update's, or its best evaluation's), all else equal, continues it: an
        NNX module trained in place by an earlier call of this run, passed again. Its
        fingerprint then keeps the checkpoint's initial-state entries.
        """
        with self.dir.closing_on_error():
            self.fingerprint = fingerprint_of(state=state)
            restored = None
            if resume:
                self.dir.differences = functools.partial(self._continuing, state=state)
                restored = _restore(self.dir, state, history, total, epochs, mesh, self.source)
            else:
                self.dir.move_aside()
            self.dir.differences = functools.partial(_differences, current=self.fingerprint)
        state, history = restored or (state, history)
        self.last_saved = self._landed = _int(state.step)
        return state, history

    def _continuing(self, meta: dict[str, Any], *, state: TrainState) -> list[str]:
        """``_differences`` for the newest sound checkpoint, adopting its initial-state
        entries when ``state`` is the state it holds (see ``open``); once only."""
        self.dir.differences = functools.partial(_differences, current=self.fingerprint)
        found = _differences(meta, current=self.fingerprint)
        others = _differences(meta, current=self.fingerprint, ignore=_INITIAL)
        if found and not others and _holds(meta, state):
            saved = meta["fingerprint"]
            self.fingerprint = {**self.fingerprint, **{k: saved.get(k) for k in _INITIAL}}
            self.dir.differences = functools.partial(_differences, current=self.fingerprint)
            return []
        return found

    def landed(self) -> int:
        """The step of the newest checkpoint this run saved (landed on disk) or resumed
        from; 0 before any. Records up to it are final: a rerun resumes past them."""
        return self._landed

    def on_chunk(self, info, state: TrainState, history) -> None:
        if (
            self.every is None
            or info.step == info.total
            or (info.step - self.last_saved >= self.every)
        ):
            self.save(state, history)

    def on_end(self, state: TrainState, history) -> None:
        """Saves the last state if it is not saved yet; returns once every save landed."""
        if self.failed:
            return
        if _int(state.step) > self.last_saved:
            self.save(state, history)
        self._or_fail(state, history, self.dir.wait)
        self._land()

    def save(self, state: TrainState, history) -> None:
        """Starts saving ``state`` on a host thread (``_checkpoint_dir``), after the save
        before it landed; the caller goes on to the next chunk meanwhile."""
        step = _int(state.step)
        self.last_saved = step
        self._save_local_shards(step, state, history)
        if not self.dir.writer:
            self._landed = step
            return
        losses, aux, metrics = history.raw(step)
        skipped, first_bad = _host((state.skipped, state.first_nonfinite))
        trees = {
            "params": _keys_as_data(state.params),  # fit_steps: any state, typed keys too
            "opt_state": state.opt_state,
            "model_state": _keys_as_data(state.model_state),
            "counters": {"skipped": skipped, "first_nonfinite": first_bad},
            "losses": losses,
            "aux": aux,
            # The best state so far, the patience count and whether the run stopped.
            "evaluation": _keys_as_data(state.evaluation),
            "metrics": metrics,
        }
        meta = {
            "fingerprint": self.fingerprint,
            "nonfinite_seen": bool(skipped > 0 or first_bad >= 0),
            "epoch": step // self.per_epoch if self.per_epoch else 0,
            "source": self.source.checkpoint_state(step),
            "scanfit_version": _version(),
        }
        fetch = _fetcher(trees, donated=self.donated)
        self._or_fail(state, history, lambda: self.dir.start_save(step, fetch, meta))
        self._land()  # start_save waited for the save before this one
        self._flying = step

    def _land(self) -> None:
        if self._flying is not None:
            self._landed, self._flying = self._flying, None

    def _or_fail(self, state: TrainState, history, action) -> None:
        """Runs ``action``; a failed save (this one or the one in flight) is raised with
        ``state``, the newest trained state, attached."""
        try:
            action()
        except CheckpointWriteError as err:
            self.failed = True
            raise CheckpointWriteError(
                f"{err}. The checkpoints saved before are intact; the trained state (update "
                f"{_int(state.step)}) is attached as .state.",
                errno=err.errno,
                path=err.filename,
                state=self.finish(history.result(state)),
            ) from err

    def _save_local_shards(self, step: int, state: TrainState, history) -> None:
        """Every process writes its shards of the arrays split over several processes;
        all wait for all before process 0 writes the checkpoint that names them."""
        try:
            spans = _checkpoint.write_local_shards(self.path, step, _state_trees(state))
        except OSError as err:
            self.failed = True
            raise CheckpointWriteError(
                f"cannot save this process's shards of checkpoint {step} in "
                f"{str(self.path)!r}: {err.strerror or err}. The checkpoints saved before are "
                "intact; the trained state is attached as .state.",
                errno=err.errno,
                path=str(self.path),
                state=self.finish(history.result(state)),
            ) from err
        if spans:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"scanfit checkpoint {step}")


def _state_trees(state: TrainState) -> dict[str, Any]:
    """The trees of the state that a checkpoint holds, by name (keys as their data)."""
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "model_state": _keys_as_data(state.model_state),
        "evaluation": _keys_as_data(state.evaluation),
    }


_copy = jax.jit(lambda leaves: [jnp.copy(x) for x in leaves])


def _on_cpu(leaves: list) -> bool:
    return all(d.platform == "cpu" for x in leaves for d in x.devices())


def _fetcher(trees: PyTree, *, donated: bool):
    """A function returning ``trees`` as NumPy arrays, to call on the save thread.

    The carry's buffers are donated to the next chunk (``donated``): the thread
    must not read them after that. On a CPU, NumPy views of the arrays are taken
    here, and copied when the buffers are donated: a view must not outlive the
    buffer it reads (a run of the test suite crashed in XLA once with views of
    donated buffers; a copy costs about 10 ms per 60 MiB). On an accelerator, a
    device copy is dispatched here (one call; it runs before the next chunk, and
    the host does not wait for it); the thread fetches the copy. Arrays that span
    processes are left as they are: each process has written its shards of them
    already (``_save_local_shards``), and the main file leaves them out.
    """
    leaves, treedef = jax.tree.flatten(trees)
    where = [
        i
        for i, x in enumerate(leaves)
        if isinstance(x, jax.Array) and not _checkpoint.spans_processes(x)
    ]
    if _on_cpu([leaves[i] for i in where]):
        for i in where:  # np.array copies (a donated buffer); np.asarray is a free view
            leaves[i] = np.array(leaves[i]) if donated else _host(leaves[i])
        host = jax.tree.unflatten(treedef, leaves)
        return lambda: host
    if donated and where:
        for i, copy in zip(where, _copy([leaves[i] for i in where]), strict=True):
            leaves[i] = copy

    def fetch():
        out = list(leaves)
        for i in where:
            out[i] = _host(out[i])
        return jax.tree.unflatten(treedef, out)

    return fetch


def _version() -> str:
    from scanfit import __version__

    return __version__


def fingerprint_of(step, data, stream, *, state, **entries) -> dict[str, Any]:
    """What decides the result of this run, hashed (``_fingerprint``): ``step`` (a
    ``_scan.Step``) as compiled, the initial state, the data; ``entries`` are the run's
    other inputs and settings, by name (``rng`` among them). An iterable's contents are
    hashed as they stream (``_sources.StreamSource``): here only its structure, shapes
    and length. The initial state is digested where its shards lie
    (``_sharding.digest``): nothing gathered, nothing kept."""
    program = _update_program(step, state, data, entries["rng"])
    fingerprint = _fingerprint.fingerprint(
        program=program, data=data if stream is None else {}, **entries
    )
    fingerprint.update(_state_digests(state))
    if stream is not None:
        fingerprint["data"] = stream.fingerprint()
    elif jax.process_count() > 1:  # each process holds its share: hash all shares, everywhere
        from jax.experimental import multihost_utils

        mine = np.frombuffer(bytes.fromhex(fingerprint["data"]["sha256"]), np.uint8)
        every = np.asarray(multihost_utils.process_allgather(mine))
        fingerprint["data"]["sha256"] = hashlib.sha256(every.tobytes()).hexdigest()
    return fingerprint


def _state_digests(state: TrainState) -> dict[str, Any]:
    """Fingerprint entries of the initial params (fit_steps: state), optimizer state and
    model state."""
    return {
        "params": _sharding.digest(_keys_as_data(state.params)),
        "opt_state": _sharding.digest(state.opt_state),
        "model_state": _sharding.digest(_keys_as_data(state.model_state)),
    }


def _update_program(step, state, data, rng) -> str:
    """The text of one update as fit compiles it: the step (e.g. the loss, the optimizer
    and every hyper-parameter they close over). Lowered on abstract values of one
    update's microbatches, so where the data lives and how long the run is leave it
    unchanged; non-finite handling is left out (it is a fingerprint entry of its own)."""
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)  # noqa: E731
    k = step.accumulate
    lead = (1, k) if k > 1 else (1,)
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((*lead, *a.shape[1:]), a.dtype), data)
    if hasattr(step, "skip_nonfinite"):
        step = dataclasses.replace(step, skip_nonfinite=False)
    idx = None if data is not None else jax.ShapeDtypeStruct((1,), np.int32)
    return _chunk.lower(
        step=step, state=jax.tree.map(spec, state), data=one, idx=idx, rng=rng, unroll=1
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


def _differences(meta: dict[str, Any], *, current: dict[str, Any], ignore=()) -> list[str]:
    """How a checkpoint's run differs from this one (``_fingerprint.differences``), leaving
    out the entries named in ``ignore``."""
    saved = meta.get("fingerprint")
    if not isinstance(saved, dict):
        return ["it holds no fingerprint"]
    # "raise" and "ignore" compile the same program: until an update is non-finite they are
    # the same run ("skip" compiles another, which rounds differently).
    policies = {saved.get("nan_policy"), current["nan_policy"]}
    same = policies <= {"raise", "ignore"} and not meta.get("nonfinite_seen", True)
    ignore = (*ignore, "nan_policy") if same else tuple(ignore)
    return _fingerprint.differences(saved, current, ignore=ignore)


# The fingerprint entries of the initial state: a run passed the state a checkpoint of it
# holds (an NNX module trained in place) continues it, whatever they say.
_INITIAL = ("params", "opt_state", "model_state")


def _holds(meta: dict[str, Any], state: TrainState) -> bool:
    """Whether a checkpoint holds ``state``'s params and model state, bitwise: as its last
    update's state, or as its best evaluation's (``fit(restore_best=True)``)."""
    saved = meta.get("arrays")
    if not isinstance(saved, dict):
        return False
    mine = {
        **_checkpoint._flatten("params", _keys_as_data(state.params)),
        **_checkpoint._flatten("model_state", _keys_as_data(state.model_state)),
    }
    sums = {k: _checkpoint._checksum(a) for k, a in mine.items()}
    for where in ("", "evaluation.best_"):
        theirs = {
            k[len(where) :]: v[2]
            for k, v in saved.items()
            if k.startswith((where + "params", where + "model_state"))
        }
        if theirs == sums:
            return True
    return False


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
            shards = _checkpoint.read_local_shards(found.path, found.step)
            restored = _unpack(found.step, {**found.arrays, **shards}, state, history, mesh)
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
        saved = _checkpoint.unflatten_sharded(prefix, _keys_as_data(like), arrays)
        return _keys_from_data(like, _sharding.restore_like(like, saved))

    restored = TrainState(
        as_device(state.params, "params"),
        as_device(state.opt_state, "opt_state"),
        as_device(state.model_state, "model_state"),
        jnp.asarray(step, jnp.int32),
        jnp.asarray(skipped, jnp.int32),
        jnp.asarray(first_bad, jnp.int32),
        as_device(state.evaluation, "evaluation"),
    )
    if mesh is not None:  # the arrays are in the run's shardings; the counters replicated
        restored = _parallel.put_on_mesh(restored, mesh)
    return restored, history.like(losses, aux, metrics)


def eval_entries(evaluation, params, model_state, eval_data) -> dict[str, Any]:
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
