"""Where each chunk's microbatches come from: one class per kind of data, one interface.

``fit`` asks a source for ``inputs(start, count)``: the ``(data, idx)`` that
``run_chunk`` takes for updates ``[start, start + count)``. Around that, a
source says what it is for the checkpoint's fingerprint, what to save with a
checkpoint at a step (``checkpoint_state``), how to continue from one
(``restore``), and releases what it holds (``close``).

* ``ArraySource``: JAX arrays gathered in-graph by index, or host NumPy arrays
  and memmaps gathered one chunk at a time.
* ``StreamSource``: an iterable of microbatches (a generator, a grain or torch
  data loader, ``tf.data`` as NumPy), pulled and stacked one chunk at a time
  on the host while the device computes the chunk before.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import itertools
import json
from typing import Any

import jax
import numpy as np

from scanfit import _checks, _parallel, _stream_identity
from scanfit._errors import CheckpointMismatchError
from scanfit._scan import epoch_order

PyTree = Any

# Stack the next chunk on a producer thread (True) or on fit's thread right after it
# dispatches the current chunk (False). See benchmarks/sources.py for the measurement.
PRODUCER_THREAD = False

# The host-side epoch orders must equal scan_train's in-graph ones bitwise: same function.
_epoch_order = jax.jit(epoch_order, static_argnames="n")


def _put(chunk: PyTree, mesh, batch_axis: int) -> PyTree:
    """A chunk of host microbatches onto the device(s)."""
    if mesh is not None:
        return _parallel.put_batches(chunk, mesh, batch_axis=batch_axis)
    return jax.device_put(chunk)


class ArraySource:
    """Microbatches stacked in arrays (N, ...).

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

        return _put(jax.tree.map(gather, self.data), self.mesh, len(shape)), None

    def checkpoint_state(self, step: int) -> None:
        """Nothing: the step alone says where arrays resume."""
        return None

    def restore(self, saved: Any, step: int) -> None:
        """Nothing to restore: ``inputs`` is a function of the step."""

    def close(self) -> None:
        """Nothing held."""


class NoDataSource:
    """No data: a step that makes its own (``fit_steps`` with ``data=None``). Each chunk's
    input is only its steps' count: ``(None, idx)``, every step getting ``batch=None``;
    like arrays, the step alone says where a resume continues."""

    mesh = None

    def inputs(self, start: int, count: int):
        return None, jax.device_put(np.arange(start, start + count, dtype=np.int32))

    checkpoint_state = ArraySource.checkpoint_state
    restore = ArraySource.restore
    close = ArraySource.close


class DataExhausted(Exception):
    """The iterable ran out of microbatches before an epoch was complete (internal)."""

    def __init__(self, epoch: int, got: int, need: int):
        super().__init__(epoch, got, need)
        self.epoch, self.got, self.need = epoch, got, need


def _aligned(shape: tuple, dtype) -> np.ndarray:
    """An empty array on a 64-byte boundary: jax.device_put then uses it in place on a CPU
    instead of copying it (so it is rewritten only once fit is done with that chunk)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + size].view(dtype).reshape(shape)


def _encode_iterator_state(state: Any) -> dict | None:
    """An iterator's ``get_state()`` as JSON-able data (checkpoints never pickle):
    grain's DataLoader gives JSON bytes, a grain dataset iterator a dict."""
    if isinstance(state, bytes):
        try:
            return {"bytes": state.decode("utf-8")}
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(state).decode("ascii")}
    try:
        json.dumps(state)
    except (TypeError, ValueError):
        return None  # not JSON-able: resume fast-forwards instead
    return {"json": state}


def _decode_iterator_state(saved: dict) -> Any:
    if "bytes" in saved:
        return saved["bytes"].encode("utf-8")
    if "base64" in saved:
        return base64.b64decode(saved["base64"])
    return saved["json"]


def _is_number_list(node: Any) -> bool:
    """A (nested) Python list of numbers: a loader that never made arrays."""
    return isinstance(node, list) and any(
        isinstance(v, (int, float, complex)) or _is_number_list(v) for v in node
    )


