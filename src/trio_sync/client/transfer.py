"""Moves content between the folder and the server, and records each result in the index.

Every local write is temp file (in the state folder) → hash verified → on disk → checked that the
target is still what we decided on → rename, made durable (client/landing.py; small files in
batches). The index is updated right after, so our own writes are recognised by stat, not by a
clock.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar, TypeVarTuple, Unpack

import trio

from ..core.budget import ByteBudget
from ..core.compression import pack, unpack
from ..core.durable import unlink_quietly
from ..core.hashing import hash_bytes
from ..core.offload import Offload
from ..errors import (
    DiskFull,
    LocalChanged,
    ProtocolError,
    RemoteError,
    TrioSyncError,
    single_error,
)
from ..protocol.frames import MISSING, RAW, Frame
from ..protocol.models import (
    ANNOUNCE_MIN_SIZE,
    DIR,
    MAX_ANNOUNCED_CHUNKS,
    Chunk,
    CommitRequest,
    FileEntry,
    Incoming,
)
from .ahead import Announced
from .batching import Batches
from .conflicts import free_conflict_name, move_aside
from .early import EarlySend
from .index import BaseEntry, Index, StatKey
from .landing import Landing, check_unchanged, place
from .progress import DOWN, UP, Moving, Progress
from .remote import Remote
from .scanner import LocalFile, anchored, dir_key, stat_key

log = logging.getLogger("trio_sync.client")
T = TypeVar("T")

#: Chunks of one file in flight at once, within the byte budget: enough to fill the upload
#: batches in flight (batching.PUTS_IN_FLIGHT of PUT_BATCH_BYTES) at the average chunk size.
CHUNKS_IN_FLIGHT = 32
#: Downloads at least this big keep their partial file in the state folder across restarts.
RESUME_MIN_SIZE = 8 * 1024 * 1024
#: A file up to this size whose content the folder does not have is fetched whole into memory
#: and written in one step; most files in a tree are this small.
SMALL_DOWNLOAD = 1024 * 1024
#: A file up to this size with content this folder never synced is sent without asking the
#: server first: the question would cost more than the bytes.
SEND_WITHOUT_ASKING = 64 * 1024
#: Where those partial files live, and how long one is kept if nothing resumes it.
PARTIAL_DIR = "partial"
PARTIAL_KEEP_SECONDS = 24 * 3600
#: Fetching ahead of a commit: chunk bytes asked for per request (they arrive one by one), how
#: long the server may hold a request open for chunks the uploader has not sent yet (then we ask
#: again, or stop if nothing came), and how many such requests are open at once.
AHEAD_WINDOW = 8 * 1024 * 1024
AHEAD_WAIT = 20.0
AHEAD_FETCHES = 2
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

    def drop(self, hash: str, spot: Path) -> None:
        """Forget *spot*, if it is still the file parked for *hash*."""
        found = self._files.get(hash)
        if found is not None and found[0] == spot:
            del self._files[hash]

    def expired(self) -> list[Path]:
        now = time.monotonic()
        old = [h for h, (_, since) in self._files.items() if now - since > self.KEEP_SECONDS]
        return [self._files.pop(h)[0] for h in old]


class PartialFiles:
    """What this process knows of the partial files of big downloads. The engine keeps one for
    the whole run: each connection has its own Transfer, and a reconnection must not forget."""

    def __init__(self, keep_ahead: float) -> None:
        #: A download or fetch-ahead working on the file; set when it is done with it.
        self.claims: dict[Path, trio.Event] = {}
        #: Offsets (by inode) that this process wrote and verified.
        self.held: dict[Path, tuple[int, set[int]]] = {}
        #: Filled ahead of a commit, not claimed by a download since: when the filling stopped.
        #: Dropped *keep_ahead* seconds after.
        self.filled_ahead: dict[Path, float] = {}
        self.keep_ahead = keep_ahead
        #: Files fetched ahead of announcements made in steps: named by the upload, since the
        #: version's hash came only at the end. A download of that version builds on them.
        self.by_upload: dict[Path, Announced] = {}

    def work_for(self, folder: Path, path: str, content_hash: str) -> Path:
        """The partial file for a download of *content_hash* to *path*, in *folder*."""
        for work, announced in self.by_upload.items():
            if announced.path == path and announced.hash == content_hash:
                return work
        return folder / partial_name(path, content_hash)

    def forget(self, work: Path) -> None:
        """*work* is gone, or about to be."""
        self.held.pop(work, None)
        self.filled_ahead.pop(work, None)
        self.by_upload.pop(work, None)

    @asynccontextmanager
    async def claim(self, work: Path) -> AsyncIterator[None]:
        """Work on partial file *work* alone (after whoever has it now)."""
        while (busy := self.claims.get(work)) is not None:
            await busy.wait()
        done = self.claims[work] = trio.Event()
        try:
            yield
        finally:
            del self.claims[work]
            done.set()


@dataclass(frozen=True, slots=True)
class SpaceLimits:
    """Free space a download leaves, and bytes fetched ahead at most (ClientConfig)."""

    reserve: int = 256 * 1024**2
    ahead_quota: int = 8 * 1024**3


class Transfer:
    def __init__(
        self,
        root: Path,
        state_dir: Path,
        index: Index,
        batches: Batches,
        remote: Remote,
        offload: Offload,
        client_name: str,
        parking: Parking,
        budget: ByteBudget,
        landing: Landing,
        partials: PartialFiles,
        *,
        compress: bool,
        space: SpaceLimits = SpaceLimits(),
        progress: Progress | None = None,
    ) -> None:
        self.root = root
        #: Big files' bytes as they move (small files are counted by the engine when done).
        self.progress = progress or Progress()
        self.tmp_dir = state_dir / "tmp"
        self.partial_dir = state_dir / PARTIAL_DIR
        self.index = index
        self.batches = batches
        self._remote = remote
        self._offload = offload
        self._name = client_name
        self._parking = parking
        self._budget = budget
        self._landing = landing
        self._compress = compress
        self._space = space
        self._umask = _umask()
        self._names = itertools.count()
        self._partials = partials
        #: The fetch-ahead running for each path, cancelled if a newer version is announced.
        self._ahead: dict[str, trio.CancelScope] = {}

    async def _thread(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await self._offload.run_sync(fn, *args)

    # -- towards the server -------------------------------------------------------------------

    @contextlib.contextmanager
    def sending_early(
        self, path: str, nursery: trio.Nursery, done_writing: Callable[[StatKey], bool]
    ) -> Iterator[EarlySend]:
        """Scan and upload *path* inside this block to send a big file while it is hashed
        (client/early.py), in tasks of *nursery*; what the upload did not take over is stopped
        when the block ends."""
        early = EarlySend(
            path,
            nursery,
            self.batches,
            self._budget,
            self._offload,
            open_file=partial(self._open_to_read, path),
            read_frame=self._read_frame,
            done_writing=done_writing,
            announce=self._remote.announce,
            progress=self.progress,
        )
        try:
            yield early
        finally:
            early.stop()

    async def upload(
        self, local: LocalFile, base_rev: int, early: EarlySend | None = None
    ) -> FileEntry:
        if local.is_dir:
            entry = await self.batches.commit(
                CommitRequest(path=local.path, base_rev=base_rev, kind=DIR)
            )
            await self.index.put(BaseEntry.synced(entry, local.stat, we_wrote_it=True))
            return entry
        moving = None
        if local.stat.size > SEND_WITHOUT_ASKING:
            moving = self.progress.begin(local.path, UP, local.stat.size)
        try:
            return await self._upload_file(local, base_rev, early, moving)
        finally:
            if moving is not None:
                self.progress.end(moving)

    async def _upload_file(
        self, local: LocalFile, base_rev: int, early: EarlySend | None, moving: Moving | None
    ) -> FileEntry:
        unique = tuple(dict.fromkeys(c.hash for c in local.chunks))
        announced = False
        if early is not None and early.started:
            # Sending began while the file was hashed: announce, let it finish, send the rest.
            await early.asked()
            if await early.finish(local.hash, local.stat.size):
                announced = True  # step by step, as it was cut
            elif not early.cut_short:  # else the rest is asked about below, and announced then
                await self._announce(local, early.lacking)
                announced = True
            await early.sent()
            unique = tuple(h for h in unique if h not in early.stored)
        if local.stat.size <= SEND_WITHOUT_ASKING and not any(map(self.index.has_chunk, unique)):
            missing = set(unique)
        else:
            missing = await self.batches.missing(unique) if unique else set()
        if missing and local.stat.size <= SEND_WITHOUT_ASKING:
            await self._send_small(local, missing)
        elif missing:
            if not announced:
                await self._announce(local, missing)
            if moving is not None:  # what the server has already counts as done
                sizes = {c.hash: c.size for c in local.chunks}
                moving.done += sum(sizes[h] for h in unique if h not in missing)
            fd = await self._thread(self._open_to_read, local.path)
            try:
                await self._send_chunks(fd, local, missing, moving)
            finally:
                os.close(fd)
        # The server checked every chunk against its hash; make sure the file is still what we
        # hashed, so the commit does not mix old chunks it already had with new ones.
        if await self._thread(self._stat_now, local.path) != local.stat:
            raise LocalChanged(f"{local.path}: changed during upload")
        entry = await self.batches.commit(
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

    async def _announce(self, local: LocalFile, missing: set[str]) -> None:
        """Tell the other clients a big upload starts, so that they can fetch as it arrives.
        Only a head start: an old server, or a refusal, changes nothing else. An edit that
        sends a few chunks of a big file is not worth the chunk list it would cost."""
        sending = sum(c.size for c in local.chunks if c.hash in missing)
        if sending < ANNOUNCE_MIN_SIZE or len(local.chunks) > MAX_ANNOUNCED_CHUNKS:
            return
        try:
            await self._remote.announce(
                Incoming(local.path, local.hash, local.stat.size, local.chunks)
            )
        except (RemoteError, ProtocolError) as e:
            log.debug("could not announce %s: %s", local.path, e)

    async def _send_small(self, local: LocalFile, missing: set[str]) -> None:
        """A small file's chunks are opened, read and packed in one thread call: most files in
        a tree are small, and each thread call costs more than reading 4 KiB."""
        await self._budget.acquire(local.stat.size)
        try:
            frames = await self._thread(self._read_frames, local, missing)
            for frame in frames:
                if not await self.batches.put(frame):
                    raise LocalChanged(f"{local.path}: changed since it was hashed")
        finally:
            self._budget.release(local.stat.size)

    def _read_frames(self, local: LocalFile, missing: set[str]) -> list[Frame]:
        fd = self._open_to_read(local.path)
        try:
            frames: dict[str, Frame] = {}
            offset = 0
            for chunk in local.chunks:
                if chunk.hash in missing and chunk.hash not in frames:
                    frames[chunk.hash] = self._read_frame(fd, chunk, offset)
                offset += chunk.size
            return list(frames.values())
        finally:
            os.close(fd)

    async def _send_chunks(
        self, fd: int, local: LocalFile, missing: set[str], moving: Moving | None
    ) -> None:
        """Send the missing chunks, several at a time, within the shared byte budget."""
        in_flight = trio.Semaphore(CHUNKS_IN_FLIGHT)
        async with single_error(), trio.open_nursery() as nursery:
            offset = 0
            for chunk in local.chunks:
                if chunk.hash in missing:
                    missing.discard(chunk.hash)  # a chunk repeated in the file goes once
                    await in_flight.acquire()
                    await self._budget.acquire(chunk.size)
                    nursery.start_soon(
                        self._send_chunk, fd, chunk, offset, in_flight, local.path, moving
                    )
                offset += chunk.size

    async def _send_chunk(
        self,
        fd: int,
        chunk: Chunk,
        offset: int,
        in_flight: trio.Semaphore,
        path: str,
        moving: Moving | None,
    ) -> None:
        try:
            frame = await self._thread(self._read_frame, fd, chunk, offset)
            if not await self.batches.put(frame):
                raise LocalChanged(f"{path}: changed since it was hashed")
            if moving is not None:
                moving.done += chunk.size
        finally:
            self._budget.release(chunk.size)
            in_flight.release()

    # anchored opens each parent folder: it runs in a thread, like any other disk access.
    def _open_to_read(self, path: str) -> int:
        with anchored(self.root, path) as target:
            return os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def _stat_now(self, path: str) -> StatKey | None:
        try:
            with anchored(self.root, path) as target:
                return _stat_or_none(target)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _read_frame(self, fd: int, chunk: Chunk, offset: int) -> Frame:
        data = os.pread(fd, chunk.size, offset)
        if len(data) != chunk.size:
            raise LocalChanged("file shrank since it was hashed")
        encoding, payload = pack(data) if self._compress else (RAW, data)
        return Frame(chunk.hash, encoding, payload)

    async def delete_remote(self, path: str, base_rev: int) -> FileEntry:
        entry = await self.batches.commit(CommitRequest(path=path, base_rev=base_rev, deleted=True))
        await self.index.remove(path)
        return entry

    # -- towards the folder -------------------------------------------------------------------

    async def download(self, entry: FileEntry, expected: LocalFile | None) -> int:
        """Make the local file *entry*'s content, if it is still *expected* (None: absent).

        Chunks already in the folder (in the old version of this file, or in any other file) are
        copied from there; only the rest is fetched. Returns the bytes fetched from the server.
        """
        if entry.kind == DIR:
            key = await self._thread(self._make_dir, entry.path, expected)
            await self.index.put(BaseEntry.synced(entry, key, we_wrote_it=True))
            return 0
        # Big downloads keep their partial file across restarts and resume from it.
        resumable = entry.size >= RESUME_MIN_SIZE
        work = (
            self._partials.work_for(self.partial_dir, entry.path, entry.hash)
            if resumable
            else self._temp_name()
        )
        if entry.size > SMALL_DOWNLOAD:
            free = await self._thread(_free_bytes, self.partial_dir)
            if entry.size > free - self._space.reserve:
                raise DiskFull(
                    f"{entry.path}: not enough free space ({entry.size} bytes needed, {free}"
                    f" free, {self._space.reserve} kept free); waiting for space"
                )
        sources = {c.hash: self.index.chunk_sources(c.hash) for c in entry.chunks}
        parked = self._parking.take(entry.hash)
        if entry.size <= SMALL_DOWNLOAD and parked is None and not any(sources.values()):
            return await self._download_small(entry, expected)
        fetched = 0
        moving: Moving | None = None
        # A fetch-ahead of this very content may be filling the partial file: its chunks are
        # all on the server now, so it ends soon, and what it wrote is kept.
        async with self._partials.claim(work):
            self._partials.filled_ahead.pop(work, None)
            try:
                fd, held = await self._open_work(work, parked)
                try:
                    needed = await self._thread(
                        self._fill_locally, fd, entry.chunks, entry.size, sources, held
                    )
                    moving = self.progress.begin(entry.path, DOWN, entry.size, _held(entry, needed))
                    if needed:
                        # A concurrent local deletion may have parked the whole file meanwhile.
                        parked = self._parking.take(entry.hash)
                        if parked is not None:
                            os.close(fd)
                            fd = -1
                            fd, held = await self._open_work(work, parked)
                            needed = await self._thread(
                                self._fill_locally, fd, entry.chunks, entry.size, {}, held
                            )
                            moving.done = _held(entry, needed)
                    fetched = await self._fetch_chunks(fd, needed, moving)
                    sync = resumable or self._landing.wants_synced_files
                    await self._thread(partial(self._finish_file, fd, entry, sync=sync))
                finally:
                    if moving is not None:
                        self.progress.end(moving)
                    if fd >= 0:
                        os.close(fd)
                if resumable:
                    final = await self._thread(self._place, work, entry.path, expected)
                else:
                    # With others, in one durable batch, as small downloads are: a folder
                    # moved elsewhere arrives as many files built from parked copies.
                    final = await self._landing.place(work, entry.path, expected)
                self._partials.forget(work)
                # Recorded before the claim ends: a fetch-ahead of this version waiting for it
                # must see that the file is here, or it would fill a new partial file.
                await self.index.put(BaseEntry.synced(entry, final, we_wrote_it=True))
            finally:
                if not resumable:
                    self._partials.held.pop(work, None)
                    with trio.CancelScope(shield=True):
                        await self._thread(unlink_quietly, work)
        return fetched

    def plan_ahead(self, announced: Announced) -> trio.CancelScope | None:
        """Whether to fetch *announced* ahead: the cancel scope to run `fetch_ahead` in, or
        None. Called in the order the announcements arrive: a newer version of a path cancels
        the fetch-ahead of the older one, whose uploader has moved on."""
        work = self._ahead_work(announced)
        if announced.size < RESUME_MIN_SIZE or work in self._partials.claims:
            return None
        if self._have(announced):
            return None
        older = self._ahead.get(announced.path)
        if older is not None:
            older.cancel()
        scope = self._ahead[announced.path] = trio.CancelScope()
        return scope

    def _ahead_work(self, announced: Announced) -> Path:
        if announced.upload:  # named before its hash is known
            return self.partial_dir / partial_name(announced.path, announced.upload)
        assert announced.hash is not None
        return self.partial_dir / partial_name(announced.path, announced.hash)

    def _have(self, announced: Announced) -> bool:
        base = self.index.get(announced.path)
        return base is not None and base.hash == announced.hash

    async def fetch_ahead(self, announced: Announced, scope: trio.CancelScope) -> int:
        """Fetch the chunks of a file another client is uploading into its partial file, as
        they reach the server, so that its download has little left to do when the commit
        comes. Stops when the chunks stop coming. Returns the bytes fetched."""
        work = self._ahead_work(announced)
        with scope:
            try:
                await self.drop_stale_ahead()
                await self._drop_stale_partials(announced.path, work)
                kept, free = await self._thread(_partial_usage, self.partial_dir, work)
                if kept + announced.size > self._space.ahead_quota or announced.size > free // 2:
                    log.info(
                        "not fetching %s ahead: %d bytes would pass the quota (%d kept) or"
                        " half the free space (%d)", announced.path, announced.size, kept, free,
                    )  # fmt: skip
                    return 0
                async with self._partials.claim(work):
                    if self._have(announced):
                        return 0  # committed and downloaded while we waited for the file
                    if announced.upload:
                        self._partials.by_upload[work] = announced
                    fd, held = await self._open_work(work, None)
                    try:
                        return await _Arriving(self, fd, announced, held).run()
                    finally:
                        os.close(fd)
                        # Of no use: no version will be known by it, or a newer version of the
                        # path was announced (whose fetch-ahead may have looked for older
                        # partial files to drop before this one was made).
                        if announced.broken or scope.cancel_called:
                            self._partials.forget(work)
                            with trio.CancelScope(shield=True):
                                await self._thread(unlink_quietly, work)
                        else:
                            self._partials.filled_ahead[work] = trio.current_time()
            finally:
                if self._ahead.get(announced.path) is scope:
                    del self._ahead[announced.path]
        return 0  # cancelled: a newer version was announced

    async def drop_stale_ahead(self) -> None:
        """Drop the files fetched ahead whose commit has not come in time."""
        limit = trio.current_time() - self._partials.keep_ahead
        stale = [w for w, when in self._partials.filled_ahead.items() if when <= limit]
        for work in stale:
            if work in self._partials.claims:
                continue  # in use again: a download takes it, or a fetch-ahead refreshes it
            async with self._partials.claim(work):
                if work not in self._partials.filled_ahead:
                    continue  # a download took it meanwhile
                self._partials.forget(work)
                await self._thread(unlink_quietly, work)

    async def _drop_stale_partials(self, path: str, keep: Path) -> None:
        """A new version of *path* is coming: partial files of its older ones are stale (a
        growing log would otherwise leave one per announced upload). One still in use is
        dropped once its user is done with it."""
        pattern = f"{_partial_prefix(path)}*.part"
        found = await self._thread(lambda: list(self.partial_dir.glob(pattern)))
        for other in found:
            if other != keep:
                async with self._partials.claim(other):
                    self._partials.forget(other)
                    await self._thread(unlink_quietly, other)

    async def _download_small(self, entry: FileEntry, expected: LocalFile | None) -> int:
        """Fetch every chunk into memory, write the file in one step, and hand it to the landing,
        which places it with others in one durable batch."""
        wanted = {c.hash: c.size for c in entry.chunks}
        frames: dict[str, Frame] = {}

        async def fetch(hash: str, size: int) -> None:
            frames[hash] = await self.batches.fetch(hash, size)

        work = self._temp_name()
        try:
            await self._budget.acquire(entry.size)
            try:
                async with single_error(), trio.open_nursery() as nursery:
                    for hash, size in wanted.items():
                        nursery.start_soon(fetch, hash, size)
                fetched = sum(len(f.payload) for f in frames.values())
                await self._thread(self._write_small, work, entry, frames)
            finally:
                frames.clear()
                self._budget.release(entry.size)
            final = await self._landing.place(work, entry.path, expected)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._thread(unlink_quietly, work)
            raise
        await self.index.put(BaseEntry.synced(entry, final, we_wrote_it=True))
        return fetched

    def _write_small(self, work: Path, entry: FileEntry, frames: dict[str, Frame]) -> None:
        sizes = {c.hash: c.size for c in entry.chunks}
        chunks = {h: _decoded(frame, sizes[h]) for h, frame in frames.items()}
        fd = os.open(work, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, b"".join(chunks[c.hash] for c in entry.chunks), 0)
            self._finish_file(fd, entry, sync=self._landing.wants_synced_files)
        finally:
            os.close(fd)

    def _temp_name(self) -> Path:
        # The state folder's tmp/ is emptied at start and only this process writes there.
        return self.tmp_dir / f"{next(self._names)}.part"

    async def _open_work(self, work: Path, parked: Path | None) -> tuple[int, set[int]]:
        """Open the file a download is built in (a parked copy of the content becomes it), with
        the offsets in it this process already wrote and verified."""

        def open_() -> tuple[int, int]:
            if parked is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(parked, work)
            fd = os.open(work, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            return fd, os.fstat(fd).st_ino

        fd, inode = await self._thread(open_)
        known = self._partials.held.get(work)
        if known is None or known[0] != inode:  # another file than the one we wrote
            known = self._partials.held[work] = (inode, set())
        return fd, known[1]

    def _fill_locally(
        self,
        fd: int,
        chunks: Sequence[Chunk],
        size: int,
        sources: dict[str, list[tuple[str, int]]],
        held: set[int],
        *,
        start: int = 0,
        written: dict[str, int] | None = None,
    ) -> dict[str, tuple[int, list[int]]]:
        """Put every chunk the work file does not hold yet and the folder has in place.
        Returns what is left to fetch: hash -> (size, offsets). *held* names offsets known
        to be in place already, and gains those put there now. From a *start* past 0 (a later
        step of an announcement) the file is sized already, and *written* names chunks it
        holds itself (hash -> offset)."""
        resumed = False
        if start == 0:
            resumed = os.fstat(fd).st_size > 0
            os.ftruncate(fd, size)
        needed: dict[str, tuple[int, list[int]]] = {}
        opened: dict[str, int | None] = {}
        try:
            offset = start
            for chunk in chunks:
                if resumed and (offset in held or _holds(fd, chunk, offset)):
                    held.add(offset)
                elif chunk.hash in needed:
                    needed[chunk.hash][1].append(offset)
                else:
                    data = None
                    if written and chunk.hash in written:
                        data = os.pread(fd, chunk.size, written[chunk.hash])
                        if len(data) != chunk.size or hash_bytes(data) != chunk.hash:
                            data = None
                    if data is None:
                        data = self._find_local(chunk, sources.get(chunk.hash, ()), opened)
                    if data is None:
                        needed[chunk.hash] = (chunk.size, [offset])
                    else:
                        _write_all(fd, data, offset)
                        held.add(offset)
                offset += chunk.size
        finally:
            for source_fd in opened.values():
                if source_fd is not None:
                    os.close(source_fd)
        return needed

    def _find_local(
        self, chunk: Chunk, places: Iterable[tuple[str, int]], opened: dict[str, int | None]
    ) -> bytes | None:
        for path, offset in places:
            if path not in opened:
                try:
                    opened[path] = self._open_to_read(path)
                except (OSError, TrioSyncError):
                    opened[path] = None
            source_fd = opened[path]
            if source_fd is None:
                continue
            data = os.pread(source_fd, chunk.size, offset)
            if len(data) == chunk.size and hash_bytes(data) == chunk.hash:
                return data  # the hash is the proof: it does not matter if the file changed
        return None

    async def _fetch_chunks(
        self, fd: int, needed: dict[str, tuple[int, list[int]]], moving: Moving
    ) -> int:
        fetched = 0
        in_flight = trio.Semaphore(CHUNKS_IN_FLIGHT)

        async def fetch(hash: str, size: int, offsets: list[int]) -> None:
            nonlocal fetched
            try:
                frame = await self.batches.fetch(hash, size)
                await self._thread(_write_fetched, fd, frame, size, offsets)
                fetched += len(frame.payload)
                moving.done += size * len(offsets)
            finally:
                self._budget.release(size)
                in_flight.release()

        async with single_error(), trio.open_nursery() as nursery:
            for hash, (size, offsets) in needed.items():
                await in_flight.acquire()
                await self._budget.acquire(size)
                nursery.start_soon(fetch, hash, size, offsets)
        return fetched

    def _finish_file(self, fd: int, entry: FileEntry, *, sync: bool = True) -> None:
        mode = 0o666 & ~self._umask
        if entry.executable:
            mode |= (mode & 0o444) >> 2  # x wherever r is allowed
        os.fchmod(fd, mode)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        if sync:
            os.fsync(fd)

    def _make_dir(self, path: str, expected: LocalFile | None) -> StatKey:
        with anchored(self.root, path, create=True) as target:
            if expected is None or not expected.is_dir:
                check_unchanged(target, expected, path)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(target)
            st = os.lstat(target)
        if not stat.S_ISDIR(st.st_mode):
            raise LocalChanged(f"{path}: changed locally meanwhile")
        return dir_key(st)

    def _place(self, tmp: Path, path: str, expected: LocalFile | None) -> StatKey:
        return place(self.root, tmp, path, expected, sync=True, client=self._name)

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
                try:
                    await self._thread(self._unpark_name, path, expected, spot)
                except LocalChanged:
                    # The user's file, changed or replaced meanwhile, keeps its name; the spot
                    # must not stay a second name of it (a download could write into a spot).
                    self._parking.drop(expected.hash, spot)
                    await self._thread(unlink_quietly, spot)
                    raise
        await self.index.remove(path)

    def _delete_dir(self, path: str, expected: LocalFile) -> None:
        with anchored(self.root, path) as target:
            check_unchanged(target, expected, path)
            try:
                target.rmdir()
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
                raise FolderNotEmpty(path, [c.name for c in target.iterdir()]) from None

    def _park(self, path: str, expected: LocalFile, spot: Path) -> bool:
        """Give the file a second name at *spot*; True if the old name still has to go (a
        file system without hard links gets a rename instead)."""
        with anchored(self.root, path) as target:
            check_unchanged(target, expected, path)
            try:
                os.link(target, spot, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                    raise
                os.rename(target, spot)
                return False
        return True

    def _unpark_name(self, path: str, expected: LocalFile, spot: Path) -> None:
        with anchored(self.root, path) as target:
            folder = target.parent
            remove_parked_name(
                target,
                expected.stat,
                spot,
                keep_as=lambda: (
                    folder / free_conflict_name(folder, path, self._name).split("/")[-1]
                ),
            )

    async def set_aside(self, local: LocalFile) -> str:
        """Rename the local file to a conflict copy next to it; returns the copy's wire path."""
        result: str = await self._thread(self._set_aside, local)
        return result

    def _set_aside(self, local: LocalFile) -> str:
        with anchored(self.root, local.path) as target:
            check_unchanged(target, local, local.path)
            return move_aside(target, local.path, self._name)


