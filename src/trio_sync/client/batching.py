"""Coalescing: many workers' small requests become few HTTP requests.

Each worker handles one path and awaits `Batches.missing/put/fetch/commit` as if it were alone.
A `Batcher` gathers whatever calls are waiting while its previous requests are in flight and
sends them as one request, so batches grow by themselves under load and a lone call goes out at
once. A `ByteBudget` (`core/budget.py`) bounds the chunk bytes held in memory by all workers
together.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from ..core.compression import decoded_size
from ..errors import ChunksMissing, ProtocolError
from ..protocol.frames import MISSING, Frame
from ..protocol.models import (
    MAX_COMMITS,
    MAX_DECODED_PER_REQUEST,
    MAX_FETCH,
    MAX_HASHES_PER_QUERY,
    CommitRequest,
    FileEntry,
)
from .remote import Remote

T = TypeVar("T")
R = TypeVar("R")

#: Payload bytes per `POST /chunks` or `POST /chunks/fetch` (the server accepts up to 17 MiB).
BATCH_BYTES = 8 * 1024 * 1024
#: Uploads go in smaller batches, more of them in flight: the server answers each only once
#: its chunks are durable, and answers requests that end together with one shared sync, so
#: two big ones in flight end together and the link idles while the next two are read and
#: sent. Four of 4 MiB keep one on the wire while others wait for the disk.
PUT_BATCH_BYTES = 4 * 1024 * 1024
PUTS_IN_FLIGHT = 4
#: A batch waits for more calls while they keep arriving (each within GATHER_STEP seconds of
#: the last), for up to GATHER_STEPS steps, unless it is full. Small files are processed at
#: several hundred a second, so a tree of them becomes batches of dozens (about 65 files per
#: request for 10,000 files, docs/benchmarks.md). A lone call after a quiet spell (one change
#: saved by a user) goes at once: every step it waited would add to the time it takes to
#: reach the other clients.
GATHER_STEP = 0.005
GATHER_STEPS = 10
#: How long without a call makes the next one a lone call.
QUIET = GATHER_STEP * GATHER_STEPS


class Pending(Generic[T, R]):
    """One call waiting in a batch."""

    __slots__ = ("_error", "_event", "_result", "abandoned", "item")

    def __init__(self, item: T) -> None:
        self.item = item
        self.abandoned = False
        self._event = trio.Event()
        self._result: R | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def resolve(self, result: R) -> None:
        if not self.done:
            self._result = result
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self._error = error
            self._event.set()

    async def wait(self) -> R:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


class Batcher(Generic[T, R]):
    def __init__(
        self,
        send: Callable[[list[Pending[T, R]]], Awaitable[None]],
        *,
        max_items: int,
        max_bytes: int = 0,
        size: Callable[[T], int] = lambda _: 0,
        parallel: int = 2,
    ) -> None:
        self._send = send
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._size = size
        self._slots = trio.Semaphore(parallel)
        self._queue: deque[Pending[T, R]] = deque()
        self._arrived = trio.Event()
        self._last_taken = -math.inf

    async def call(self, item: T) -> R:
        pending: Pending[T, R] = Pending(item)
        self._queue.append(pending)
        self._arrived.set()
        try:
            return await pending.wait()
        except trio.Cancelled:
            pending.abandoned = True  # not sent if it is still waiting
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                while not self._queue:
                    self._arrived = trio.Event()
                    await self._arrived.wait()
                await self._slots.acquire()
                await self._gather()
                batch = self._take()
                if batch:
                    nursery.start_soon(self._send_batch, batch)
                else:
                    self._slots.release()

    async def _gather(self) -> None:
        """Wait briefly while calls keep arriving, so a burst (workers finishing their disk
        reads one after another) becomes one request."""
        if len(self._queue) == 1 and trio.current_time() - self._last_taken > QUIET:
            return
        for _ in range(GATHER_STEPS):
            if self._full():
                return
            seen = len(self._queue)
            await trio.sleep(GATHER_STEP)
            if len(self._queue) == seen:
                return

    def _full(self) -> bool:
        if len(self._queue) >= self._max_items:
            return True
        return bool(self._max_bytes) and sum(self._size(p.item) for p in self._queue) >= (
            self._max_bytes
        )

    def _take(self) -> list[Pending[T, R]]:
        self._last_taken = trio.current_time()
        batch: list[Pending[T, R]] = []
        total = 0
        while self._queue and len(batch) < self._max_items:
            pending = self._queue[0]
            if pending.abandoned:
                self._queue.popleft()
                continue
            size = self._size(pending.item)
            if batch and self._max_bytes and total + size > self._max_bytes:
                break
            batch.append(self._queue.popleft())
            total += size
        return batch

    async def _send_batch(self, batch: list[Pending[T, R]]) -> None:
        try:
            await self._send(batch)
        except Exception as error:
            for pending in batch:
                pending.fail(error)
        finally:
            self._slots.release()
            for pending in batch:
                pending.fail(ProtocolError("the server did not answer for this item"))


class Batches:
    """The four batched calls of the transfer engine, over one Remote. Run `run` in the nursery
    that owns the workers."""

    def __init__(self, remote: Remote, *, compress: bool) -> None:
        self._remote = remote
        self._compress = compress
        self._missing: Batcher[tuple[str, ...], set[str]] = Batcher(
            self._send_missing, max_items=1000, max_bytes=MAX_HASHES_PER_QUERY, size=len
        )
        self._put: Batcher[Frame, bool] = Batcher(
            self._send_put,
            max_items=1000,
            max_bytes=PUT_BATCH_BYTES,
            size=_put_size,
            parallel=PUTS_IN_FLIGHT,
        )
        self._fetch: Batcher[tuple[str, int], Frame] = Batcher(
            self._send_fetch,
            max_items=MAX_FETCH,
            max_bytes=BATCH_BYTES,
            size=lambda item: item[1],
            parallel=3,
        )
        self._commit: Batcher[CommitRequest, FileEntry] = Batcher(
            self._send_commit,
            max_items=MAX_COMMITS,
            max_bytes=100_000,  # chunk list entries: keeps a request body near 8 MiB at most
            size=lambda r: len(r.chunks) + 1,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for batcher in (self._missing, self._put, self._fetch, self._commit):
                await nursery.start(batcher.run)
            task_status.started()

    async def missing(self, hashes: tuple[str, ...]) -> set[str]:
        """Which of *hashes* the server does not have."""
        return await self._missing.call(hashes)

    async def put(self, frame: Frame) -> bool:
        """Upload a chunk; False if the server found it does not match its hash."""
        return await self._put.call(frame)

    async def fetch(self, hash: str, size: int) -> Frame:
        """A chunk as the server sent it (maybe compressed); the caller verifies it."""
        return await self._fetch.call((hash, size))

    async def commit(self, request: CommitRequest) -> FileEntry:
        return await self._commit.call(request)

    async def _send_missing(self, batch: list[Pending[tuple[str, ...], set[str]]]) -> None:
        wanted = dict.fromkeys(h for p in batch for h in p.item)
        missing = await self._remote.missing(wanted)
        for pending in batch:
            pending.resolve({h for h in pending.item if h in missing})

    async def _send_put(self, batch: list[Pending[Frame, bool]]) -> None:
        frames = [p.item for p in batch]
        hashes = [f.hash for f in frames]
        for pending in batch:
            pending.item = _SENT  # the request body holds the payloads, and drops each once sent
        stored, rejected = await self._remote.put_chunks(frames)
        for pending, frame_hash in zip(batch, hashes, strict=True):
            if frame_hash in rejected:
                pending.resolve(False)
            elif frame_hash in stored:
                pending.resolve(True)

    async def _send_fetch(self, batch: list[Pending[tuple[str, int], Frame]]) -> None:
        waiting: dict[str, list[Pending[tuple[str, int], Frame]]] = {}
        for pending in batch:
            waiting.setdefault(pending.item[0], []).append(pending)

        async def arrived(frame: Frame) -> None:
            for pending in waiting.pop(frame.hash, []):
                if frame.encoding == MISSING:
                    pending.fail(ChunksMissing([frame.hash]))
                else:
                    pending.resolve(frame)

        await self._remote.fetch_chunks(list(waiting), arrived, compress=self._compress)

    async def _send_commit(self, batch: list[Pending[CommitRequest, FileEntry]]) -> None:
        results = await self._remote.commit_many([p.item for p in batch])
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, FileEntry):
                pending.resolve(result)
            else:
                pending.fail(result)


_SENT = Frame("0" * 64, MISSING, b"")


def _put_size(frame: Frame) -> int:
    """A frame's share of a `POST /chunks` batch: its bytes on the wire, or its share of what
    the server lets one request decode to, whichever is more (a well compressed chunk is small
    on the wire only)."""
    decoded = decoded_size(frame.encoding, frame.payload)
    return max(len(frame.payload), -(-decoded * PUT_BATCH_BYTES // MAX_DECODED_PER_REQUEST))
