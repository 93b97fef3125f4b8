"""Content identity: content-defined chunks named by BLAKE3-256, and a file hash derived from the
chunk list.

Chunk boundaries come from FastCDC, so an insert or a deletion moves only the boundaries near it
and the rest of the file keeps its chunks. Blocking functions; callers run them through
`trio.to_thread.run_sync` with a limiter.
"""

from __future__ import annotations

import os
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


def chunk_file(fd: int) -> FileDigest:
    """Chunk and hash an open file from its start (memory: one buffer, whatever the file size)."""
    chunker = Chunker(fd)
    while not chunker.done:
        chunker.step()
    return chunker.digest()


class Chunker:
    """Chunks and hashes an open file from its start, a step at a time, so that a caller can
    act on the first chunks of a big file while the rest is still being read. Blocking."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
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
                for offset, length in cut(view[: self._filled], final=self.done):
                    self.chunks.append(Chunk(hash_bytes(view[offset : offset + length]), length))
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

    def digest(self) -> FileDigest:
        assert self.done
        return FileDigest(content_hash(self.chunks), self.position, tuple(self.chunks))