class _Spec:
    """The tree structure, shapes and dtypes every microbatch must have: the first one's."""

    def __init__(self, first: PyTree):
        nested = jax.tree_util.tree_leaves_with_path(first, is_leaf=_is_number_list)
        for path, leaf in nested:
            if isinstance(leaf, list):
                raise TypeError(
                    f"microbatch 0 of data: {jax.tree_util.keystr(path) or '(root)'} is a "
                    f"Python list of numbers ({_checks.describe(leaf)}); each leaf of a "
                    "microbatch must be an array: convert it with np.asarray in the loader "
                    "(or its collate function)."
                )
        with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(first)
        leaves = [np.asarray(x) for _, x in with_paths]
        for (path, raw), x in zip(with_paths, leaves):
            if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
                raise TypeError(
                    f"microbatch 0 of data: leaf {jax.tree_util.keystr(path) or '(root)'} "
                    f"must be a numeric array, got {_checks.describe(raw)}."
                )
        self.leaves = [(x.shape, x.dtype) for x in leaves]
        self.paths = [jax.tree_util.keystr(path) for path, _ in with_paths]
        self.flat_tuple = self.treedef == jax.tree.structure(tuple(range(len(leaves))))

    def leaves_of(self, microbatch: PyTree, index: int) -> list[np.ndarray]:
        """The microbatch's leaves as arrays, or a ValueError naming what differs."""
        leaves, treedef = jax.tree.flatten(microbatch)
        if treedef != self.treedef:
            raise ValueError(
                f"microbatch {index} of data has structure {treedef}, but microbatch 0 had "
                f"{self.treedef}: every microbatch must have the same structure."
            )
        out = []
        for i, (x, (shape, dtype)) in enumerate(zip(leaves, self.leaves)):
            if type(x) is not np.ndarray:
                x = np.asarray(x)  # a torch tensor, a JAX array, a Python number
            if x.shape != shape or x.dtype != dtype:
                raise ValueError(
                    f"microbatch {index} of data: leaf {i} has shape {x.shape} and dtype "
                    f"{x.dtype}, but microbatch 0 had shape {shape} and dtype {dtype}: every "
                    "microbatch must match (the compiled chunk has one shape; drop or pad a "
                    "short last batch, e.g. drop_last=True / drop_remainder=True)."
                )
            out.append(x)
        return out

    def empty(self, n: int) -> list[np.ndarray]:
        """Leaves (n, ...) to stack n microbatches into."""
        return [_aligned((n, *shape), dtype) for shape, dtype in self.leaves]

    def stack(self, microbatches: list, first: int, out=None) -> list[np.ndarray]:
        """The microbatches' leaves stacked, (n, ...) each, every microbatch checked.

        (x, y) tuples are transposed and stacked in C; ``casting="no"`` makes NumPy
        refuse any other dtype. Only on a failure are the microbatches looked at one by
        one, to name the first that differs (``first``: its index in the run).
        """
        if self.flat_tuple and all(
            type(m) is tuple and len(m) == len(self.leaves) for m in microbatches
        ):
            columns = list(zip(*microbatches))
        else:
            columns = list(zip(*(self._flat(m, first + i) for i, m in enumerate(microbatches))))
        out = self.empty(len(microbatches)) if out is None else out
        try:
            return [np.stack(c, out=o, casting="no") for c, o in zip(columns, out)]
        except (ValueError, TypeError):
            for i, m in enumerate(microbatches):
                self.leaves_of(m, first + i)  # raises, naming the microbatch
            raise

    def _flat(self, microbatch: PyTree, index: int) -> list:
        leaves, treedef = jax.tree.flatten(microbatch)
        if treedef != self.treedef:
            self.leaves_of(microbatch, index)  # raises
        return leaves

    def abstract(self, n: int) -> PyTree:
        """The pytree of (n, ...) shapes and dtypes that arrays of n microbatches would have."""
        return self.treedef.unflatten(
            [jax.ShapeDtypeStruct((n, *shape), dtype) for shape, dtype in self.leaves]
        )


def _microbatches_per_epoch(batches, *, accumulate: int, steps_per_epoch) -> int:
    """Microbatches each epoch takes: ``steps_per_epoch * accumulate``, or ``len(batches)``."""
    try:
        length = len(batches)
    except TypeError:
        length = None
    if steps_per_epoch is None:
        if length is None:
            raise ValueError(
                f"data is an iterable of unknown length ({_checks.describe(batches)}): pass "
                "steps_per_epoch=, the number of updates an epoch takes from it."
            )
        if length < accumulate or length % accumulate:
            raise ValueError(
                f"accumulate={accumulate} must divide len(data)={length} microbatches; pass "
                f"steps_per_epoch={length // accumulate} to use the first "
                f"{length // accumulate * accumulate} of each epoch."
            )
        return length
    if not _checks._is_int(steps_per_epoch) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}.")
    need = steps_per_epoch * accumulate
    if length is not None and need > length:
        raise ValueError(
            f"steps_per_epoch={steps_per_epoch} with accumulate={accumulate} takes {need} "
            f"microbatches an epoch, but len(data) is {length}."
        )
    return need


