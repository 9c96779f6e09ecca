"""A checkpoint directory held by one run: locked, checked writable, pruned to its own files.

Rules, each for a failure seen in the field:

- One writer per directory: ``.lock`` is ``flock``-ed for the whole run. The
  kernel drops the lock when its holder dies, so a stale lock never blocks.
  Temporary files are removed only under the lock, so they are a dead
  writer's, never a live one's.
- Writability is checked before training, by writing a file.
- A checkpoint that fails verification is skipped with a warning, left in
  place, and never counted by pruning; neither is another run's. Pruning
  removes only this run's checkpoints beyond the ``keep`` newest.
- Starting afresh (``resume=False``) moves the checkpoints already there into
  ``previous-<k>/``: nothing is deleted, and a later resume finds only the new run.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from scanfit import _checkpoint
from scanfit._checkpoint import Unusable
from scanfit._errors import CheckpointLockedError, CheckpointWarning, CheckpointWriteError

try:
    import fcntl
except ImportError:  # Windows: no flock; one writer per directory is then the user's care
    fcntl = None

LOCK = ".lock"
_OURS = "ours"


class Found(NamedTuple):
    """A verified checkpoint."""

    step: int
    path: Path
    meta: dict[str, Any]
    arrays: dict[str, Any]
    differences: list[str]  # how its fingerprint differs from this run's; empty if it is ours


def check_path(checkpoint_dir: Any) -> Path:
    """``checkpoint_dir`` as a Path; ValueError for an empty string or a non-directory."""
    if str(checkpoint_dir) == "":
        raise ValueError(
            "checkpoint_dir must be a directory path, got ''; pass '.' for the current directory."
        )
    path = Path(checkpoint_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"checkpoint_dir {str(path)!r} exists and is not a directory.")
    return path


def _oserror(err: OSError, doing: str, path: Path, state: Any = None) -> CheckpointWriteError:
    code = errnos.errorcode.get(err.errno, "?") if err.errno is not None else "?"
    return CheckpointWriteError(
        f"cannot {doing} {str(path)!r}: {err.strerror or err} ({code})",
        errno=err.errno,
        path=str(path),
        state=state,
    )


class CheckpointDir:
    """The checkpoint directory of one run; a context manager that releases its lock.

    Args:
      path: the directory (created if missing).
      keep: how many of this run's checkpoints to keep.
      writer: False on processes that only read (all but process 0): no lock, no writes.

    Attributes:
      differences: ``differences(meta) -> list[str]``, how a checkpoint (its metadata)
        differs from this run: empty for this run's own. Set it before reading or saving.

    Raises:
      CheckpointLockedError: another run holds the directory.
      CheckpointWriteError: the directory cannot be created or written.
    """

    def __init__(self, path: Path, *, keep: int, writer: bool = True):
        self.path = path
        self.keep = keep
        self.writer = writer
        self.differences: Callable[[dict[str, Any]], list[str]] = lambda meta: []
        self._verdicts: dict[Path, tuple[tuple, str]] = {}  # path -> (stat, _OURS or why not)
        self._lock_fd: int | None = None
        self._pending: _Save | None = None  # the save in flight
        if writer:
            self._lock()
            try:
                self._prepare()
            except BaseException:
                self.close()
                raise

    def _lock(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _oserror(err, "write checkpoints in", self.path) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                if err.errno in (errnos.EWOULDBLOCK, errnos.EACCES):
                    raise CheckpointLockedError(
                        f"checkpoint_dir {str(self.path)!r} is in use by another run (process "
                        f"{holder} holds {str(self.path / LOCK)!r}): one writer per directory. "
                        "Wait for it to finish, or pass another checkpoint_dir."
                    ) from None
                raise _oserror(err, "lock", self.path / LOCK) from None
        self._lock_fd = fd

    def _prepare(self) -> None:
        """Under the lock: note our pid, check writability, remove dead writers' files."""
        try:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
            fd, probe = tempfile.mkstemp(prefix=_checkpoint.TMP_PREFIX, dir=self.path)
            os.close(fd)
            os.unlink(probe)
            for entry in self.path.glob(_checkpoint.TMP_PREFIX + "*"):
                entry.unlink(missing_ok=True)
        except OSError as err:
            raise _oserror(err, "write checkpoints in", self.path) from None
        for _, entry in _checkpoint.list_checkpoints(self.path):
            if not entry.is_file():
                raise CheckpointWriteError(
                    f"checkpoint_dir {str(self.path)!r} holds {entry.name!r}, which is not a "
                    "file: a checkpoint cannot be saved under that name. Move it away.",
                    errno=errnos.EISDIR,
                    path=str(entry),
                )

    def close(self) -> None:
        """Waits for a save in flight (its error, if any, was or will never be raised:
        ``wait`` raises it), then releases the lock."""
        if self._pending is not None:
            self._pending.thread.join()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    @contextlib.contextmanager
    def closing_on_error(self) -> Iterator[None]:
        """Releases the lock if the block raises (before the run's own ``with`` holds it)."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> CheckpointDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def move_aside(self) -> Path | None:
        """Moves every checkpoint into a new ``previous-<k>/`` (for a fresh start); returns it."""
        entries = _checkpoint.list_checkpoints(self.path)
        if not entries or not self.writer:
            return None
        k = 1
        while (self.path / f"previous-{k}").exists():
            k += 1
        dest = self.path / f"previous-{k}"
        try:
            dest.mkdir()
            for _, entry in entries:
                os.replace(entry, dest / entry.name)
            _checkpoint.fsync_dir(self.path)
        except OSError as err:
            raise _oserror(err, "move old checkpoints into", dest) from None
        return dest

    def verified(self) -> Iterator[Found]:
        """Checkpoints that pass verification, newest first; others are warned about once."""
        for step, path in reversed(_checkpoint.list_checkpoints(self.path)):
            verdict = self._verdicts.get(path)
            if verdict is not None and verdict[1] != _OURS:
                continue
            try:
                meta, arrays = _checkpoint.read(path)
                if meta.get("step") != step:
                    raise Unusable(f"its metadata says step {meta.get('step')!r}")
            except Unusable as err:
                self.reject(path, str(err))
                continue
            diffs = self.differences(meta)
            self._verdicts[path] = (_stat(path), _OURS if not diffs else "another run's")
            yield Found(step, path, meta, arrays, diffs)

    def reject(self, path: Path, why: str) -> None:
        """Never loads or prunes ``path`` again in this run; warns about it once."""
        self._verdicts[path] = (_stat(path), why)
        warnings.warn(
            f"skipping checkpoint {path}: {why}. It is never loaded, and left in place.",
            CheckpointWarning,
            stacklevel=4,
        )

    def start_save(
        self, step: int, trees: Callable[[], dict[str, Any]], meta: dict[str, Any]
    ) -> None:
        """Starts writing a checkpoint on a host thread; ``wait`` for it to land.

        At most one save is in flight: this first waits for the one before.
        ``trees()`` (name -> pytree) runs on the thread, and may fetch device arrays
        that stay valid until then. The thread writes to a temporary file only; the
        rename makes it a checkpoint once it is whole and fsynced.

        Raises:
          CheckpointWriteError: the save before this one failed.
        """
        self.wait()
        final = _checkpoint.path_for(self.path, step)
        try:
            if final.exists() and not self._is_ours(final):
                self._set_aside(final)
        except OSError as err:
            raise _oserror(err, "save checkpoint", final) from None
        self._pending = _Save(final, self.path, step, trees, meta)

    def wait(self) -> Path | None:
        """Waits for the save in flight (if any) to land, then removes this run's
        checkpoints beyond the ``keep`` newest; returns the saved path.

        Raises:
          CheckpointWriteError: disk full, read-only, no permission...; the checkpoints
            already saved are intact.
        """
        pending = self._pending
        if pending is None:
            return None
        pending.thread.join()  # a Ctrl-C here leaves it pending: the next wait joins again
        self._pending = None
        try:
            pending.raise_error()
            self._verdicts[pending.path] = (_stat(pending.path), _OURS)
            ours = [p for _, p in _checkpoint.list_checkpoints(self.path) if self._is_ours(p)]
            for old in ours[: -self.keep]:
                old.unlink(missing_ok=True)
        except OSError as err:
            raise _oserror(err, "save checkpoint", pending.path) from None
        return pending.path

    def _set_aside(self, path: Path) -> None:
        """Renames a file that is not ours out of the way of the checkpoint we are saving."""
        k, dest = 1, path.with_name(path.name + ".set-aside")
        while dest.exists():
            k += 1
            dest = path.with_name(f"{path.name}.set-aside-{k}")
        os.replace(path, dest)
        warnings.warn(
            f"moved {path} to {dest.name}: it is not this run's checkpoint, and this run saves "
            "one under its name.",
            CheckpointWarning,
            stacklevel=5,
        )

    def _is_ours(self, path: Path) -> bool:
        verdict = self._verdicts.get(path)
        if verdict is None or verdict[0] != _stat(path):  # not seen yet, or changed since
            try:
                meta, _ = _checkpoint.read(path)
            except Unusable as err:
                self.reject(path, str(err))
                return False
            if self.differences(meta):
                self.reject(path, "another run's checkpoint")
                return False
            self._verdicts[path] = (_stat(path), _OURS)
        return self._verdicts[path][1] == _OURS


class _Save:
    """One checkpoint being written on a host thread (a daemon: a kill or an exit may
    stop it at any byte, leaving a temporary file that is never loaded)."""

    def __init__(self, path: Path, directory: Path, step: int, trees, meta):
        self.path = path
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(directory, step, trees, meta), name="scanfit-save", daemon=True
        )
        self.thread.start()

    def _run(self, directory: Path, step: int, trees, meta) -> None:
        try:
            _checkpoint.write(directory, step, trees(), meta)
        except BaseException as err:  # handed to the caller by join
            self.error = err

    def raise_error(self) -> None:
        """Raises what the (finished) thread raised, if anything."""
        if self.error is not None:
            raise self.error


def _stat(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)
