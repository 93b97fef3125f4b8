"""Content identity: BLAKE3-256 per chunk, and a file hash derived from the chunk list.

Blocking functions; callers run them through `trio.to_thread.run_sync` with a limiter.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from blake3 import blake3

from ..protocol.models import CHUNK_SIZE, Chunk


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


def chunk_file(fd: int, chunk_size: int = CHUNK_SIZE) -> FileDigest:
    """Hash an open file from its start, one chunk at a time (memory: one chunk)."""
    chunks: list[Chunk] = []
    offset = 0
    while True:
        data = os.pread(fd, chunk_size, offset)
        if not data:
            break
        chunks.append(Chunk(hash_bytes(data), len(data)))
        offset += len(data)
    return FileDigest(content_hash(chunks), offset, tuple(chunks))
