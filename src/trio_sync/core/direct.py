"""Chunk files, written and read around the page cache (O_DIRECT) where the filesystem allows.

For the server's `--direct-store`. The server writes every uploaded byte once and reads it back
once per other client. Through the page cache each byte is copied into a cache page on the way
in and out of one on the way back. With O_DIRECT the disk reads from and writes into a buffer
of ours instead. Which costs less depends on the machine's memory, measured on the 2-core test
VM (Firecracker, whose host takes back guest memory left free for a few seconds):
- A cache page the guest has not used lately costs the kernel about 10 us to fill: dd wrote
  2 GB through the cache in 5-9 s of system time, 0.4 s into pages just freed, 0.2 s with
  O_DIRECT. A 7.2 GiB set of files (1,000 files of 4 KiB to 64 MiB) took 61-64 s instead of
  76 s with O_DIRECT, the server's CPU 39-41 s instead of 53-54 s.
- A single 1 GiB file, whose pages the kernel recycles as fast as it frees them, took 7.1-7.9 s
  instead of 5.7-7.2 s: each direct read and write waits for the disk, the thread sleeps and
  wakes, and a chunk fetched right after it was stored comes from the disk, not from memory.
Hence not the default.

O_DIRECT wants the buffer, the file offset and the length aligned to the device's block. The
whole blocks of a file go directly; its last partial block goes through the cache (padding it
and truncating the padding away makes the filesystem read the block back). Files under
DIRECT_MIN go through the cache whole: a disk round trip for a 4 KiB file costs more than the
copy. Buffers come from a small pool of page-aligned anonymous maps, kept for the process's
life (a new map per call would be fresh pages each time, the very cost avoided).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .durable import unlink_quietly

#: Alignment of buffers, offsets and lengths: the largest logical block size Linux devices use.
ALIGN = 4096
#: Files smaller than this go through the page cache.
DIRECT_MIN = 64 * 1024
#: errno values with which a filesystem refuses O_DIRECT (at open, or at the first read/write).
_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def padded(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


class BufferPool:
    """Page-aligned buffers of *size* bytes, made when all are in use and kept after."""

    def __init__(self, size: int) -> None:
        self.size = padded(size)
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @contextmanager
    def take(self) -> Iterator[memoryview]:
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None:
            buffer = mmap.mmap(-1, self.size)
        try:
            with memoryview(buffer) as view:
                yield view
        finally:
            with self._lock:
                self._free.append(buffer)


class ChunkFiles:
    """Files of at most *max_size* bytes, written whole and read whole; with *direct*, those of
    DIRECT_MIN bytes or more around the page cache."""

    def __init__(self, max_size: int, *, direct: bool) -> None:
        self.max_size = max_size
        self.direct = direct
        self._buffers = BufferPool(max_size + ALIGN)

    def write(self, path: str, data: bytes | memoryview, *, fsync: bool) -> None:
        """Create (or replace) *path* holding *data*; with *fsync*, durably."""
        size = len(data)
        if size > self.max_size:
            raise ValueError(f"{size} bytes: at most {self.max_size} fit")
        head = size - size % ALIGN if self.direct and size >= DIRECT_MIN else 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | (os.O_DIRECT if head else 0)
        fd = os.open(path, flags, 0o600)
        try:
            with memoryview(data) as rest:
                if head:
                    with self._buffers.take() as buffer:
                        buffer[:head] = rest[:head]
                        written = 0
                        while written < head:  # a short write leaves it unaligned: EINVAL
                            written += os.write(fd, buffer[written:head])
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                tail = rest[head:]
                while tail:
                    tail = tail[os.write(fd, tail) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, path: str) -> bytes:
        """The content of *path*, or its first `max_size + 1` bytes if it is longer (too long
        for what the caller wrote: damaged). FileNotFoundError if there is none."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = min(os.fstat(fd).st_size, self.max_size + 1)
            if not self.direct or size < DIRECT_MIN:
                pieces = []
                while size > 0 and (piece := os.read(fd, size)):
                    pieces.append(piece)
                    size -= len(piece)
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            end = padded(size)
            with self._buffers.take() as buffer:
                got = 0
                while got < size and got % ALIGN == 0:
                    more = os.readv(fd, [buffer[got:end]])
                    if not more:
                        break  # shorter than it said: the caller's check will find it
                    got += more
                return bytes(buffer[: min(got, size)])
        finally:
            os.close(fd)

    def works_in(self, folder: str) -> bool:
        """Whether *folder*'s filesystem takes these reads and writes (with *direct*, whether
        it takes O_DIRECT). Blocking."""
        probe = os.path.join(folder, f".direct-probe-{os.getpid()}")
        content = bytes(range(256)) * (DIRECT_MIN // 256) + b"and a partial block"
        try:
            self.write(probe, content, fsync=False)
            return self.read(probe) == content
        except OSError as e:
            if e.errno in _REFUSED:
                return False
            raise
        finally:
            unlink_quietly(probe)