class StreamSource:
    """An iterable of microbatches, stacked on the host one chunk at a time.

    Each chunk pulls ``count * accumulate`` microbatches, checks each against
    the first (structure, shapes, dtypes), copies them into arrays laid out as
    the chunk (``(count, ...)`` or ``(count, accumulate, ...)``) and transfers
    them. ``fit`` asks for chunk k+1 right after dispatching chunk k, so the
    host stacks while the device computes: at most two chunks are staged on
    the device, and the host reuses three chunks' buffers in turn. (With
    ``PRODUCER_THREAD`` a thread stacks chunk k+2 meanwhile instead.)

    Epochs re-iterate ``batches`` (``iter(batches)`` again); an epoch takes
    its first ``microbatches_per_epoch`` microbatches. With ``track`` (a run
    that checkpoints) the source hashes every microbatch into a chain per epoch
    and, when the iterator has ``get_state()``/``set_state()`` (grain), keeps
    its state at each chunk's end, for ``checkpoint_state``.
    """

    def __init__(self, batches, *, accumulate: int, epochs: int, steps_per_epoch, key):
        if key is not None:
            raise ValueError(
                "key= shuffles stacked arrays in the compiled program; an iterable of "
                "microbatches comes in the order its loader gives: shuffle there (e.g. "
                "grain's IndexSampler(shuffle=True, seed=...)) and pass key=None."
            )
        _checks.check_loop_settings(accumulate, epochs=epochs, accumulate=accumulate, unroll=1)
        self.one_shot = hasattr(type(batches), "__next__")  # an iterator, not re-iterable
        if self.one_shot and epochs > 1:
            raise ValueError(
                f"epochs={epochs} needs data it can iterate again, but got a one-shot iterator "
                f"({_checks.describe(batches)}): pass the re-iterable it came from (a data "
                "loader, a dataset, a function's generator wrapped in a class with __iter__), "
                "or epochs=1 with steps_per_epoch covering the whole run."
            )
        self.batches = batches
        self.k = accumulate
        self.per_epoch = _microbatches_per_epoch(
            batches, accumulate=accumulate, steps_per_epoch=steps_per_epoch
        )
        self.mesh = None
        self.track = False
        self.total = epochs * self.per_epoch // accumulate
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead: tuple[tuple[int, int], concurrent.futures.Future] | None = None
        self._iter = iter(batches)
        try:
            self._first = next(self._iter)  # the shapes, before anything is traced
        except StopIteration:
            raise ValueError(f"data ({_checks.describe(batches)}) gave no microbatch.") from None
        self.spec = _Spec(self._first)
        self._epoch = 0
        self._pos = 0  # microbatches taken from this epoch's iterator
        self._chain = _stream_identity.HashChain(self.per_epoch)  # every microbatch taken
        self._marks: dict[int, dict | None] = {}  # chunk end step -> the iterator's state
        self._ring: collections.deque = collections.deque(maxlen=3)

    def abstract_data(self) -> PyTree:
        """One epoch's microbatches as shapes and dtypes (N, ...), for the argument checks."""
        return self.spec.abstract(self.per_epoch)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data without reading it: one microbatch's spec and the epoch
        length. Contents are hashed as they stream (``checkpoint_state``)."""
        leaves = {p: [list(s), str(d)] for p, (s, d) in zip(self.spec.paths, self.spec.leaves)}
        return {
            "microbatch": {"treedef": str(self.spec.treedef), "leaves": leaves},
            "microbatches_per_epoch": self.per_epoch,
        }

    def _take(self, n: int) -> list:
        """The next ``n`` microbatches, a new epoch's iterator when an epoch is complete."""
        out = []
        while len(out) < n:
            if self._pos == self.per_epoch:
                self._epoch, self._pos = self._epoch + 1, 0
                self._iter = iter(self.batches)
            if self._first is not None:
                out.append(self._first)
                self._first, self._pos = None, self._pos + 1
                continue
            want = min(n - len(out), self.per_epoch - self._pos)
            got = list(itertools.islice(self._iter, want))  # pulled in C, not one by one
            out += got
            self._pos += len(got)
            if len(got) < want:
                raise DataExhausted(self._epoch, self._pos, self.per_epoch)
        return out

    def _buffers(self, n: int) -> list[np.ndarray]:
        """Leaves to stack n microbatches into: those of three chunks back, else new ones.
        (fit keeps at most two chunks' inputs, so the third back is complete; reused
        memory is not faulted in again, about 2 us a microbatch of 8 KiB here.)"""
        if len(self._ring) == self._ring.maxlen and self._ring[0][0].shape[0] == n:
            buffers = self._ring.popleft()
        else:
            buffers = self.spec.empty(n)
        self._ring.append(buffers)
        return buffers

    def stack(self, start: int, count: int) -> PyTree:
        """Host arrays of updates [start, start + count), laid out as run_chunk takes them."""
        first = start * self.k  # microbatch index over the whole run, for errors
        leaves = self.spec.stack(self._take(count * self.k), first, self._buffers(count * self.k))
        if self.track:
            self._chain.extend(zip(*leaves))
            self._mark(start + count)
        shape = (count, self.k) if self.k > 1 else (count,)
        return self.spec.treedef.unflatten([b.reshape(*shape, *b.shape[1:]) for b in leaves])

    def inputs(self, start: int, count: int):
        """(data, None) for run_chunk: the chunk's microbatches, on the device."""
        chunk = self._stacked(start, count) if PRODUCER_THREAD else self.stack(start, count)
        return _put(chunk, self.mesh, 2 if self.k > 1 else 1), None

    def _stacked(self, start: int, count: int) -> PyTree:
        """The chunk stacked ahead by the producer thread, which then stacks the next."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "scanfit-stack")
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            assert ahead[0] == (start, count), (ahead[0], start, count)  # fit asks in order
            chunk = ahead[1].result()
        else:
            chunk = self.stack(start, count)
        nxt = start + count
        if nxt < self.total:
            key = (nxt, min(count, self.total - nxt))
            self._ahead = key, self._pool.submit(self.stack, *key)
        return chunk

    def _mark(self, step: int) -> None:
        """Keeps the iterator's state after update ``step`` (grain), for a later anchor."""
        get_state = getattr(self._iter, "get_state", None)
        state = None
        if get_state is not None and hasattr(self._iter, "set_state"):
            state = _encode_iterator_state(get_state())
        self._marks[step] = state
        for old in sorted(self._marks)[:-4]:  # saves trail the stacking by a chunk or two
            del self._marks[old]

    def _anchor(self, step: int) -> dict[str, Any] | None:
        """Where a resume may set the iterator's own state and re-read from: the newest
        chunk end before ``step`` whose iterator state was kept (grain), else None."""
        for mark in sorted((s for s in list(self._marks) if s < step), reverse=True):
            state, chain = self._marks.get(mark), self._chain.at(mark * self.k)
            if state is not None and chain is not None:
                return {"microbatch": mark * self.k, "sha1": chain.hex(), "iterator": state}
        return None

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """Where the iterable stands after update ``step``: its epoch and offset in it, the
        hash chain of every microbatch taken (``_stream_identity``) and, for an iterator
        with its own state (grain), the anchor a resume re-reads from."""
        epoch, offset = divmod(step * self.k, self.per_epoch)
        chain = self._chain.saved(step * self.k) or {"sha1": None, "epochs": None}
        return {"epoch": epoch, "offset": offset, **chain, "anchor": self._anchor(step)}

    def restore(self, saved: dict[str, Any] | None, step: int) -> None:
        """Continues after update ``step`` of the checkpointed run, re-reading the data up
        to there and checking its hash chain: from the start, or from the anchor's
        iterator state (grain). See ``_stream_identity``.

        Raises:
          CheckpointMismatchError: the microbatches re-read differ from the run's, or the
            checkpoint holds no hash to check them against.
        """
        if step == 0:
            return
        if not saved or saved.get("sha1") is None or saved.get("epochs") is None:
            raise CheckpointMismatchError(
                f"the checkpoint at update {step} holds no hash of the microbatches its run "
                "took from the iterable (it was written by an older scanfit), so this data "
                "cannot be checked against it. Use another checkpoint_dir, or resume=False "
                "to start afresh."
            )
        start = self._seek(saved, step)
        end = step * self.k
        try:
            for done in range(start, end, 1024):  # in blocks: memory stays small
                block = self._take(min(1024, end - done))
                self._chain.extend(zip(*self.spec.stack(block, done)))
        except DataExhausted as err:
            took = min(self.per_epoch, end - err.epoch * self.per_epoch)
            raise CheckpointMismatchError(
                f"data gave {err.got} microbatches in epoch {err.epoch}, fewer than the {took} "
                f"that the checkpoint's run took there before update {step}: it is other data."
            ) from None
        if self._chain.digest.hex() != saved["sha1"]:
            raise CheckpointMismatchError(self._differs(saved, start, step))
        if self.track:
            self._mark(step)

    def _seek(self, saved: dict[str, Any], step: int) -> int:
        """Sets a fresh iterator where the re-reading starts; returns that microbatch index:
        the anchor's (its iterator state set), or 0."""
        if not self.one_shot:  # the peeked iterator was epoch 0's
            self._iter, self._first = iter(self.batches), None
        self._epoch, self._pos = 0, 0
        self._chain = _stream_identity.HashChain(self.per_epoch)
        anchor = saved.get("anchor")
        if anchor is None or not hasattr(self._iter, "set_state"):
            return 0
        epoch, offset = divmod(anchor["microbatch"], self.per_epoch)
        if offset:  # at an epoch's start a fresh iterator is the state
            try:
                self._iter.set_state(_decode_iterator_state(anchor["iterator"]))
            except ValueError as err:  # grain: another data source or sampler (their repr)
                if self.one_shot:  # cannot start it again: nothing to re-read from
                    raise CheckpointMismatchError(
                        f"the data iterator refused the state saved at update {step}: {err} "
                        "Pass the loader itself (re-iterable) to check its data from the "
                        "start, another checkpoint_dir, or resume=False to start afresh."
                    ) from err
                self._iter = iter(self.batches)  # re-read all of it: the data decide
                return 0
            self._first = None
        self._epoch, self._pos = epoch, offset
        self._chain = _stream_identity.HashChain(
            self.per_epoch, bytes.fromhex(anchor["sha1"]), anchor["microbatch"],
            saved["epochs"][:epoch],
        )  # fmt: skip
        return anchor["microbatch"]

    def _differs(self, saved: dict[str, Any], start: int, step: int) -> str:
        """The message of a hash chain that differs: which microbatches, which epoch."""
        end, per_epoch = step * self.k, self.per_epoch
        epoch = _stream_identity.first_difference(saved["epochs"], self._chain.epochs)
        if start > 0:
            where = (
                f"the {end - start} microbatches {start}..{end - 1} of the run, re-read from "
                "the state the data iterator had there,"
            )
        elif epoch is not None:
            where = (
                f"re-read from its start, epoch {epoch} (microbatches {epoch * per_epoch}.."
                f"{(epoch + 1) * per_epoch - 1} of the run)"
            )
        else:
            epoch = end // per_epoch
            where = (
                f"re-read from its start, the {end - epoch * per_epoch} microbatches of epoch "
                f"{epoch} before update {step}"
            )
        return (
            f"data differs from the checkpoint's run: {where} hash to sha1 "
            f"{self._chain.digest.hex()[:12]}..., the checkpoint's run's to "
            f"{saved['sha1'][:12]}... (its microbatches, their order, or the epoch length "
            "changed). Use another checkpoint_dir, or resume=False to start afresh."
        )

    def close(self) -> None:
        """Stops the producer thread, if any (after the chunk it is stacking)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None


def open_data(data, *, key, accumulate, epochs, steps_per_epoch):
    """``(data to check, stream)``: for an iterable, its first microbatch's shapes as
    abstract arrays and the ``StreamSource``; for arrays, ``(data, None)``."""
    if not _checks.is_stream(data):
        if steps_per_epoch is not None:
            raise ValueError(
                f"steps_per_epoch={steps_per_epoch!r} is for an iterable of microbatches; with "
                "arrays (N, ...) an epoch is N // accumulate updates: pass steps_per_epoch=None."
            )
        return data, None
    stream = StreamSource(
        data, accumulate=accumulate, epochs=epochs, steps_per_epoch=steps_per_epoch, key=key
    )
    return stream.abstract_data(), stream


def make_source(data, stream, *, key, n: int, accumulate: int, mesh, track: bool):
    """The source ``fit`` draws chunks from; ``track``: the run checkpoints."""
    if data is None:
        return NoDataSource()
    if stream is None:
        return ArraySource(data, key, n, accumulate, mesh)
    stream.mesh, stream.track = mesh, track
    return stream


def ran_dry(err: DataExhausted, *, step: int, accumulate: int, saved: bool) -> str:
    """The message of the DataExhaustedError raised after keeping the completed chunks."""
    where = " and checkpointed" if saved else ""
    return (
        f"data ran dry: epoch {err.epoch} gave {err.got} microbatches, but an epoch takes "
        f"{err.need} ({err.need // accumulate} updates x accumulate={accumulate}). The "
        f"{step} updates done are kept: the state after them is attached as .state{where}. "
        f"Pass steps_per_epoch={err.got // accumulate} (or fewer) if that is all an epoch has."
    )
