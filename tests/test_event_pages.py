"""Streams reading the change log from the same revision share one read and one encoding."""

from __future__ import annotations

import trio
import trio.testing

from trio_sync.protocol.models import DIR, FileEntry
from trio_sync.server.hub import EventPages


class Log:
    """A change log the pages read from, counting the reads."""

    def __init__(self) -> None:
        self.entries: list[FileEntry] = []
        self.reads = 0
        self.slow = trio.Event()
        self.slow.set()

    def commit(self, count: int) -> None:
        for _ in range(count):
            rev = len(self.entries) + 1
            self.entries.append(FileEntry(f"d{rev}", rev, kind=DIR, origin="a"))

    async def read(self, rev: int) -> list[FileEntry]:
        self.reads += 1
        await self.slow.wait()
        return [e for e in self.entries if e.rev > rev][:3]


async def test_streams_at_the_same_revision_share_one_read() -> None:
    log = Log()
    log.commit(2)
    pages = EventPages(log.read)
    log.slow = trio.Event()
    got: list[tuple[bytes, int] | None] = []

    async def stream() -> None:
        got.append(await pages.after(0))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(stream)
        await trio.testing.wait_all_tasks_blocked()
        log.slow.set()
    assert log.reads == 1
    assert len(got) == 50
    assert len(set(got)) == 1
    page = got[0]
    assert page is not None
    assert page[1] == 2
    assert page[0].count(b"event: change\n") == 2
    assert b"id: 1\n" in page[0]
    assert b"id: 2\n" in page[0]


async def test_nothing_new_is_shared_but_never_kept() -> None:
    log = Log()
    pages = EventPages(log.read)
    log.slow = trio.Event()
    got: list[tuple[bytes, int] | None] = []

    async def stream() -> None:
        got.append(await pages.after(0))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(stream)
        await trio.testing.wait_all_tasks_blocked()
        log.slow.set()
    assert got == [None] * 20
    assert log.reads == 1
    log.commit(1)  # a commit right after: the next look must see it
    page = await pages.after(0)
    assert page is not None
    assert page[1] == 1


async def test_a_page_is_one_page_and_the_next_starts_where_it_ended() -> None:
    log = Log()
    log.commit(5)
    pages = EventPages(log.read)
    first = await pages.after(0)
    assert first is not None
    assert first[1] == 3
    second = await pages.after(first[1])
    assert second is not None
    assert second[1] == 5
    assert await pages.after(5) is None


async def test_kept_pages_are_bounded() -> None:
    log = Log()
    log.commit(10)
    pages = EventPages(log.read, keep=2)
    for rev in (0, 1, 2):
        await pages.after(rev)
    assert log.reads == 3
    await pages.after(2)  # kept
    assert log.reads == 3
    await pages.after(0)  # dropped, read again
    assert log.reads == 4
    tiny = EventPages(log.read, max_bytes=10)  # no page fits: every look reads
    await tiny.after(0)
    await tiny.after(0)
    assert log.reads == 6


async def test_when_the_reader_is_cancelled_a_waiting_stream_reads_itself() -> None:
    log = Log()
    log.commit(1)
    pages = EventPages(log.read)
    log.slow = trio.Event()
    got: list[tuple[bytes, int] | None] = []

    async def stream() -> None:
        got.append(await pages.after(0))

    first = trio.CancelScope()

    async def cancelled_reader() -> None:
        with first:
            await pages.after(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled_reader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(stream)
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        log.slow.set()
    assert log.reads == 2
    assert got
    assert got[0] is not None
    assert got[0][1] == 1