def remove_parked_name(
    target: Path, expected: StatKey, spot: Path, *, keep_as: Callable[[], Path]
) -> None:
    """Remove *target*, the old name of a file parked at *spot*, unless the user changed it
    since it was checked: written to in place (the parked name sees that too) or replaced by a
    new file; then LocalChanged, and the file keeps its name. A write that lands in the instant
    before the unlink gets its name back, or *keep_as()* if a new file took the name meanwhile."""
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        same = os.path.samestat(st, os.lstat(spot))
    except FileNotFoundError:  # a download took the parked name: compare with the check
        same = st.st_ino == expected.inode
    if not same or not stat.S_ISREG(st.st_mode) or stat_key(st) != expected:
        raise LocalChanged(f"{target}: changed locally while being deleted")
    os.unlink(target)
    try:
        after = stat_key(os.lstat(spot))
    except FileNotFoundError:
        return
    if after != expected:
        try:
            os.link(spot, target, follow_symlinks=False)
        except FileExistsError:
            os.link(spot, keep_as(), follow_symlinks=False)
        raise LocalChanged(f"{target}: changed locally while being deleted")


class _Arriving:
    """One fetch-ahead: puts in place what the folder already has, and fetches the rest as it
    reaches the server, while the announcement grows (when it comes in steps) and the chunks
    keep coming."""

    def __init__(self, transfer: Transfer, fd: int, announced: Announced, held: set[int]) -> None:
        self._transfer = transfer
        self._fd = fd
        self._announced = announced
        self._held = held
        #: What is left to fetch: hash -> (size, offsets); offsets may grow while a chunk is
        #: written, when a later step repeats it.
        self._needed: dict[str, tuple[int, list[int]]] = {}
        self._pending: deque[str] = deque()  # in file order, the order the uploader sends them
        self._got: dict[str, int] = {}  # fetched and written: hash -> one offset it is at
        self._writing: set[str] = set()
        self._taken = 0  # chunks of the announcement placed or queued so far
        self._end = 0  # where they end in the file
        self._all_known = False
        self._more = trio.Event()
        self._moving: Moving | None = None
        self.fetched = 0

    async def run(self) -> int:
        announced = self._announced
        self._moving = self._transfer.progress.begin(announced.path, DOWN, announced.size, 0)
        try:
            # Two windows at once: one is written while the next is on its way, so a
            # fetch-ahead that starts behind the upload catches up.
            async with single_error(), trio.open_nursery() as nursery:
                nursery.start_soon(self._follow, nursery.cancel_scope)
                for _ in range(AHEAD_FETCHES):
                    nursery.start_soon(self._fetch_windows, nursery.cancel_scope)
        finally:
            self._transfer.progress.end(self._moving)
        return self.fetched

    async def _follow(self, stop: trio.CancelScope) -> None:
        """Take the chunks announced so far, then each step as it comes."""
        transfer, announced = self._transfer, self._announced
        assert self._moving is not None
        while True:
            chunks = announced.chunks[self._taken :]
            if chunks:
                sources = {c.hash: transfer.index.chunk_sources(c.hash) for c in chunks}
                # The first step sizes the file (and resumes one we wrote before).
                fill = partial(transfer._fill_locally, start=self._end, written=dict(self._got))
                needed = await transfer._thread(
                    fill, self._fd, chunks, announced.size, sources, self._held
                )
                size = sum(c.size for c in chunks)
                self._taken += len(chunks)
                self._end += size
                self._moving.done += size - sum(n * len(at) for n, at in needed.values())
                await self._queue(needed)
                continue  # more may have come meanwhile
            if announced.broken:
                stop.cancel()  # a step was missed: the download does the rest
                return
            if announced.hash is not None and self._taken == len(announced.chunks):
                self._all_known = True
                self._wake()
                return
            await announced.wait_changed()

    async def _queue(self, needed: dict[str, tuple[int, list[int]]]) -> None:
        for hash, (size, offsets) in needed.items():
            known = self._needed.get(hash)
            if known is None:
                self._needed[hash] = (size, offsets)
                self._pending.append(hash)
            elif hash in self._got:  # written meanwhile: copy it from where it is
                written = self._got[hash]
                copy = partial(_copy_within, self._fd, hash, size, written, offsets)
                await self._transfer._thread(copy)
                self._held.update(offsets)
                known[1].extend(offsets)
                self._count(size * len(offsets))
            else:  # on its way: written to these offsets too when it comes
                known[1].extend(offsets)
        self._wake()

    def _wake(self) -> None:
        self._more.set()
        self._more = trio.Event()

    def _count(self, size: int) -> None:
        assert self._moving is not None
        self._moving.done += size

    async def _arrived(self, frame: Frame) -> None:
        hash = frame.hash
        if frame.encoding == MISSING or hash not in self._needed:
            return
        if hash in self._got or hash in self._writing:
            return
        chunk_size, offsets = self._needed[hash]
        self._writing.add(hash)
        # Counted while it is decoded and written, not while the server waits for it: a
        # fetch-ahead must not hold back the downloads of files already committed.
        await self._transfer._budget.acquire(chunk_size)
        try:
            # A later step may add offsets while this one is written.
            while todo := [at for at in offsets if at not in self._held]:
                await self._transfer._thread(_write_fetched, self._fd, frame, chunk_size, todo)
                self._held.update(todo)
                self._count(chunk_size * len(todo))
            self._got[hash] = offsets[0]
        finally:
            self._transfer._budget.release(chunk_size)
            self._writing.discard(hash)
        self.fetched += len(frame.payload)

    def _next_window(self) -> list[str]:
        pending, needed = self._pending, self._needed
        window = [pending.popleft()]
        size = needed[window[0]][0]
        while pending and size + needed[pending[0]][0] <= AHEAD_WINDOW:
            size += needed[pending[0]][0]
            window.append(pending.popleft())
        return window

    async def _fetch_windows(self, stop: trio.CancelScope) -> None:
        transfer = self._transfer
        while True:
            if not self._pending:
                if self._all_known:
                    return
                with trio.move_on_after(AHEAD_WAIT) as waited:
                    await self._more.wait()  # for the uploader's next step
                if waited.cancelled_caught:
                    stop.cancel()
                    return
                continue
            window = self._next_window()
            before = len(self._got)
            await transfer._remote.fetch_chunks(
                window, self._arrived, compress=transfer._compress, wait=AHEAD_WAIT
            )
            if len(self._got) == before:
                # Nothing came, for either window, in all that time: the upload stopped (or
                # was never going to send these).
                stop.cancel()
                return
            # What did not come in time is asked for first next time.
            self._pending.extendleft(reversed([h for h in window if h not in self._got]))


