"""The identity of an iterable's data over a whole run: a hash chain of every microbatch.

An iterable cannot be hashed before the run (it may be a generator, or larger
than memory), so each microbatch is chained into a digest as it is stacked:
``digest_i = SHA-1(digest_{i-1} || bytes of microbatch i)``, over all epochs,
never reset. A checkpoint after ``m`` microbatches saves the chain at ``m`` and
at the end of each epoch before it. Pure: hashing only, no I/O.

Resuming checks the chain by re-reading (``_sources.StreamSource.restore``):

* any iterable is re-read from its start up to the resume point (what
  positions it anyway), so every microbatch the run took is checked; the
  epoch digests name the first epoch that differs;
* an iterator with ``get_state()``/``set_state()`` (grain) is set to the
  state saved at an *anchor*, the end of the chunk stacked before the
  checkpoint's, and re-read from there: the microbatches of that window are
  checked, and the loader continues from its own state without re-reading the
  run. A loader that refuses the state (grain compares ``repr`` of its data
  source and sampler, which holds an address without a ``__repr__``) is
  re-read from its start instead, so it is refused only if its data differ.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np


class HashChain:
    """A running SHA-1 chain over microbatches, with the digests of the last few chunks.

    Args:
      per_epoch: microbatches per epoch (an epoch digest is kept at each end).
      digest, count, epochs: where to continue from (a saved chain), else empty.
    """

    def __init__(self, per_epoch: int, digest: bytes = b"", count: int = 0,
                 epochs: Sequence[str] = ()):  # fmt: skip
        self.per_epoch = per_epoch
        self.digest, self.count = digest, count
        self.epochs = list(epochs)  # hex chain at the end of each completed epoch
        # (count before the block, chain after each of its microbatches), for the
        # last few stacked chunks: a checkpoint may fall anywhere in them.
        self._recent: collections.deque = collections.deque(maxlen=6)

    def extend(self, microbatches: Iterable[Sequence[np.ndarray]]) -> None:
        """Chains each microbatch (its leaves, in order) into the digest."""
        block, digest, count = [], self.digest, self.count
        for leaves in microbatches:
            h = hashlib.sha1(digest)
            for x in leaves:
                h.update(np.ascontiguousarray(x))
            digest, count = h.digest(), count + 1
            block.append(digest)
            if count % self.per_epoch == 0:
                self.epochs.append(digest.hex())
        self._recent.append((self.count, block))
        self.digest, self.count = digest, count

    def at(self, count: int) -> bytes | None:
        """The chain after ``count`` microbatches; None if that is no longer kept."""
        if count == self.count:
            return self.digest
        if count == 0:
            return b""
        for first, block in list(self._recent):
            if first < count <= first + len(block):
                return block[count - first - 1]
        return None

    def saved(self, count: int) -> dict | None:
        """What a checkpoint after ``count`` microbatches keeps: the chain and epoch digests."""
        digest = self.at(count)
        if digest is None:
            return None
        return {"sha1": digest.hex(), "epochs": self.epochs[: count // self.per_epoch]}


def first_difference(saved: Sequence[str], got: Sequence[str]) -> int | None:
    """The first epoch whose digest differs between two chains' epoch lists, or None."""
    for epoch, (a, b) in enumerate(zip(saved, got)):
        if a != b:
            return epoch
    return None
