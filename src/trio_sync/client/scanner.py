"""What is on disk: walks the folder and describes files, hashing only those whose stat changed.

Also the one place that maps a wire path to a local path without following symlinks.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from ..core.hashing import Chunker, FileDigest, chunk_file
from ..core.ignore import IgnoreRules
from ..core.offload import Offload
from ..core.reconcile import Content
from ..errors import InvalidPath, LocalChanged, TrioSyncError
from ..protocol.models import DIR, FILE, Chunk
from ..protocol.paths import STATE_DIR_NAME, check_path, is_valid_path
from .early import EARLY_MIN_SIZE, EARLY_STEP, EarlySend
from .index import BaseEntry, StatKey

log = logging.getLogger("trio_sync.client")

#: How often a file that keeps changing while we hash it is re-read before we give up for now.
HASH_ATTEMPTS = 3


class Unsyncable(TrioSyncError):
    """A path we deliberately leave alone (a symlink, a device, a path under a symlinked folder)."""


class Ignored(TrioSyncError):
    """A path matched by the ignore rules."""


#: How many ignored paths the scanner remembers for `trio-sync status`.
MAX_IGNORED_KEPT = 10_000


class StillWriting(LocalChanged):
    """The file was modified moments ago; wait for it to settle."""


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file or folder as it is on disk now."""

    path: str
    stat: StatKey
    hash: str
    chunks: tuple[Chunk, ...]
    kind: str = FILE

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def content(self) -> Content:
        return Content(self.hash, self.stat.executable, self.is_dir)


@dataclass(frozen=True, slots=True)
class _ToHash:
    """A big file that needs hashing, with its stat when looked at; the caller hashes it."""

    key: StatKey


def stat_key(st: os.stat_result) -> StatKey:
    return StatKey(st.st_size, st.st_mtime_ns, st.st_ino, bool(st.st_mode & stat.S_IXUSR))


def as_synced(root: Path, path: str, key: StatKey | None) -> bool:
    """Whether *path* is still a regular file whose stat is *key* (with None: a real folder).
    Blocking."""
    try:
        with anchored(root, path) as full:
            st = os.lstat(full)
    except (OSError, Unsyncable):
        return False
    if key is None:
        return stat.S_ISDIR(st.st_mode)
    return stat.S_ISREG(st.st_mode) and stat_key(st) == key


def _known(base: BaseEntry | None) -> tuple[Chunk, ...]:
    """The chunks the file had when last synced: most of an edited file still has them."""
    return base.chunks if base is not None and not base.is_dir else ()


def _stat_fd(fd: int) -> StatKey:
    return stat_key(os.fstat(fd))


def dir_key(st: os.stat_result) -> StatKey:
    # A folder's size and mtime change with its entries; only its identity matters to us.
    return StatKey(0, 0, st.st_ino, False)


def local_path(root: Path, path: str) -> Path:
    """The local path for wire path *path*; raises Unsyncable if a parent folder is a symlink
    or not a folder. Parents that do not exist are fine (the path is then simply absent)."""
    current = os.fspath(root)  # strings: this runs several times for every file synced
    for part in path.split("/")[:-1]:
        current = f"{current}/{part}"
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(st.st_mode):
            raise Unsyncable(f"{path}: parent folder {part!r} is a symlink; not following it")
        if not stat.S_ISDIR(st.st_mode):
            raise Unsyncable(f"{path}: {part!r} is a file, not a folder")
    return root / path


#: Where this process's open descriptors have names (Linux): a path through one of them starts
#: at the folder the descriptor holds, however the path it was opened by has changed since.
_FD_DIR = "/proc/self/fd"
_HAVE_FD_DIR = os.path.isdir(_FD_DIR)


@contextmanager
def anchored(root: Path, path: str, *, create: bool = False) -> Iterator[Path]:
    """A name for *path* below *root* that cannot lead out of it: its folder is opened one
    component at a time, never through a symlink, and the name yielded goes through that open
    folder (`/proc/self/fd/N/name`). A folder swapped for a symlink after the walk changes
    nothing for operations on it. With *create*, missing folders are made on the way.

    Unsyncable if a parent is a symlink or a file; FileNotFoundError if one is missing (without
    *create*). Where /proc is missing, falls back to `local_path`'s check. Blocking."""
    if not _HAVE_FD_DIR:
        yield local_path(root, path)
        return
    *folders, name = path.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in folders:
            child = _open_folder(fd, part, path, create=create)
            os.close(fd)
            fd = child
        yield Path(f"{_FD_DIR}/{fd}/{name}")
    finally:
        os.close(fd)


