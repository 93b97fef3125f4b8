"""The client's one long-lived nursery: watcher, event listener and transfer workers.

Data flows one way: watcher / event stream → PathQueue → worker: scan (local) + index (base) +
remote state → `decide` → Transfer. Nothing else changes files or the index.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from stat import S_ISREG
from typing import Any

import trio

from ..config import ClientConfig
from ..core.budget import ByteBudget
from ..core.durable import group_syncer, unlink_quietly
from ..core.ignore import IGNORE_FILE, IgnoreRules
from ..core.offload import Offload
from ..core.reconcile import Action, Content, Side, decide
from ..errors import (
    ChunksMissing,
    Conflict,
    DiskFull,
    FolderInUse,
    IncompatibleServer,
    InvalidPath,
    LocalChanged,
    ProtocolError,
    RejectedByServer,
    RemoteError,
    ServerReset,
    ServerUnavailable,
    StateError,
    TrioSyncError,
    single_error,
)
from ..protocol.models import CHUNKER, DIR, FileEntry, Incoming, is_valid_name
from ..protocol.paths import STATE_DIR_NAME, is_valid_path
from ..protocol.sse import ServerSentEvent
from . import moves, status
from .ahead import Announced
from .batching import Batcher, Batches, Pending
from .conflicts import normalize_name
from .early import EarlySend
from .guard import DeleteGuard, DeletionsHeld, GuardLimits
from .index import BaseEntry, Index, StatKey, is_racy
from .landing import Landing
from .progress import DELETED, DOWN, UP, Progress
from .queue import PathQueue
from .remote import Remote, connect
from .scanner import (
    Ignored,
    LocalFile,
    Scanner,
    StillWriting,
    Unsyncable,
    anchored,
    stat_key,
)
from .transfer import (
    PARTIAL_DIR,
    PARTIAL_KEEP_SECONDS,
    FolderNotEmpty,
    Parking,
    PartialFiles,
    SpaceLimits,
    Transfer,
)
from .watcher import Changes, watch

log = logging.getLogger("trio_sync.client")

#: Pause before looking again at a file that changed under us (it is probably still being written).
RECHECK_DELAY = 0.2
#: A file that changed under us this many times in a row is reported as failed (retried later).
MAX_RECHECKS = 25
#: A path whose index write failed (disk full) is tried again after this many seconds.
STATE_RETRY = 5.0
#: Live mode looks again at paths that failed (permissions, a folder in the way, ...) this often.
RETRY_FAILED_EVERY = 30.0
#: Announced uploads fetched ahead at once, and how many more may wait (later ones are skipped:
#: fetching ahead only saves time).
AHEAD_AT_ONCE = 2
AHEAD_QUEUE = 8
#: Paths whose stat one thread call compares with the index at most (`_still_synced`).
LOOKS_AT_ONCE = 512
#: `status` sizes at most this many of the paths waiting to go up.
STATUS_LOOKS = 10_000


class Engine:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.root = config.root
        self.state_dir = config.root / STATE_DIR_NAME
        #: This client's name in conflict copies: its token's, once the server has said it.
        self.name = config.name
        self.queue = PathQueue()
        #: The server's current version of every path we know of (tombstones included).
        self.remote_state: dict[str, FileEntry] | None = None
        #: The newest revision we have seen; the event stream resumes after it.
        self.cursor = 0
        #: Paths whose last attempt failed for a reason retrying will not fix; reported by --once.
        self.failed: dict[str, str] = {}
        self._warned: set[str] = set()
        self._rechecks: dict[str, int] = {}
        self._ignore_text = ""
        #: Disk work (hashing, reads, writes, renames) and the index's SQLite, off the Trio thread.
        self._io = Offload(4)
        self._db = Offload(1)
        self._index: Index | None = None
        self._guard: DeleteGuard | None = None
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._scanner = Scanner(self.root, self._io)
        #: Stats of paths that were synced when last seen, looked at together (made per
        #: connection, with the workers that use it).
        self._looks = self._new_looks()
        #: Where the event listener hands announced uploads to be fetched ahead (live mode).
        self._ahead: trio.MemorySendChannel[Announced] | None = None
        #: Uploads announced in steps and handed on, by (origin, upload id): later steps are
        #: added to them.
        self._announced: dict[tuple[str, str], Announced] = {}
        self._parking = Parking(self.state_dir / "tmp")
        self._partials = PartialFiles(config.ahead_keep_seconds)
        #: Chunk bytes all workers together may hold in memory at once.
        self._budget = ByteBudget(config.memory_budget)
        #: When we first saw a file still being written (see ClientConfig.settle_seconds).
        self._unsettled: dict[str, float] = {}
        #: Files the kernel said their writer finished with, and when we read that (ns).
        self._finished: dict[str, int] = {}
        #: What is moving now and what moved since the last reconcile began.
        self.progress = Progress()
        #: Events of a folder another client moved, held until the move is whole (moves.py).
        self._held = moves.HeldMoves()

    @property
    def index(self) -> Index:
        assert self._index is not None, "engine is not open"
        return self._index

    @asynccontextmanager
    async def _opened(self) -> AsyncIterator[None]:
        tmp = self.state_dir / "tmp"

        partials = self.state_dir / PARTIAL_DIR

        def prepare() -> int:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
                raise FolderInUse(
                    f"another trio-sync client is already syncing {self.root}"
                ) from None
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash: never complete files
            tmp.mkdir()
            partials.mkdir(exist_ok=True)
            _expire(partials, PARTIAL_KEEP_SECONDS)  # resumable downloads nobody came back for
            return lock

        lock = await trio.to_thread.run_sync(prepare)
        # No checkpoint between taking the lock and the try: a cancellation there would leak
        # the lock and refuse every later client on this folder.
        try:
            async with self._io.running(), self._db.running():
                await self._reload_ignore()
                self._index = await Index.open(self.state_dir / "state.db", self._db)
                limits = GuardLimits(
                    fraction=self.config.max_delete_fraction,
                    max_files=self.config.max_delete_files,
                )
                self._guard = await trio.to_thread.run_sync(
                    DeleteGuard, self.root, self.state_dir, self._index.files, self._io, limits
                )
                try:
                    yield
                finally:
                    with trio.CancelScope(shield=True):
                        await self._index.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial(shutil.rmtree, tmp, ignore_errors=True))
                os.close(lock)  # releases the flock

    @asynccontextmanager
    async def _remote(self) -> AsyncIterator[Remote]:
        async with connect(self.config) as remote:
            yield remote

    def _transfer(self, batches: Batches, remote: Remote, landing: Landing) -> Transfer:
        return Transfer(
            self.root,
            self.state_dir,
            self.index,
            batches,
            remote,
            self._io,
            self.name,
            self._parking,
            self._budget,
            landing,
            self._partials,
            compress=self.config.compress,
            space=SpaceLimits(self.config.free_space_reserve, self.config.ahead_quota),
            progress=self.progress,
        )

    # -- the two modes ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Live mode: sync, then follow both sides until cancelled. Reconnects with backoff.

        Signals readiness after the first full reconcile. Raises AuthenticationFailed.
        """
        ready: Callable[[], None] = task_status.started
        attempt = 0
        async with self._opened(), single_error(), trio.open_nursery() as outer:
            await outer.start(status.serve, self.state_dir / status.SOCKET_NAME, self.status)
            while True:
                try:
                    async with self._remote() as remote, single_error():
                        await self._connect(remote)
                        self._connected_since = time.time()
                        self.progress.reset()
                        async with trio.open_nursery() as nursery:
                            self.queue.mark_many(self._held.release())  # a move cut off
                            await nursery.start(
                                partial(
                                    watch,
                                    self.root,
                                    partial(self._on_local_change, remote=remote),
                                    on_overflow=self._mark_all,
                                    debounce_ms=self.config.debounce_ms,
                                )
                            )
                            await nursery.start(self._listen, remote)
                            assert self._guard is not None
                            nursery.start_soon(self._guard.watch, self._release_held)
                            transfer = await self._start_workers(nursery, remote, ahead=True)
                            nursery.start_soon(self._housekeeping, transfer)
                            await self._mark_all()
                            await self.queue.wait_idle()
                            self._log_reconciled()
                            attempt = 0
                            ready()
                            ready = _nothing
                except (ServerUnavailable, ServerReset, ProtocolError, StateError) as e:
                    # A malformed answer is treated like an outage: reconnect, reconcile again.
                    cap = min(self.config.backoff_max, self.config.backoff_initial * 2**attempt)
                    delay = cap / 2 + random.uniform(0, cap / 2)
                    attempt += 1
                    self._connected_since = None
                    self._last_error = f"lost the server: {e}"
                    log.warning("lost the server (%s); retrying in %.1f s", e, delay)
                    await trio.sleep(delay)

    async def sync_once(self) -> list[str]:
        """One full reconcile both ways. Returns what is still out of sync (empty: all agree)."""
        async with self._opened(), self._remote() as remote:
            async with single_error():
                await self._connect(remote, relist=True)
                self.progress.reset()
                async with trio.open_nursery() as nursery:
                    await self._start_workers(nursery, remote)
                    await self._mark_all()
                    await self.queue.wait_idle()
                    nursery.cancel_scope.cancel()
                self._log_reconciled()
                await self._connect(remote, relist=True)
            return await self._differences()

    # -- connection ---------------------------------------------------------------------------

    async def _connect(self, remote: Remote, *, relist: bool = False) -> None:
        info = await remote.info()
        if info.get("chunker") != CHUNKER:
            raise IncompatibleServer(
                f"the server chunks files as {info.get('chunker')!r}, this client as {CHUNKER!r};"
                " install the same trio-sync version on both"
            )
        you = info.get("you")
        if isinstance(you, str) and you != self.name and is_valid_name(you):
            # The server names clients by their tokens: conflict copies say the same.
            log.info("the server knows this client as %s", you)
            self.name = you
        server_id = info["server_id"]
        known = self.index.meta("server_id")
        if known != server_id:
            if known is not None:
                log.warning(
                    "the server's identity changed: forgetting sync history. Nothing is deleted;"
                    " files that differ are kept as conflict copies"
                )
                await self.index.clear()
            await self.index.set_meta("server_id", server_id)
            self.remote_state = None
        if self.remote_state is None or relist:
            listed_id, rev, entries = await remote.list_files()
            if listed_id != server_id:
                raise ServerReset("server identity changed during connect")
            self.remote_state, self.cursor = entries, rev
            log.info("server has %d files (rev %d)", len(entries), rev)

    async def _listen(
        self, remote: Remote, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False

        async def on_event(event: ServerSentEvent) -> None:
            nonlocal started
            try:
                data = json.loads(event.data)
            except (ValueError, RecursionError):
                raise ProtocolError(f"event with invalid JSON: {event.data[:200]!r}") from None
            if event.event == "hello":
                if not isinstance(data, dict) or data.get("server_id") != self.index.meta(
                    "server_id"
                ):
                    raise ServerReset("the server's identity changed")
                if not started:
                    started = True
                    task_status.started()
            elif event.event == "change":
                try:
                    entry = FileEntry.from_json(data)
                except InvalidPath as e:
                    log.warning("ignoring a change for an unsafe path: %s", e)
                    return
                self._learn(entry)
                self.cursor = max(self.cursor, entry.rev)
            elif event.event == "incoming":
                self._offer_ahead(data)

        await remote.listen(self.cursor, on_event)

    def _offer_ahead(self, data: object) -> None:
        try:
            incoming = Incoming.from_json(data)
        except (InvalidPath, ProtocolError) as e:
            log.debug("ignoring an announcement: %s", e)
            return
        if self._ahead is None or self._scanner.ignore.ignored(incoming.path, is_dir=False):
            return
        if incoming.upload:
            known = self._announced.get((incoming.origin, incoming.upload))
            if known is not None:
                known.add(incoming)
                return
            if incoming.offset != 0:
                return  # its start was missed: the download fetches it when it is committed
        announced = Announced(incoming)
        try:
            self._ahead.send_nowait(announced)
        except (trio.WouldBlock, trio.BrokenResourceError):
            return
        if announced.key is not None:
            self._announced[announced.key] = announced

    async def _fetch_ahead(
        self, transfer: Transfer, incoming: trio.MemoryReceiveChannel[Announced]
    ) -> None:
        """Fetch announced uploads while they arrive; their downloads, once committed, find
        the work done. A failure here only loses the head start."""

        slots = trio.Semaphore(AHEAD_AT_ONCE)
        waiting = 0

        async def one(item: Announced, scope: trio.CancelScope) -> None:
            nonlocal waiting
            try:
                async with slots:
                    waiting -= 1
                    fetched = await transfer.fetch_ahead(item, scope)  # at once if superseded
                log.debug("fetched %d bytes of %s ahead of its commit", fetched, item.path)
            except (TrioSyncError, OSError) as e:
                log.debug("fetching %s ahead stopped: %s", item.path, e)
            finally:
                self._forget_announced(item)

        async with incoming, trio.open_nursery() as nursery:
            async for item in incoming:
                # Planned here, as each arrives, so that a newer version cancels an older one
                # at once, even one still waiting for a slot.
                scope = None if waiting >= AHEAD_QUEUE else transfer.plan_ahead(item)
                if scope is None:
                    # Not fetched: only a head start, not worth a growing backlog.
                    self._forget_announced(item)
                else:
                    waiting += 1
                    nursery.start_soon(one, item, scope)

    def _forget_announced(self, item: Announced) -> None:
        if item.key is not None and self._announced.get(item.key) is item:
            del self._announced[item.key]

    def _live_remote_below(self, path: str) -> list[str]:
        assert self.remote_state is not None
        prefix = path + "/"
        return [p for p, e in self.remote_state.items() if p.startswith(prefix) and not e.deleted]

    def _learn(self, entry: FileEntry) -> None:
        if not self._know(entry):
            return
        held, release = self._held.take(entry, self.name)
        self.queue.mark_many(release)
        if not held:
            self.queue.mark(entry.path)

    def _know(self, entry: FileEntry) -> bool:
        """Record the server's version *entry* unless a newer one is known already; True if it
        was new. Answers to our own requests come back later than the events that may follow
        them (a commit's answer waits for its index write): they must not undo those."""
        assert self.remote_state is not None
        known = self.remote_state.get(entry.path)
        if known is not None and known.rev >= entry.rev:
            return False
        self.remote_state[entry.path] = entry
        return True

    # -- finding work ---------------------------------------------------------------------------

    async def _walk(self, *unders: str) -> list[str]:
        """Walk, first giving names that differ from their NFC form that form (Linux keeps
        both spellings apart; the wire and other systems would not)."""
        found = await self._scanner.walk(*unders)
        while self._scanner.denormalized:
            rel = self._scanner.denormalized.pop()
            try:
                new = await self._io.run_sync(normalize_name, self.root, rel, self.name)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.error("cannot rename %r to its NFC form: %s", rel, e)
                continue
            log.warning("renamed %r to %r: names are synced in Unicode NFC form", rel, new)
            found.append(new)
            found.extend(await self._scanner.walk(new))
        return found

    async def _mark_all(self) -> None:
        assert self.remote_state is not None
        paths = set(await self._walk())
        paths.update(self.index.paths())
        paths.update(p for p, e in self.remote_state.items() if not e.deleted)
        self.queue.mark_many(sorted(paths))

    async def _reload_ignore(self) -> bool:
        """Read the ignore rules again; True if they changed."""

        def read() -> str:
            try:
                return (self.root / IGNORE_FILE).read_text(encoding="utf-8", errors="replace")
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return ""

        text = await trio.to_thread.run_sync(read)
        if text == self._ignore_text:
            return False
        self._ignore_text = text
        self._scanner.ignore = IgnoreRules.parse(text)
        log.info("ignore rules %s", "loaded" if text else "cleared")
        return True

    async def _on_local_change(self, changes: Changes, *, remote: Remote | None = None) -> None:
        paths, folders_seen = changes.paths, changes.folders
        if remote is not None:
            for source, target in changes.moves:
                await self._move_out(remote, source, target)
        now = time.time_ns()
        for p in paths:
            if p in changes.finished:
                self._finished[p] = now
            else:
                self._finished.pop(p, None)
        if IGNORE_FILE in paths and await self._reload_ignore() and self.remote_state is not None:
            await self._mark_all()  # what is ignored changed: look at everything again
        changed = {p for p in paths if is_valid_path(p)}
        for p in paths - changed:
            if is_valid_path(unicodedata.normalize("NFC", p)):
                self._scanner.denormalized.add(p)  # renamed by _walk, if it still exists
        self.queue.mark_many(changed)
        # A folder moved or deleted is one event for the folder: look at everything under it.
        self.queue.mark_many(await self._walk(*changed))
        # A folder is known as one from the index, or from the watcher when it is new. Below a
        # new one, what was made and deleted again before its watch existed is found here: in
        # the index, or still with the worker that downloads it (it looks again when done).
        folders = {p for p in changed if (base := self.index.get(p)) is not None and base.is_dir}
        if folders_seen & changed:
            folders |= folders_seen & changed
            self.queue.mark_many(p for p in self.queue.busy if _below(p, folders))
        if folders:  # the index is big; most batches name only files
            self.queue.mark_many(p for p in self.index.paths() if _below(p, folders))

    async def _move_out(self, remote: Remote, source: str, target: str) -> None:
        """Tell the server that folder *source* moved to *target*, as one operation, when this
        client holds it as the server does (moves.py); else its paths go one by one."""
        if self.remote_state is None or not (is_valid_path(source) and is_valid_path(target)):
            return
        request = moves.plan_outgoing(
            source, target, self.index, self.remote_state, self._ignored, self.queue.busy
        )
        if request is None:
            return
        move, released = self._held.outgoing(source, target)
        self.queue.mark_many(released)
        try:
            entries = await remote.move(request)
            for entry in entries:
                self._know(entry)
            # The plan made sure the index holds exactly the paths the request names.
            below = [f"{source}/{rel}" if rel else source for rel in request.expect]
            await self.index.replace_many(
                below, moves.moved_bases(self.index, source, target, entries)
            )
            log.info("moved folder %s to %s on the server (%d paths)", source, target, len(below))
        except (RemoteError, ProtocolError, StateError) as e:
            # Refused (the server's folder changed, or it predates moves), not answered, or
            # not noted here: the looks at each path find out what happened, either way.
            log.info("%s -> %s: not moved as one (%s); path by path", source, target, e)
        finally:
            self.queue.mark_many(self._held.finish(move))

    async def _move_in(self, move: moves.Move) -> bool:
        """Apply a folder moved by another client by renaming ours, if ours is what was synced
        and nothing at either end is being worked on; True if done. Held paths are let go of
        either way; after a rename, those at the old place need no look."""
        assert self.remote_state is not None
        move.applying = True
        done = renamed = False
        try:
            busy = self.queue.busy - {move.target}
            plan = moves.plan_incoming(move, self.index, self.remote_state, self._ignored, busy)
            if plan is not None:
                renamed = await self._io.run_sync(
                    moves.rename_folder, self.root, move.source, move.target, plan.checks
                )
            if renamed:
                assert plan is not None
                await self.index.replace_many(plan.removed, plan.added)
                done = True
                log.info(
                    "moved folder %s to %s (%d paths, as on the server)",
                    move.source, move.target, len(plan.removed),
                )  # fmt: skip
        except StateError as e:
            log.error("%s: %s", move.target, e)  # each path's look adopts what is there
        finally:
            held = self._held.finish(move)
            if done:
                held = [p for p in held if not moves.at_or_below(p, move.source)]
            self.queue.mark_many(p for p in held if p != move.target)
        return done

    def _ignored(self, path: str, is_dir: bool) -> bool:
        return self._scanner.ignore.ignored(path, is_dir=is_dir)

    async def _housekeeping(self, transfer: Transfer) -> None:
        while True:
            await trio.sleep(RETRY_FAILED_EVERY)
            self.queue.mark_many(self._held.expired())
            await transfer.drop_stale_ahead()
            self.queue.mark_many(list(self.failed))
            for spot in self._parking.expired():
                await self._io.run_sync(unlink_quietly, spot)

    # -- doing the work ---------------------------------------------------------------------

    async def _start_workers(
        self, nursery: trio.Nursery, remote: Remote, *, ahead: bool = False
    ) -> Transfer:
        nursery.start_soon(self.queue.run_deferred)
        self._looks = self._new_looks()
        await nursery.start(self._looks.run)
        batches = Batches(remote, compress=self.config.compress)
        await nursery.start(batches.run)
        tmp = self.state_dir / "tmp"
        landing = Landing(
            self.root,
            tmp,
            self._io,
            syncfs=await self._io.run_sync(group_syncer, tmp),
            client=self.name,
        )
        await nursery.start(landing.run)
        transfer = self._transfer(batches, remote, landing)
        if ahead:
            # Steps of uploads announced on the last connection cannot be followed on: some
            # may have been missed while it was down.
            self._announced.clear()
            self._ahead, announced = trio.open_memory_channel[Announced](AHEAD_QUEUE)
            nursery.start_soon(self._fetch_ahead, transfer, announced)
        for _ in range(self.config.workers):
            nursery.start_soon(self._worker, transfer)
        return transfer

    async def _worker(self, transfer: Transfer) -> None:
        async with trio.open_nursery() as early_sends:  # this worker's head starts (early.py)
            while True:
                path = await self.queue.get()
                try:
                    if self._held.keeps(path):
                        continue
                    finished = self._finished.get(path)
                    move = self._held.ready(path)
                    if move is not None and await self._move_in(move):
                        self._looked(path, finished)
                        continue
                    if await self._still_synced(path):
                        self._looked(path, finished)
                        continue
                    with transfer.sending_early(
                        path, early_sends, partial(self._done_writing, path)
                    ) as early:
                        await self._sync_path(transfer, path, early)
                finally:
                    self.queue.done(path)

    async def _still_synced(self, path: str) -> bool:
        """Whether *path* is, as far as its stat can tell, the file last synced, and the
        server's version the one it was synced with: a look would decide to do nothing. Many
        looks are echoes of our own work (the watcher reporting a download placed, the server
        an upload committed); they share thread calls here instead of each taking a pass."""
        assert self.remote_state is not None
        base = self.index.get(path)
        if base is None or base.racy or base.is_dir or path == IGNORE_FILE:
            return False
        remote = self.remote_state.get(path)
        if remote is None or remote.deleted or remote.rev != base.rev:
            return False
        if self._scanner.ignore.ignored(path, is_dir=False):
            return False  # a pass forgets it
        return await self._looks.call((path, base.stat_key))

    def _new_looks(self) -> Batcher[tuple[str, StatKey], bool]:
        return Batcher(self._look_at_many, max_items=LOOKS_AT_ONCE)

    async def _look_at_many(self, batch: list[Pending[tuple[str, StatKey], bool]]) -> None:
        same = await self._io.run_sync(self._scanner.unchanged, [p.item for p in batch])
        for pending, unchanged in zip(batch, same, strict=True):
            pending.resolve(unchanged)

    def _looked(self, path: str, finished: int | None) -> None:
        """*path* was looked at and is in sync."""
        if self._finished.get(path) == finished:  # else a newer close came meanwhile
            self._finished.pop(path, None)
        self.failed.pop(path, None)
        self._rechecks.pop(path, None)

    async def _sync_path(self, transfer: Transfer, path: str, early: EarlySend) -> None:
        assert self.remote_state is not None
        finished = self._finished.get(path)
        try:
            await self._apply(transfer, path, early)
            self._looked(path, finished)
        except Conflict as conflict:
            # The server's tree is not what we thought: learn what it has and decide again.
            if conflict.current is not None:
                self._know(conflict.current)
            else:
                self.remote_state.pop(path, None)
            if conflict.blocking is not None:
                self._know(conflict.blocking)
                self.queue.mark(conflict.blocking.path)
            if conflict.reason != "stale":
                log.info("%s: %s; looking again", path, conflict)
                self.queue.defer(path, RECHECK_DELAY)
            else:
                self.queue.mark(path)
        except FolderNotEmpty as e:
            prefix = path + "/"
            if any(self.index.get(prefix + name) is None for name in e.names):
                # Something new was put in the folder since: it is not deleted, it comes back.
                log.info("%s: kept, it holds new content", path)
                await self.index.remove(path)
                self.queue.mark(path)
            else:
                await self._recheck(path, e, also=[prefix + name for name in e.names])
        except StillWriting:
            self.queue.defer(path, self.config.settle_seconds / 2)
        except DeletionsHeld:
            pass  # the guard keeps it, and hands it back when it lets go (guard.py)
        except StateError as e:
            log.error("%s: %s; trying again in %.0f s", path, e, STATE_RETRY)
            self.queue.defer(path, STATE_RETRY)
        except DiskFull as e:
            log.error("%s (trying again in %.0f s)", e, RETRY_FAILED_EVERY)
            self.queue.defer(path, RETRY_FAILED_EVERY)
        except (LocalChanged, ChunksMissing, FileNotFoundError) as e:
            await self._recheck(path, e)
        except Ignored:
            await self._forget_ignored(path)
        except Unsyncable as e:
            if path not in self._warned:
                self._warned.add(path)
                log.warning("skipping %s", e)
        except (OSError, InvalidPath, ProtocolError, RejectedByServer) as e:
            log.error("%s: %s", path, e)
            self.failed[path] = str(e)
            self._last_error = f"{path}: {e}"

    async def _recheck(self, path: str, error: Exception, also: Iterable[str] = ()) -> None:
        """Look at *path* again shortly (after *also*); give up for now after MAX_RECHECKS."""
        count = self._rechecks[path] = self._rechecks.get(path, 0) + 1
        if count >= MAX_RECHECKS:
            log.error("%s: %s, %d times in a row; leaving it for now", path, error, count)
            self.failed[path] = str(error)
            self._rechecks.pop(path)
            return
        log.debug("%s: %s; looking again", path, error)
        self.queue.mark_many(also)
        self.queue.defer(path, RECHECK_DELAY)

    def _done_writing(self, path: str, stat: StatKey) -> bool:
        """Whether the writer is done with *path* as *stat* shows it: the kernel said it closed
        the file after writing or renamed it into place, and it was not written since (the
        close we read came after its last modification); or it has not been modified for
        `settle_seconds` (a file changed while we were not watching, or still open)."""
        finished = self._finished.get(path)
        if finished is not None and stat.mtime_ns <= finished:
            return True
        return time.time() - stat.mtime_ns / 1e9 >= self.config.settle_seconds

    def _settled(self, path: str, stat: StatKey) -> bool:
        """Upload a file only once its writer is done with it, so a file being written is not
        sent half way, and again, and again. A file that never rests is sent anyway after
        `settle_max_seconds` (hashes are checked again at commit); that clock restarts once it
        is uploaded. The scanner asks too, before it hashes a big file again."""
        if self._done_writing(path, stat):
            self._unsettled.pop(path, None)
            return True
        since = self._unsettled.setdefault(path, time.time())
        return time.time() - since >= self.config.settle_max_seconds

    async def _forget_ignored(self, path: str) -> None:
        # Ignored paths are neither sent nor received. Forgetting the base means that lifting
        # the rule later compares both sides afresh instead of reading absence as deletion.
        if self.index.get(path) is not None:
            await self.index.remove(path)

    async def _apply(self, transfer: Transfer, path: str, early: EarlySend) -> None:
        assert self.remote_state is not None
        base = self.index.get(path)
        local = await self._scanner.scan(path, base, early, settled=self._settled)
        remote = self.remote_state.get(path)
        if remote is not None and remote.deleted:
            remote = None
        if local is None:
            known = remote or base
            if known is not None and self._scanner.ignore.ignored(path, is_dir=known.kind == DIR):
                raise Ignored(path)
        decision = decide(
            base.side if base else None,
            local.content if local else None,
            Side(remote.rev, _content(remote)) if remote else None,
        )
        action, why = decision.action, decision.reason
        if action is not Action.NOTHING:
            log.debug(
                "%s: %s (%s); base %s, local %s, remote %s",
                path, action.value, why, _brief(base), _brief(local), _brief(remote),
            )  # fmt: skip
        if action is Action.NOTHING:
            # The content is the base's. If the stat is not (the file was touched, or written
            # again with the same bytes), keep the new one: else every later look reads it all.
            if base is not None and local is not None:
                stat = local.stat
                if base.racy or stat != base.stat_key:
                    racy = is_racy(stat.mtime_ns)
                    await self.index.put(
                        replace(base, mtime_ns=stat.mtime_ns, inode=stat.inode, racy=racy)
                    )
        elif action is Action.ADOPT:
            assert remote is not None
            assert local is not None
            await self.index.put(BaseEntry.synced(remote, local.stat, we_wrote_it=False))
        elif action is Action.FORGET:
            await self.index.remove(path)
        elif action is Action.UPLOAD:
            assert local is not None
            if not local.is_dir and not self._settled(path, local.stat):
                raise StillWriting(f"{path}: still being written")
            self._know(await transfer.upload(local, decision.base_rev, early))
            self._unsettled.pop(path, None)
            if local.is_dir:
                log.info("created folder %s on the server (%s)", path, why)
            else:
                log.info("uploaded %s (%s, %d bytes)", path, why, local.stat.size)
                self.progress.count(UP, local.stat.size)
        elif action is Action.DELETE_REMOTE:
            assert self._guard is not None
            await self._guard.allow(path, count=base is not None and not base.is_dir)
            # Only a folder can have something below it (the server keeps the tree so), and
            # looking costs a pass over every path ever seen.
            below = (
                self._live_remote_below(path) if remote is not None and remote.kind == DIR else []
            )
            if below:
                # A folder goes after its contents; what others added meanwhile stays.
                raise FolderNotEmpty(path, [p[len(path) + 1 :] for p in below])
            self._know(await transfer.delete_remote(path, decision.base_rev))
            log.info("deleted %s on the server (%s)", path, why)
            self.progress.count(DELETED, 0)
        elif action is Action.DOWNLOAD:
            assert remote is not None
            fetched = await transfer.download(remote, local)
            if remote.kind != DIR:
                self.progress.count(DOWN, remote.size)
            if remote.kind == DIR:
                log.info("created folder %s (%s)", path, why)
            elif not fetched:
                log.info("placed %s from local content (%s, %d bytes)", path, why, remote.size)
            else:
                log.info(
                    "downloaded %s (%s, %d bytes, %d fetched)", path, why, remote.size, fetched
                )
        elif action is Action.DELETE_LOCAL:
            assert local is not None
            await transfer.delete_local(path, local)
            log.info("deleted %s locally (%s)", path, why)
            self.progress.count(DELETED, 0)
        elif action is Action.CONFLICT:
            assert local is not None
            assert remote is not None
            copy = await transfer.set_aside(local)
            log.warning("conflict on %s (%s): your version is kept as %s", path, why, copy)
            self.queue.mark(copy)
            if local.is_dir:
                self.queue.mark_many(await self._scanner.walk(copy))
            await transfer.download(remote, None)
            log.info("downloaded %s (the server's version)", path)
        if path == IGNORE_FILE and await self._reload_ignore():
            await self._mark_all()

    @property
    def blocking_calls(self) -> int:
        """Calls handed to the folder's worker threads so far (the index's not counted)."""
        return self._io.calls

    async def status(self) -> dict[str, Any]:
        """What `trio-sync status` shows (client/status.py)."""
        pending, busy, deferred = self.queue.counts()
        guard = self._guard
        held = (
            {"reason": guard.reason, "paths": len(guard.held), "examples": sorted(guard.held)[:5]}
            if guard is not None and guard.reason is not None
            else None
        )
        connected = self._connected_since is not None
        moving = self._held.move is not None  # a folder's move on its way
        in_sync = connected and self.queue.idle and not moving and not self.failed and held is None
        up, down = await self._waiting()
        return {
            "running": True,
            "pid": os.getpid(),
            "folder": str(self.root),
            "server": self.config.server_url,
            "name": self.name,
            "connected": connected,
            "connected_since": self._connected_since,
            "in_sync": in_sync,
            "waiting": pending + deferred,
            "waiting_up": up,
            "waiting_down": down,
            "moving": sorted(self.queue.busy)[:20],
            "moving_count": busy,
            "transfers": [m.as_json() for m in self.progress.moving.values()],
            "failed": dict(self.failed),
            "skipped": dict(self._scanner.rejected)
            | dict.fromkeys(self._warned, "symlink or special file"),
            "ignored": {
                "count": len(self._scanner.ignored),
                "examples": sorted(self._scanner.ignored)[:10],
            },
            "held_deletes": held,
            "last_error": self._last_error,
        }

    async def _waiting(self) -> tuple[dict[str, int], dict[str, int]]:
        """Files and bytes waiting to go up and down. Down: what the server has newer than our
        base. Up: the other waiting paths that are files here changed since they were synced
        (a look at each, for the first STATUS_LOOKS of them). A path being worked on is not
        waiting."""
        if self.remote_state is None or self._index is None:
            return {"files": 0, "bytes": 0}, {"files": 0, "bytes": 0}
        down = {"files": 0, "bytes": 0}
        others: list[tuple[str, StatKey | None]] = []
        for path in self.queue.waiting():
            remote, base = self.remote_state.get(path), self.index.get(path)
            if (
                remote is not None
                and not remote.deleted
                and remote.kind != DIR
                and (base is None or remote.rev > base.rev)
            ):
                down["files"] += 1
                down["bytes"] += remote.size
            elif len(others) < STATUS_LOOKS:
                others.append((path, base.stat_key if base else None))

        def sizes() -> list[int]:
            """The sizes of those that are files, changed since they were synced."""
            found = []
            for path, synced in others:
                with contextlib.suppress(OSError, TrioSyncError), anchored(self.root, path) as p:
                    st = os.lstat(p)
                    if S_ISREG(st.st_mode) and stat_key(st) != synced:
                        found.append(st.st_size)
            return found

        up = await self._io.run_sync(sizes)
        return {"files": len(up), "bytes": sum(up)}, down

    def _log_reconciled(self) -> None:
        summary = self.progress.summary()
        log.info("in sync with %s%s", self.config.server_url, f" ({summary})" if summary else "")

    async def _release_held(self, paths: set[str]) -> None:
        self.queue.mark_many(paths)

    async def _differences(self) -> list[str]:
        assert self.remote_state is not None
        live = {p: e for p, e in self.remote_state.items() if not e.deleted}
        failed = self.failed | self._scanner.rejected
        problems = [f"{path}: {message}" for path, message in sorted(failed.items())]
        if self._guard is not None and self._guard.reason is not None:
            problems.insert(0, f"deletions held back: {self._guard.reason}")
        for path in sorted(set(await self._scanner.walk()) | set(live)):
            try:
                local = await self._scanner.scan(path, self.index.get(path))
            except (Unsyncable, Ignored, LocalChanged):
                continue
            remote_kind_dir = path in live and live[path].kind == DIR
            if local is None and self._scanner.ignore.ignored(path, is_dir=remote_kind_dir):
                continue
            remote = live.get(path)
            if local is None and remote is not None:
                problems.append(f"{path}: only on the server")
            elif remote is None and local is not None:
                problems.append(f"{path}: only in the local folder")
            elif local and remote and local.content != _content(remote):
                problems.append(f"{path}: differs from the server")
        return problems


def _expire(folder: Path, keep_seconds: float) -> None:
    cutoff = time.time() - keep_seconds
    for item in folder.iterdir():
        with contextlib.suppress(OSError):
            if item.lstat().st_mtime < cutoff:
                item.unlink()


def _content(entry: FileEntry) -> Content:
    return Content(entry.hash, entry.executable, entry.kind == DIR)


def _below(path: str, folders: set[str]) -> bool:
    """Whether *path* is inside one of *folders*."""
    parts = path.split("/")
    return any("/".join(parts[:i]) in folders for i in range(1, len(parts)))


def _nothing() -> None:
    pass


def _brief(version: BaseEntry | LocalFile | FileEntry | None) -> str:
    """A version as the debug log names it: revision (if any) and the start of its hash."""
    if version is None:
        return "absent"
    rev = f"r{version.rev} " if not isinstance(version, LocalFile) else ""
    return f"{rev}{version.hash[:10] or 'dir'}"
