"""Moves content between the folder and the server, and records each result in the index.

Every local write is temp file (in the state folder) → fsync → hash verified → checked that the
target is still what we decided on → rename. The index is updated right after the rename, so our
own writes are recognised by stat, not by a clock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
import unicodedata
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar, TypeVarTuple, Unpack

import trio

from ..core.durable import fsync_dir, unlink_quietly
from ..core.hashing import hash_bytes
from ..errors import LocalChanged, ProtocolError, TrioSyncError
from ..protocol.models import DIR, CommitRequest, FileEntry
from .index import BaseEntry, Index, StatKey
from .remote import Remote
from .scanner import LocalFile, dir_key, local_path, stat_key

log = logging.getLogger("trio_sync.client")
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def _umask() -> int:
    # Read without calling os.umask(), which would briefly change it for every thread.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def conflict_name(path: str, client: str, when: datetime) -> str:
    """`dir/report.docx` → `dir/report.sync-conflict-20261124-153012-laptop.docx`."""
    folder, _, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension, or a dotfile such as ".bashrc"
        stem, dot, ext = name, "", ""
    tag = f"sync-conflict-{when.strftime('%Y%m%d-%H%M%S')}-{client}"
    new = f"{stem}.{tag}{dot}{ext}"
    return f"{folder}/{new}" if folder else new


class Parking:
    """Files that sync removed locally, kept briefly in the state folder under their hash.

    A move on another client arrives as a deletion and a creation of the same content; when the
    deletion comes first, the creation takes the parked file back instead of downloading it.
    The bookkeeping runs on the Trio thread; only the renames and unlinks run in workers.
    """

    KEEP_SECONDS = 120.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[str, tuple[Path, float]] = {}

    def spot(self) -> Path:
        return self.folder / f"parked-{uuid.uuid4().hex}"

    def add(self, hash: str, spot: Path) -> Path | None:
        """Record a parked file; returns one it replaces (for the caller to remove)."""
        previous = self._files.get(hash)
        self._files[hash] = (spot, time.monotonic())
        return previous[0] if previous else None

    def take(self, hash: str) -> Path | None:
        found = self._files.pop(hash, None)
        return found[0] if found else None

    def expired(self) -> list[Path]:
        now = time.monotonic()
        old = [h for h, (_, since) in self._files.items() if now - since > self.KEEP_SECONDS]
        return [self._files.pop(h)[0] for h in old]


class Transfer:
    def __init__(
        self,
        root: Path,
        tmp_dir: Path,
        index: Index,
        remote: Remote,
        limiter: trio.CapacityLimiter,
        client_name: str,
        parking: Parking,
    ) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        self.index = index
        self.remote = remote
        self._limiter = limiter
        self._name = client_name
        self._parking = parking
        self._umask = _umask()

    async def _thread(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- towards the server -------------------------------------------------------------------

    async def upload(self, local: LocalFile, base_rev: int) -> FileEntry:
        if local.is_dir:
            entry = await self.remote.commit(
                CommitRequest(path=local.path, base_rev=base_rev, kind=DIR)
            )
            await self.index.put(BaseEntry.synced(entry, local.stat, we_wrote_it=True))
            return entry
        missing = await self.remote.missing(c.hash for c in local.chunks)
        full = local_path(self.root, local.path)
        if missing:
            fd = await self._thread(os.open, full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                offset = 0
                for chunk in local.chunks:
                    if chunk.hash in missing:
                        data = await self._thread(
                            _read_verified, fd, chunk.size, offset, chunk.hash
                        )
                        await self.remote.put_chunk(chunk.hash, data)
                        missing.discard(chunk.hash)
                    offset += chunk.size
            finally:
                os.close(fd)
        # The content we sent is what we hashed; make sure the file still is, too.
        if await self._thread(_stat_or_none, full) != local.stat:
            raise LocalChanged(f"{local.path}: changed during upload")
        entry = await self.remote.commit(
            CommitRequest(
                path=local.path,
                base_rev=base_rev,
                hash=local.hash,
                size=local.stat.size,
                chunks=local.chunks,
                executable=local.stat.executable,
                mtime_ns=local.stat.mtime_ns,
            )
        )
        await self.index.put(BaseEntry.synced(entry, local.stat, we_wrote_it=False))
        return entry

    async def delete_remote(self, path: str, base_rev: int) -> FileEntry:
        entry = await self.remote.commit(CommitRequest(path=path, base_rev=base_rev, deleted=True))
        await self.index.remove(path)
        return entry

    # -- towards the folder -------------------------------------------------------------------

    async def download(self, entry: FileEntry, expected: LocalFile | None) -> bool:
        """Make the local file *entry*'s content, if it is still *expected* (None: absent).

        Returns True if the content came from the folder itself (a move) rather than the server.
        """
        if entry.kind == DIR:
            key = await self._thread(self._make_dir, entry.path, expected)
            await self.index.put(BaseEntry.synced(entry, key, we_wrote_it=True))
            return False
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        candidates = [e for e in self.index.with_hash(entry.hash) if e.path != entry.path]
        parked = self._parking.take(entry.hash)
        try:
            reused = await self._thread(self._reuse, entry, tmp, parked, candidates)
            if not reused and parked is None and candidates:
                # A candidate may have been parked by a concurrent deletion meanwhile; parking
                # registers a file before its old name goes, so looking again finds it.
                parked = self._parking.take(entry.hash)
                if parked is not None:
                    reused = await self._thread(self._reuse, entry, tmp, parked, [])
            flags = os.O_WRONLY | os.O_CLOEXEC | (0 if reused else os.O_CREAT | os.O_EXCL)
            fd = await self._thread(os.open, tmp, flags, 0o600)
            try:
                if not reused:
                    for chunk in entry.chunks:
                        data = await self.remote.get_chunk(chunk.hash, chunk.size)
                        await self._thread(_write_verified, fd, data, chunk.hash, chunk.size)
                await self._thread(self._finish_file, fd, entry)
            finally:
                os.close(fd)
            final = await self._thread(self._place, tmp, entry.path, expected)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(unlink_quietly, tmp)
        await self.index.put(BaseEntry.synced(entry, final, we_wrote_it=True))
        return reused

    def _reuse(
        self, entry: FileEntry, tmp: Path, parked: Path | None, candidates: list[BaseEntry]
    ) -> bool:
        """Put *entry*'s content at *tmp* from the folder itself, if it is here somewhere."""
        if parked is not None:
            with contextlib.suppress(FileNotFoundError):
                os.rename(parked, tmp)
                return True
        for base in candidates:
            try:
                source = local_path(self.root, base.path)
                with open(source, "rb") as src:
                    if stat_key(os.fstat(src.fileno())) != base.stat_key:
                        continue  # changed since it was synced: not known to be that content
                    with open(tmp, "wb") as dst:
                        for chunk in entry.chunks:
                            data = src.read(chunk.size)
                            if len(data) != chunk.size or hash_bytes(data) != chunk.hash:
                                raise LocalChanged("copy source changed")
                            dst.write(data)
                return True
            except (OSError, TrioSyncError):
                unlink_quietly(tmp)
        return False

    def _finish_file(self, fd: int, entry: FileEntry) -> None:
        mode = 0o666 & ~self._umask
        if entry.executable:
            mode |= (mode & 0o444) >> 2  # x wherever r is allowed
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    def _make_dir(self, path: str, expected: LocalFile | None) -> StatKey:
        target = local_path(self.root, path)
        if expected is None or not expected.is_dir:
            _check_unchanged(target, expected, path)
            target.mkdir(parents=True, exist_ok=True)
        st = os.lstat(target)
        if not stat.S_ISDIR(st.st_mode):
            raise LocalChanged(f"{path}: changed locally meanwhile")
        return dir_key(st)

    def _place(self, tmp: Path, path: str, expected: LocalFile | None) -> StatKey:
        target = local_path(self.root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        local_path(self.root, path)  # re-check: mkdir must not have raced with a symlink
        _check_unchanged(target, expected, path)
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return stat_key(os.lstat(target))

    async def delete_local(self, path: str, expected: LocalFile) -> None:
        if expected.is_dir:
            await self._thread(self._delete_dir, path, expected)
        else:
            # Park the file under a second name first, record it, and only then remove the old
            # name: a download looking for this content finds it under one name or the other.
            spot = self._parking.spot()
            linked = await self._thread(self._park, path, expected, spot)
            replaced = self._parking.add(expected.hash, spot)
            if replaced is not None:
                await self._thread(unlink_quietly, replaced)
            if linked:
                await self._thread(os.unlink, local_path(self.root, path))
        await self.index.remove(path)

    def _delete_dir(self, path: str, expected: LocalFile) -> None:
        target = local_path(self.root, path)
        _check_unchanged(target, expected, path)
        try:
            target.rmdir()
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            raise FolderNotEmpty(path, [c.name for c in target.iterdir()]) from None

    def _park(self, path: str, expected: LocalFile, spot: Path) -> bool:
        """Give the file a second name at *spot*; True if the old name still has to go (a
        file system without hard links gets a rename instead)."""
        target = local_path(self.root, path)
        _check_unchanged(target, expected, path)
        try:
            os.link(target, spot, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            os.rename(target, spot)
            return False
        return True

    async def set_aside(self, local: LocalFile) -> str:
        """Rename the local file to a conflict copy next to it; returns the copy's wire path."""
        result: str = await self._thread(self._set_aside, local)
        return result

    def _set_aside(self, local: LocalFile) -> str:
        target = local_path(self.root, local.path)
        _check_unchanged(target, local, local.path)
        when = datetime.now(UTC)
        candidate = conflict_name(local.path, self._name, when)
        n = 1
        while os.path.lexists(self.root / candidate):
            n += 1
            candidate = conflict_name(local.path, f"{self._name}-{n}", when)
        os.rename(target, self.root / candidate)
        return candidate


def normalize_name(root: Path, rel: str, client: str) -> str:
    """Rename local *rel* to its NFC form; if that name is taken, to a conflict name of it."""
    target = unicodedata.normalize("NFC", rel)
    if os.path.lexists(root / target):
        when = datetime.now(UTC)
        target = conflict_name(target, client, when)
        n = 1
        while os.path.lexists(root / target):
            n += 1
            target = conflict_name(unicodedata.normalize("NFC", rel), f"{client}-{n}", when)
    os.rename(root / rel, root / target)
    return target


def _read_verified(fd: int, size: int, offset: int, expected_hash: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size or hash_bytes(data) != expected_hash:
        raise LocalChanged("file changed since it was hashed")
    return data


def _write_verified(fd: int, data: bytes, expected_hash: str, size: int) -> None:
    if len(data) != size or hash_bytes(data) != expected_hash:
        raise ProtocolError(f"chunk {expected_hash} arrived corrupted")
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _stat_or_none(path: Path) -> StatKey | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return stat_key(st)


class FolderNotEmpty(LocalChanged):
    """A folder to delete still holds entries; `names` are what is in it."""

    def __init__(self, path: str, names: list[str]) -> None:
        super().__init__(f"{path}: folder is not empty yet")
        self.path = path
        self.names = names


def _check_unchanged(target: Path, expected: LocalFile | None, path: str) -> None:
    """Refuse to replace or remove anything but the exact item the decision was made about."""
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        if expected is None:
            return
        raise LocalChanged(f"{path}: vanished locally") from None
    if expected is not None and expected.is_dir:
        if not stat.S_ISDIR(st.st_mode) or st.st_ino != expected.stat.inode:
            raise LocalChanged(f"{path}: changed locally meanwhile")
        return
    if expected is None or not stat.S_ISREG(st.st_mode) or stat_key(st) != expected.stat:
        raise LocalChanged(f"{path}: changed locally meanwhile")
