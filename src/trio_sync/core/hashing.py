"""Content identity: content-defined chunks named by BLAKE3-256, and a file hash derived from the
chunk list.

Chunk boundaries come from FastCDC, so an insert or a deletion moves only the boundaries near it
and the rest of the file keeps its chunks. Blocking functions; callers run them through
`trio.to_thread.run_sync` with a limiter.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from blake3 import blake3
from fastcdc.fastcdc_cy import fastcdc_cy  # type: ignore[import-untyped]

from ..protocol.models import CDC_AVG, CDC_MAX, CDC_MIN, Chunk

#: Bytes read from disk at a time while chunking (memory per hashing thread: this plus CDC_MAX).
READ_SIZE = 1024 * 1024


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    return blake3(data).hexdigest()


def content_hash(chunks: Iterable[Chunk]) -> str:
    """The file's hash: BLAKE3 over the concatenated 32-byte chunk digests, in order."""
    h = blake3()
    for chunk in chunks:
        h.update(bytes.fromhex(chunk.hash))
    return h.hexdigest()


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
    chunks: list[Chunk] = []
    full_size = READ_SIZE + CDC_MAX
    # Small files get a small buffer: most files in a tree are small, and zeroing a full buffer
    # per file would cost more than hashing it.
    buf = bytearray(min(full_size, os.fstat(fd).st_size + 1))
    view = memoryview(buf)
    filled = 0  # bytes of buf holding data
    position = 0  # file offset of buf[0]
    final = False
    while not final:
        if filled == len(buf):  # the file grew past our first guess
            view.release()
            buf = buf + bytearray(full_size - len(buf))
            view = memoryview(buf)
        want = len(buf) - filled
        got = os.preadv(fd, [view[filled:]], position + filled)
        filled += got
        final = got < want
        used = 0
        for offset, length in cut(view[:filled], final=final):
            chunks.append(Chunk(hash_bytes(view[offset : offset + length]), length))
            used = offset + length
        # Keep the undecided tail (one chunk, less than CDC_MAX bytes) at the front of the buffer.
        view[: filled - used] = view[used:filled]
        filled -= used
        position += used
    view.release()
    return FileDigest(content_hash(chunks), position, tuple(chunks))
