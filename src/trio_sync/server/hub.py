"""Wakes event streams when a new revision is committed, and carries announcements.

The change log itself is the MetaStore's `versions` table: each subscriber reads from its own cursor
in bounded pages, so a slow subscriber costs a cursor, not a growing queue. Announcements of
uploads in progress are not in the log: the hub keeps the last few, and a stream that falls
further behind than that simply misses some (they only let other clients start early).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..protocol.models import FileEntry
from ..protocol.sse import format_event

#: Announcements kept for streams that were busy when they arrived: the latest ones, at most
#: this many and (past the newest) this many bytes. A big upload is announced in steps (16 MiB
#: of the file each): a stream that misses one stops fetching that upload ahead.
ANNOUNCEMENTS_KEPT = 256
ANNOUNCEMENTS_MAX_BYTES = 2 * 2**20
#: Encoded pages of the change log kept for streams that read from the same revision.
PAGES_KEPT = 64
#: Publish times kept, to measure how long a commit takes to reach the live streams.
PUBLISH_TIMES_KEPT = 1024
PAGES_MAX_BYTES = 16 * 2**20


@dataclass(slots=True)
class StreamInfo:
    name: str
    address: str
    since: float  # Unix time
    position: int = 0


class ChangeHub:
    def __init__(self, latest_rev: int = 0) -> None:
        self._latest = latest_rev
        self._changed = trio.Event()
        self._closed = False
        self.subscribers: dict[int, str] = {}
        #: What the status page shows of each open stream.
        self.streams: dict[int, StreamInfo] = {}
        self._next_id = 0
        self._announced: deque[tuple[int, str, bytes]] = deque()
        self._announced_bytes = 0
        self._announce_seq = 0
        self._landings = 0
        self._landed = trio.Event()
        self._published: OrderedDict[int, float] = OrderedDict()

    @property
    def latest_rev(self) -> int:
        return self._latest

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, rev: int) -> None:
        if rev > self._latest:
            self._latest = rev
        self._published[rev] = trio.current_time()
        while len(self._published) > PUBLISH_TIMES_KEPT:
            self._published.popitem(last=False)
        self._wake()

    def published_at(self, rev: int) -> float | None:
        """When *rev* was published (Trio time), if it was one of the last few published."""
        return self._published.get(rev)

    def close(self) -> None:
        """Server shutdown: every waiting stream returns and ends its response."""
        self._closed = True
        self._wake()
        self.chunks_landed()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_beyond(self, rev: int, seen: int | None = None) -> None:
        """Return once a revision newer than *rev* exists, an announcement newer than *seen*
        (if given), or the hub is closed."""
        while self._latest <= rev and not self._closed:
            if seen is not None and self._announce_seq > seen:
                return
            await self._changed.wait()

    # -- uploads in progress ----------------------------------------------------------------

    @property
    def announce_seq(self) -> int:
        return self._announce_seq

    def announce(self, origin: str, event: bytes) -> None:
        """Pass *event* (framed SSE bytes) to every stream but *origin*'s."""
        self._announce_seq += 1
        self._announced.append((self._announce_seq, origin, event))
        self._announced_bytes += len(event)
        while len(self._announced) > 1 and (
            len(self._announced) > ANNOUNCEMENTS_KEPT
            or self._announced_bytes > ANNOUNCEMENTS_MAX_BYTES
        ):
            self._announced_bytes -= len(self._announced.popleft()[2])
        self._wake()

    def announced_since(self, seen: int, reader: str) -> tuple[list[bytes], int]:
        """The announcements after *seen* that *reader* did not make, and the new position."""
        events = [e for seq, origin, e in self._announced if seq > seen and origin != reader]
        return events, self._announce_seq

    @property
    def landings(self) -> int:
        """How many times chunks have landed; pass it to `wait_landed_after`."""
        return self._landings

    def chunks_landed(self) -> None:
        """New chunks are stored and readable."""
        self._landings += 1
        self._landed.set()
        self._landed = trio.Event()

    async def wait_landed_after(self, landings: int) -> None:
        """Return once chunks landed after the count *landings* was read, or the hub closed."""
        while self._landings == landings and not self._closed:
            await self._landed.wait()

    # -- streams ----------------------------------------------------------------------------

    def subscribe(self, name: str, address: str = "") -> int:
        self._next_id += 1
        self.subscribers[self._next_id] = name
        self.streams[self._next_id] = StreamInfo(name, address, time.time())
        return self._next_id

    def at(self, token: int, rev: int) -> None:
        """Stream *token* has sent everything up to *rev*."""
        if (info := self.streams.get(token)) is not None:
            info.position = rev

    def unsubscribe(self, token: int) -> None:
        self.subscribers.pop(token, None)
        self.streams.pop(token, None)


class _Read:
    """A read of the log in progress, and its answer for the streams that waited for it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answered = False
        self.page: tuple[bytes, int] | None = None


class EventPages:
    """Encoded pages of the change log, shared by the streams that read from the same point.

    After a commit every live stream wakes at the same revision and asks what follows it. One of
    them reads the page from the store and encodes it; the others wait for that and send the
    same bytes: one query and one encoding per change instead of one per client. A page of
    the log never changes once read (a later read from the same revision may only find more),
    so recent pages are kept by their start, bounded in number and in bytes.
    """

    def __init__(
        self,
        read: Callable[[int], Awaitable[list[FileEntry]]],
        *,
        keep: int = PAGES_KEPT,
        max_bytes: int = PAGES_MAX_BYTES,
    ) -> None:
        self._read = read
        self._keep = keep
        self._max_bytes = max_bytes
        self._pages: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._bytes = 0
        self._reading: dict[int, _Read] = {}

    async def after(self, rev: int) -> tuple[bytes, int] | None:
        """The change events after *rev* (one page, framed) and the last revision in them;
        None when there is nothing after *rev* yet."""
        while True:
            page = self._pages.get(rev)
            if page is not None:
                self._pages.move_to_end(rev)
                return page
            reading = self._reading.get(rev)
            if reading is None:
                break
            await reading.done.wait()
            if reading.answered:
                return reading.page  # found nothing, or too big to keep
            # its reader was cancelled (its stream ended): look again
        reading = self._reading[rev] = _Read()
        try:
            entries = await self._read(rev)
            if entries:
                data = b"".join(
                    format_event(json.dumps(e.to_json()), event="change", id=str(e.rev))
                    for e in entries
                )
                reading.page = (data, entries[-1].rev)
                self._keep_page(rev, reading.page)  # an empty answer is never kept
            reading.answered = True
            return reading.page
        finally:
            del self._reading[rev]
            reading.done.set()

    def _keep_page(self, rev: int, page: tuple[bytes, int]) -> None:
        if len(page[0]) > self._max_bytes:
            return
        self._pages[rev] = page
        self._bytes += len(page[0])
        while len(self._pages) > self._keep or self._bytes > self._max_bytes:
            _, (dropped, _) = self._pages.popitem(last=False)
            self._bytes -= len(dropped)
