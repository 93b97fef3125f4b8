"""Local change notifications: one inotify watch per real folder, never through a symlink.

We watch with inotify ourselves rather than through watchfiles: its recursive watch follows
symlinked folders (review L6: one link to a system folder cost 11,364 watches, and a link to `/`
or a loop can exhaust them). Here every folder is opened by a walk that refuses symlinks and
is watched through its open descriptor, so a folder swapped for a link after the walk is not
what gets watched. The descriptor is waited on by Trio: no thread, no polling while idle, and
the watches on the whole tree exist before `task_status.started()`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..protocol.paths import is_state_dir

log = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_EXCL_UNLINK = 0x4000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK
)  # fmt: skip
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ_SIZE = 64 * 1024
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: The quiet that ends a burst of events (a batch grows for at most `debounce_ms`).
STEP_MS = 20


class _Inotify:
    """The kernel's inotify, through libc. Watches are keyed by the folder's wire path."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.fd = self._check(self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        self.folders: dict[int, str] = {}  # watch descriptor -> wire path ("" is the root)
        self._full_warned = False

    def _check(self, result: int) -> int:
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result

    def add(self, fd: int, rel: str) -> None:
        """Watch the folder open as *fd*. Through `/proc/self/fd/N` the kernel resolves the very
        folder we opened, whatever its name leads to by now."""
        try:
            wd = self._check(
                self._libc.inotify_add_watch(self.fd, f"/proc/self/fd/{fd}".encode(), _MASK)
            )
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            if not self._full_warned:
                self._full_warned = True
                log.error(
                    "out of inotify watches at %s: changes below it are seen only when the client"
                    " starts again; raise fs.inotify.max_user_watches (sysctl) and restart it",
                    rel or "the synced folder",
                )
            return
        self.folders[wd] = rel

    def forget(self, rel: str) -> None:
        """Stop watching folder *rel* and everything below it (it moved away)."""
        below = rel + "/"
        for wd, folder in list(self.folders.items()):
            if folder == rel or folder.startswith(below):
                del self.folders[wd]
                self._libc.inotify_rm_watch(self.fd, wd)  # EINVAL if already gone: fine

    def read(self) -> Iterator[tuple[int, int, int, str]]:
        """Every event queued now: (watch descriptor, mask, cookie, name)."""
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                wd, mask, cookie, size = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = os.fsdecode(data[offset : offset + size].rstrip(b"\0"))
                offset += size
                yield wd, mask, cookie, name

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)