def _copy_within(fd: int, hash: str, size: int, source: int, offsets: list[int]) -> None:
    data = os.pread(fd, size, source)
    if len(data) != size or hash_bytes(data) != hash:
        raise ProtocolError(f"chunk {hash} changed in a partial file")
    for offset in offsets:
        _write_all(fd, data, offset)


def partial_name(path: str, content_hash: str) -> str:
    """The resumable partial download of *content_hash* for *path* (in the partial folder)."""
    return f"{_partial_prefix(path)}{content_hash[:24]}.part"


def _partial_prefix(path: str) -> str:
    return f"{hash_bytes(path.encode())[:24]}-"


def _holds(fd: int, chunk: Chunk, offset: int) -> bool:
    data = os.pread(fd, chunk.size, offset)
    return len(data) == chunk.size and hash_bytes(data) == chunk.hash


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _decoded(frame: Frame, size: int) -> bytes:
    data = unpack(frame.encoding, frame.payload, size)
    if len(data) != size or hash_bytes(data) != frame.hash:
        raise ProtocolError(f"chunk {frame.hash} arrived corrupted")
    return data


def _write_fetched(fd: int, frame: Frame, size: int, offsets: list[int]) -> None:
    data = _decoded(frame, size)
    for offset in offsets:
        _write_all(fd, data, offset)


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


def _free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _partial_usage(folder: Path, besides: Path) -> tuple[int, int]:
    """(bytes the partial files other than *besides* stand for, free bytes)."""
    held = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.path != os.fspath(besides):
                with contextlib.suppress(FileNotFoundError):
                    held += entry.stat(follow_symlinks=False).st_size
    return held, _free_bytes(folder)


def _held(file: FileEntry, needed: dict[str, tuple[int, list[int]]]) -> int:
    """The bytes of *file* in place already: all but those *needed*."""
    return file.size - sum(size * len(offsets) for size, offsets in needed.values())
