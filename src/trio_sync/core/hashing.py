"""Content identity: content-defined chunks named by BLAKE3-256, and a file hash derived from the
chunk list.

Chunk boundaries come from FastCDC, so an insert or a deletion moves only the boundaries near it
and the rest of the file keeps its chunks. Blocking functions; callers run them through
`trio.to_thread.run_sync` with a limiter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from blake3 import blake3
from fastcdc.fastcdc_cy import fastcdc_cy  # type: ignore[import-untyped]

from ..protocol.models import CDC_AVG, CDC_MAX, CDC_MIN, Chunk, content_hash

__all__ = ["Chunker", "FileDigest", "chunk_file", "content_hash", "cut", "hash_bytes"]

#: Bytes read from disk at a time while chunking (memory per hashing thread: this plus CDC_MAX).
READ_SIZE = 1024 * 1024


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    return blake3(data).hexdigest()


@dataclass(frozen=True, slots=True)
class FileDigest:
    hash: str
    size: int
    chunks: tuple[Chunk, ...]


def cut(data: bytes | memoryview, *, final: bool) -> list[tuple[int, int]]:
    """(offset, length) of the chunks at the start of *data*.

    A cut point depends only on the bytes from the chunk's start up to the cut. Unless *data* runs
    to the end of the file (*final*), its last chunk may have been cut only because the data ran
    out, so it is left for the caller to cut again with more data behind it.
    """
    out: list[tuple[int, int]] = []
    total = len(data)
    for c in fastcdc_cy(data, min_size=CDC_MIN, avg_size=CDC_AVG, max_size=CDC_MAX):
        if not final and c.offset + c.length == total and c.length < CDC_MAX:
            break
        out.append((c.offset, c.length))
    return out


def _first_cut(data: memoryview) -> int:
    """The length of the first chunk of *data* (all of it if it holds no cut point)."""
    for c in fastcdc_cy(data, min_size=CDC_MIN, avg_size=CDC_AVG, max_size=CDC_MAX):
        return int(c.length)
    return 0


def chunk_file(fd: int, known: Sequence[Chunk] = ()) -> FileDigest:
    """Chunk and hash an open file from its start (memory: one buffer, whatever the file size).
    *known*: the chunks of a version of it seen before (see `Chunker`)."""
    chunker = Chunker(fd, known)
    while not chunker.done:
        chunker.step()
    return chunker.digest()


class Chunker:
    """Chunks and hashes an open file from its start, a step at a time, so that a caller can
    act on the first chunks of a big file while the rest is still being read. Blocking.

    Given the chunks of a version seen before (*known*), it looks for them where they were: at
    a cut point where a known chunk began, bytes that hash to that chunk are that chunk, and
    cutting them would cut there again (a cut point depends only on the chunk's own bytes), so
    they are taken without running the cutter, which costs three times the hash. The known
    version's last chunk is not taken so: it ended where that version did. An edit in place
    or an append then costs a hash of the unchanged bytes; the result is always the one
    cutting alone gives."""

    def __init__(self, fd: int, known: Sequence[Chunk] = ()) -> None:
        self._fd = fd
        #: The known chunks but the last (see above), and where the next one to look at begins:
        #: positions only grow, so a walk along them finds each in turn.
        self._known = known[:-1]
        self._next_known = 0
        self._next_start = 0
        #: Chunks taken as known, without cutting.
        self.recognized = 0
        self._full_size = READ_SIZE + CDC_MAX
        # Small files get a small buffer: most files in a tree are small, and zeroing a full
        # buffer per file would cost more than hashing it.
        self._buf = bytearray(min(self._full_size, os.fstat(fd).st_size + 1))
        self._filled = 0  # bytes of the buffer holding data
        self.position = 0  # file offset of the buffer's start: where the next chunk begins
        self.done = False
        self.chunks: list[Chunk] = []

    def step(self, at_least: int = 0) -> list[Chunk]:
        """Cut the next chunks, reading until they cover *at_least* bytes or the file ends."""
        first = len(self.chunks)
        start = self.position
        view = memoryview(self._buf)
        try:
            while not self.done:
                if self._filled == len(self._buf):  # the file grew past our first guess
                    view.release()
                    self._buf += bytearray(self._full_size - len(self._buf))
                    view = memoryview(self._buf)
                want = len(self._buf) - self._filled
                got = os.preadv(self._fd, [view[self._filled :]], self.position + self._filled)
                self._filled += got
                self.done = got < want
                used = 0
                for offset, length, digest in self._cut(view[: self._filled]):
                    digest = digest or hash_bytes(view[offset : offset + length])
                    self.chunks.append(Chunk(digest, length))
                    used = offset + length
                # Keep the undecided tail (one chunk, less than CDC_MAX bytes) at the front.
                view[: self._filled - used] = view[used : self._filled]
                self._filled -= used
                self.position += used
                if self.position - start >= at_least:
                    break
        finally:
            view.release()
        return self.chunks[first:]

    def _cut(self, data: memoryview) -> Iterator[tuple[int, int, str | None]]:
        """(offset, length, hash if already known) of the chunks at the start of *data* (the
        buffer, which starts at `position`), as `cut` gives them."""
        if not self._known:
            for offset, length in cut(data, final=self.done):
                yield offset, length, None
            return
        at, total = 0, len(data)
        while at < total:
            known = self._known_at(self.position + at)
            if known is not None and at + known.size <= total:
                digest = hash_bytes(data[at : at + known.size])
                if digest == known.hash:
                    self.recognized += 1
                    yield at, known.size, digest
                    at += known.size
                    continue
            length = _first_cut(data[at:])
            if not self.done and at + length == total and length < CDC_MAX:
                return  # cut only because the data ran out: cut again with more behind it
            yield at, length, None
            at += length

    def _known_at(self, position: int) -> Chunk | None:
        """The known chunk that began at *position*, if one did."""
        known = self._known
        while self._next_known < len(known) and self._next_start < position:
            self._next_start += known[self._next_known].size
            self._next_known += 1
        if self._next_known < len(known) and self._next_start == position:
            return known[self._next_known]
        return None

    def digest(self) -> FileDigest:
        assert self.done
        return FileDigest(content_hash(self.chunks), self.position, tuple(self.chunks))
