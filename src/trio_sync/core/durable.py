"""Small blocking helpers for crash-safe writes; callers run them in a worker thread."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename or creation inside *path* survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def synced_around(sync: Callable[[int], None], folder: str | Path) -> Iterator[None]:
    """Call *sync* (`syncfs`) on *folder*'s filesystem before the block and after it: what was
    written before is on disk before the block renames it into place, and the renames are on
    disk after. A block that raises skips the second call."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sync(fd)
        yield
        sync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Replace *path* with *text* so that a crash leaves the old file or the new, never half."""
    part = path.with_name(path.name + ".part")
    with open(part, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    fsync_dir(path.parent)


def _find_syncfs() -> Callable[[int], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes = (ctypes.c_int,)
    syncfs.restype = ctypes.c_int

    def call(fd: int) -> None:
        if syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    return call


#: syncfs(2) where the C library has it (Linux), else None: makes every write to the filesystem
#: holding the open file *fd* durable, in one pass. For a batch of small files that is far
#: cheaper than an fsync per file and per folder (about 0.05 against 0.45 ms a file, measured with
#: 4 KiB files on ext4). It also flushes other writers' data on that filesystem, which can make
#: one call slow, never wrong. Linux before 5.8 does not report writeback errors through it.
syncfs = _find_syncfs()

#: Filesystems whose syncfs writes everything, data and names, to their own disk. Elsewhere it
#: can fall short of fsync: FUSE filesystems, for one, are not asked to flush their own store.
SYNCFS_KEEPS_ALL = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "tmpfs"})


def filesystem_type(device: int, mountinfo: str) -> str | None:
    """The type of the mounted filesystem with this device number, from /proc/self/mountinfo."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == wanted and "-" in fields[6:]:
            return fields[fields.index("-", 6) + 1]
    return None


def group_syncer(path: Path | str) -> Callable[[int], None] | None:
    """syncfs, if it is sure to make writes below *path* as durable as fsync would; else None
    (and the caller fsyncs each file and folder). Blocking."""
    if syncfs is None:
        return None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            mountinfo = f.read()
        kind = filesystem_type(os.stat(path).st_dev, mountinfo)
    except OSError:
        return None
    return syncfs if kind in SYNCFS_KEEPS_ALL else None