def _open_folder(parent: int, part: str, path: str, *, create: bool) -> int:
    """Open folder *part* of the open folder *parent*, not following a symlink."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            return os.open(part, flags, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, dir_fd=parent)
            return os.open(part, flags, dir_fd=parent)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        # With O_NOFOLLOW | O_DIRECTORY, Linux answers ENOTDIR for a symlink too.
        if e.errno == errno.ELOOP or stat.S_ISLNK(os.lstat(part, dir_fd=parent).st_mode):
            raise Unsyncable(
                f"{path}: parent folder {part!r} is a symlink; not following it"
            ) from None
        raise Unsyncable(f"{path}: {part!r} is a file, not a folder") from None


class Scanner:
    def __init__(self, root: Path, offload: Offload) -> None:
        self.root = root
        self._offload = offload
        #: Names found by the last walks that cannot be synced, with the reason.
        self.rejected: dict[str, str] = {}
        #: Names that would be valid in NFC form; the engine renames them.
        self.denormalized: set[str] = set()
        self.ignore = IgnoreRules()
        #: Paths the ignore rules kept out, as the walks since the last full one found them
        #: (an ignored folder once, not what is in it); at most MAX_IGNORED_KEPT of them.
        self.ignored: set[str] = set()
        self._big_files = trio.CapacityLimiter(offload.threads)
        #: Big files hashed while they were still being written (see `scan`).
        self._hashed_unsettled: set[str] = set()

    async def scan(
        self,
        path: str,
        base: BaseEntry | None,
        early: EarlySend | None = None,
        *,
        settled: Callable[[str, StatKey], bool] | None = None,
    ) -> LocalFile | None:
        """Describe *path* on disk now: None if absent; Unsyncable if it is not a regular file.
        A big file that *early* wants is hashed in steps, each step's chunks handed to it.

        A big file that changed and is not *settled* yet is hashed at the first look only (if
        it rests while it is hashed, a single edit goes at once); until it rests, later looks
        say StillWriting without reading it, since for a file that keeps being written (a log, a
        download) each would read all of it again."""
        if early is None and settled is None:
            return await self._offload.run_sync(self._scan_whole, path, base)
        for _ in range(HASH_ATTEMPTS):
            found = await self._offload.run_sync(self._scan, path, base, EARLY_MIN_SIZE)
            hashed_before = path in self._hashed_unsettled
            self._hashed_unsettled.discard(path)
            if not isinstance(found, _ToHash):
                return found
            if settled is not None and not settled(path, found.key):
                self._hashed_unsettled.add(path)
                if hashed_before:
                    raise StillWriting(f"{path}: still being written")
            # A few big files at a time, as when each was hashed in one thread call: each
            # holds a read buffer until it is done, and there may be a worker for every file.
            async with self._big_files:
                fd = await self._offload.run_sync(self._open_unchanged, path, found.key)
                if fd is None:
                    continue  # changed since we looked: look again
                try:
                    if early is not None and early.wants(found.key):
                        digest = await self._hash_in_steps(fd, early, _known(base))
                    else:
                        digest = await self._offload.run_sync(chunk_file, fd, _known(base))
                    after = await self._offload.run_sync(_stat_fd, fd)
                finally:
                    os.close(fd)
            if after == found.key and digest.size == found.key.size:
                return LocalFile(path, found.key, digest.hash, digest.chunks)
        raise LocalChanged(f"{path}: still changing while being read")

    async def _hash_in_steps(
        self, fd: int, early: EarlySend, known: tuple[Chunk, ...]
    ) -> FileDigest:
        chunker = await self._offload.run_sync(Chunker, fd, known)
        while not chunker.done:
            offset = chunker.position
            chunks = await self._offload.run_sync(chunker.step, EARLY_STEP)
            if chunks:
                early.cut(chunks, offset)
        return chunker.digest()

    def _open_unchanged(self, path: str, key: StatKey) -> int | None:
        """*path* open for reading, if it is still the file seen as *key*; else None."""
        try:
            with anchored(self.root, path) as full:
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, Unsyncable):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None  # a symlink now: the next look says so
            raise
        if _stat_fd(fd) != key:
            os.close(fd)
            return None
        return fd

    def unchanged(self, known: list[tuple[str, StatKey]]) -> list[bool]:
        """For each (path, key): whether *path* is still a regular file whose stat is *key*.
        Many at once, since one thread call costs more than a stat. Blocking."""
        return [as_synced(self.root, path, key) for path, key in known]

    def _scan_whole(self, path: str, base: BaseEntry | None) -> LocalFile | None:
        found = self._scan(path, base, None)
        assert not isinstance(found, _ToHash)
        return found

    def _scan(
        self, path: str, base: BaseEntry | None, hash_from: int | None
    ) -> LocalFile | _ToHash | None:
        """With *hash_from*, a file of that size or more that needs hashing is left for the
        caller to hash (`_ToHash`)."""
        try:
            with anchored(self.root, path) as full:
                return self._scan_at(full, path, base, hash_from)
        except (FileNotFoundError, NotADirectoryError):
            return None  # a folder on the way is gone

    def _scan_at(
        self, full: Path, path: str, base: BaseEntry | None, hash_from: int | None
    ) -> LocalFile | _ToHash | None:
        for _ in range(HASH_ATTEMPTS):
            try:
                st = os.lstat(full)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(st.st_mode):
                raise Unsyncable(f"{path}: symlinks are not synced")
            if self.ignore.ignored(path, is_dir=stat.S_ISDIR(st.st_mode)):
                raise Ignored(path)
            if stat.S_ISDIR(st.st_mode):
                return LocalFile(path, dir_key(st), "", (), kind=DIR)
            if not stat.S_ISREG(st.st_mode):
                raise Unsyncable(f"{path}: not a regular file")
            key = stat_key(st)
            if base is not None and base.stat_key == key and not base.racy:
                return LocalFile(path, key, base.hash, base.chunks)
            if hash_from is not None and key.size >= hash_from:
                return _ToHash(key)
            try:
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise Unsyncable(f"{path}: symlinks are not synced") from None
                raise
            try:
                digest = chunk_file(fd, _known(base))
                after = _stat_fd(fd)
            finally:
                os.close(fd)
            if after == key and digest.size == key.size:
                return LocalFile(path, key, digest.hash, digest.chunks)
        raise LocalChanged(f"{path}: still changing while being read")

    async def walk(self, *unders: str) -> list[str]:
        """Every regular file and folder below the folders *unders* (wire paths; none: the whole
        synced folder). A path that is not a folder contributes nothing."""
        tops = unders or ("",)
        ignored: set[str] = set()  # filled in the thread, kept here on the Trio thread
        found = await self._offload.run_sync(
            lambda: [p for top in tops for p in self._walk(top, ignored)]
        )
        if not unders:
            self.ignored = set()
        self.ignored.update(itertools.islice(ignored, max(0, MAX_IGNORED_KEPT - len(self.ignored))))
        return found

    def _walk(self, under: str, ignored: set[str]) -> list[str]:
        top = self.root / under if under else self.root
        found: list[str] = []
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
                if folder == top:
                    return found
                log.warning("cannot read folder %s: %s", folder, e)
                continue
            for entry in entries:
                rel = os.path.relpath(entry.path, self.root).replace(os.sep, "/")
                if rel == STATE_DIR_NAME:
                    continue
                try:
                    check_path(rel)
                except InvalidPath as e:
                    if is_valid_path(unicodedata.normalize("NFC", rel)):
                        self.denormalized.add(rel)
                        continue
                    if rel not in self.rejected:
                        log.warning("skipping %r: this name cannot be synced (%s)", rel, e)
                    self.rejected[rel] = f"name cannot be synced: {e}"
                    continue
                self.rejected.pop(rel, None)
                if self.ignore.ignored(rel, is_dir=entry.is_dir(follow_symlinks=False)):
                    if len(ignored) < MAX_IGNORED_KEPT:
                        ignored.add(rel)
                    continue
                if entry.is_symlink():
                    log.warning("skipping %s: symlinks are not synced", rel)
                elif entry.is_dir(follow_symlinks=False):
                    found.append(rel)
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    found.append(rel)
        return found