def _watch_tree(inotify: _Inotify, root: Path, top: str) -> None:
    """Watch folder *top* (a wire path) and every real folder below it, depth first, holding
    one open descriptor per level (a folder of 10,000 folders must not need 10,000). Blocking."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in top.split("/") if top else ():
            child = os.open(part, _FOLDER, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError:
        os.close(fd)
        return  # gone again, or a symlink / a file by now: nothing to watch
    levels: list[tuple[int, str, Iterator[str]]] = []

    def enter(fd: int, rel: str) -> None:
        try:
            inotify.add(fd, rel)
            with os.scandir(fd) as entries:
                names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError as e:
            os.close(fd)
            log.warning("cannot watch %s: %s", rel or "the synced folder", e)
            return
        levels.append((fd, rel, iter(names)))

    try:
        enter(fd, top)
        while levels:
            fd, rel, names = levels[-1]
            name = next(names, None)
            if name is None:
                levels.pop()
                os.close(fd)
                continue
            if not rel and is_state_dir(name):
                continue
            try:
                child = os.open(name, _FOLDER, dir_fd=fd)
            except OSError:
                continue  # removed, or replaced by a symlink since the listing
            enter(child, f"{rel}/{name}" if rel else name)
    finally:
        for fd, _, _ in levels:
            os.close(fd)


@dataclass
class Changes:
    """What one burst of events named."""

    #: Wire paths of files or folders that changed.
    paths: set[str] = field(default_factory=set)
    #: Those of `paths` that are folders which appeared, moved or went away.
    folders: set[str] = field(default_factory=set)
    #: Those of `paths` whose writer is done with them: the last event was a close after
    #: writing (`IN_CLOSE_WRITE`) or a rename into place (`IN_MOVED_TO`), not a write.
    finished: set[str] = field(default_factory=set)
    #: Folders renamed within the synced folder, (from, to) in the order they happened: the
    #: kernel pairs the two ends of a rename by a cookie.
    moves: list[tuple[str, str]] = field(default_factory=list)


async def watch(
    root: Path,
    on_change: Callable[[Changes], Awaitable[None]],
    *,
    on_overflow: Callable[[], Awaitable[None]],
    debounce_ms: int = 200,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call *on_change* with what changed, burst by burst (`Changes`).

    A folder that appeared, moved or went away is reported once, by its own path: the caller
    looks at everything below it (on disk and in its index), which also covers what happened
    in a new folder before its watch existed. When the kernel dropped events (its queue
    overflowed), *on_overflow* is called instead: look at everything.
    """
    inotify = _Inotify()
    limiter = trio.CapacityLimiter(1)

    async def take(batch: _Batch) -> None:
        # New folders are watched as soon as they are read of, not after the burst: what
        # happens in them before their watch exists is seen only by the caller's look below.
        for folder in batch.take(inotify.read()):
            await trio.to_thread.run_sync(_watch_tree, inotify, root, folder, limiter=limiter)

    try:
        await trio.to_thread.run_sync(_watch_tree, inotify, root, "", limiter=limiter)
        task_status.started()
        while True:
            batch = _Batch(inotify)
            await trio.lowlevel.wait_readable(inotify.fd)
            await take(batch)
            deadline = trio.current_time() + debounce_ms / 1000
            while (now := trio.current_time()) < deadline:
                with trio.move_on_at(min(deadline, now + STEP_MS / 1000)) as quiet:
                    await trio.lowlevel.wait_readable(inotify.fd)
                if quiet.cancelled_caught:
                    break  # quiet for a step: the burst is over
                await take(batch)
            if batch.everything:
                await on_overflow()
            elif batch.changes.paths:
                await on_change(batch.changes)
    finally:
        inotify.close()


class _Batch:
    """The paths a burst of events names, and whether everything must be looked at again."""

    def __init__(self, inotify: _Inotify) -> None:
        self._inotify = inotify
        self.changes = Changes()
        self.everything = False
        self._moved_from: dict[int, str] = {}  # cookie -> the folder renamed away

    def take(self, events: Iterable[tuple[int, int, int, str]]) -> list[str]:
        """Add *events*; return the folders that appeared in them, to be watched."""
        folders = self._inotify.folders
        changes = self.changes
        new: list[str] = []
        for wd, mask, cookie, name in events:
            if mask & IN_Q_OVERFLOW:
                log.warning("the kernel dropped file events (a burst too big); rescanning all")
                self.everything = True
                continue
            folder = folders.get(wd)
            if folder is None:
                continue  # a watch we dropped; its folder is watched again under its new name
            if mask & IN_IGNORED:
                del folders[wd]
                continue
            if not name:  # the folder itself; its parent's event names it, except for the root
                if not folder and mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                    # Not a reason to rescan: that would read an unmounted or moved folder as
                    # everything deleted. What was deleted in it was reported file by file.
                    log.error("the synced folder itself was moved or deleted; not following it")
                continue
            if not folder and is_state_dir(name):
                continue
            rel = f"{folder}/{name}" if folder else name
            changes.paths.add(rel)
            if not mask & IN_ISDIR:
                if mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
                    changes.finished.add(rel)
                elif not mask & IN_ATTRIB:  # a chmod or touch after the close leaves it done
                    changes.finished.discard(rel)
            else:
                changes.folders.add(rel)
                if mask & IN_MOVED_FROM:
                    self._inotify.forget(rel)
                    new = [f for f in new if f != rel and not f.startswith(rel + "/")]
                    self._moved_from[cookie] = rel
                elif mask & (IN_CREATE | IN_MOVED_TO):
                    new.append(rel)
                    if mask & IN_MOVED_TO and cookie in self._moved_from:
                        changes.moves.append((self._moved_from.pop(cookie), rel))
        return new
