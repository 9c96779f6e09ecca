"""TensorBoard event files as scanfit writes and cuts them: ``Event`` protos in TFRecord frames.

tensorboardX's ``SummaryWriter`` hands events to a thread (its ``flush()`` does not
wait for the queue, so a kill loses what is queued) and names its file by the
second (a second writer in the same second truncates the first one's file).
scanfit writes its own file instead: each record framed and written when logged,
one new file per call of ``fit``, named to sort after the files before it (as
TensorBoard reads them). A resumed run cuts the older files back to its
checkpoint (``cut``), so each (tag, step) is read back once. The protos and the
CRC are tensorboardX's; the framing is TFRecord's: length (uint64), masked CRC of
the length, payload, masked CRC of the payload, little-endian.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

PATTERN = "*tfevents*"  # what TensorBoard and tbparse take for an event file


def _crc(data: bytes) -> int:
    from tensorboardX.record_writer import masked_crc32c

    return masked_crc32c(data)


def frame(payload: bytes) -> bytes:
    """One TFRecord: ``payload`` with its length and both checksums."""
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", _crc(header)) + payload + struct.pack("<I", _crc(payload))


def frames(data: bytes) -> tuple[list[bytes], bool]:
    """The whole records at the start of an event file's bytes, each framed, and whether
    anything follows them (a record torn by a kill mid-write, or damaged)."""
    records, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        if len(data) - pos < 12 or _u32(data, pos + 8) != _crc(header):
            return records, True
        end = pos + 12 + struct.unpack("<Q", header)[0] + 4
        if end > len(data) or _u32(data, end - 4) != _crc(data[pos + 12 : end - 4]):
            return records, True
        records.append(data[pos:end])
        pos = end
    return records, False


def _u32(data: bytes, at: int) -> int:
    return struct.unpack("<I", data[at : at + 4])[0]


def cut(data: bytes, step: int) -> bytes | None:
    """What a run resumed at update ``step`` keeps of an event file's bytes: the file's
    header and every event at or before ``step``, a torn tail dropped; None if all."""
    from tensorboardX.proto import event_pb2

    records, torn = frames(data)
    kept = [r for r in records if _kept(event_pb2.Event.FromString(r[12:-4]), step)]
    if not torn and len(kept) == len(records):
        return None
    return b"".join(kept)


def _kept(event, step: int) -> bool:
    return not event.HasField("summary") or event.step <= step


class EventFile:
    """A new event file in ``directory``, written record by record (nothing queued).

    Its name (``events.out.tfevents.<seconds>.<host>.<nanoseconds>``) sorts after every
    file written before it, tensorboardX's included, and is never reused.
    """

    def __init__(self, directory: Path):
        from tensorboardX.proto import event_pb2, summary_pb2

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        now = time.time_ns()
        name = f"events.out.tfevents.{now // 10**9:010d}.{socket.gethostname()}.{now:020d}"
        self.path = directory / name
        self._file = open(self.path, "xb")  # noqa: SIM115  (closed by close())
        self._write(self._event(wall_time=now / 1e9, file_version="brain.Event:2"))

    def add(self, step: int, scalars: dict[str, float]) -> None:
        """One event at ``step`` holding every scalar (tag -> value)."""
        values = [self._summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
        summary = self._summary(value=values)
        self._write(self._event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event) -> None:
        self._file.write(frame(event.SerializeToString()))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
