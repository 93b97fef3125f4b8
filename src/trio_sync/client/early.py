"""Sending a big file's chunks while the scanner is still cutting it.

Without this, the upload of a big new version starts only once the whole file is hashed: about a
second per GiB during which nothing moves. Chunks are content-addressed and no file version
refers to them until a commit does, so sending them before the engine has decided to upload costs
nothing if it then decides otherwise: the server's garbage collector takes them back.

The scanner hands each step's chunks to `EarlySend.cut`; one task asks the server which of them
it lacks, another sends those, in file order, within the shared byte budget. If the engine then
uploads, `Transfer.upload` takes over: it waits for both, and sends only what they did not. Any
error here only ends the head start; the upload that follows meets it again and handles it.

Once the server lacks any of the file, each step is also announced to the other clients (`POST
/announce` with an upload id), so that they fetch the chunks as they land, and build the file
from their own copy of the old version, instead of waiting for the whole file to be hashed;
`finish` sends the hash that ends the announcement, once the engine has decided to upload.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Awaitable, Callable

import trio

from ..core.budget import ByteBudget
from ..core.offload import Offload
from ..errors import ProtocolError, RemoteError, TrioSyncError
from ..protocol.frames import Frame
from ..protocol.models import (
    MAX_ANNOUNCED_CHUNKS,
    MAX_STEP_CHUNKS,
    Chunk,
    Incoming,
)
from .batching import Batches
from .index import StatKey
from .progress import UP, Moving, Progress

log = logging.getLogger("trio_sync.client")

#: Files from this size on are sent while they are hashed; below it, hashing is quick anyway.
EARLY_MIN_SIZE = 16 * 1024 * 1024
#: Bytes the scanner cuts between two hand-overs (one thread call each).
EARLY_STEP = 16 * 1024 * 1024
#: Chunk sends in flight at once (each also holds its bytes in the byte budget): a few more than
#: the upload batches in flight hold at the average chunk size, so that the next batch is read
#: and ready when one is answered.
EARLY_IN_FLIGHT = 40

Located = tuple[Chunk, int]  # a chunk and its offset in the file


class EarlySend:
    """The head start of one path's upload. Made by `Transfer.sending_early`, which owns the
    nursery its tasks run in and stops them when the caller is done."""

    def __init__(
        self,
        path: str,
        nursery: trio.Nursery,
        batches: Batches,
        budget: ByteBudget,
        offload: Offload,
        *,
        open_file: Callable[[], int],
        read_frame: Callable[[int, Chunk, int], Frame],
        done_writing: Callable[[StatKey], bool],
        announce: Callable[[Incoming], Awaitable[None]],
        progress: Progress,
    ) -> None:
        self.path = path
        self._nursery = nursery
        self._batches = batches
        self._budget = budget
        self._offload = offload
        self._open_file = open_file
        self._read_frame = read_frame
        self._done_writing = done_writing
        self._announce = announce
        self._progress = progress
        self._moving: Moving | None = None  # from the first cut on
        self._size = 0
        self._scope: trio.CancelScope | None = None  # set once the first chunks are cut
        #: Chunks the server said it lacks (sent, or being sent, from here).
        self.lacking: set[str] = set()
        #: Chunks known to be on the server: it had them, or took them from us.
        self.stored: set[str] = set()
        #: Ended before it was done (an error, or a chunk the server refused): `lacking` may
        #: be incomplete.
        self.cut_short = False
        self._upload = ""  # chosen when the first step is announced
        self._unannounced: list[Located] = []  # cut, not announced yet
        self._lacking_bytes = 0
        self._announced_end = 0  # the file's bytes announced so far
        self._announced_chunks = 0
        #: Steps were announced (all of them so far, in order): `finish` ends the announcement.
        self.announcing = False
        self._announce_failed = False

    @property
    def started(self) -> bool:
        return self._scope is not None

    def wants(self, key: StatKey) -> bool:
        """Worth it for a big file that is not being written: one still changing would not be
        uploaded yet, and its chunks would be stale by the time it is."""
        self._size = key.size
        return key.size >= EARLY_MIN_SIZE and self._done_writing(key)

    def cut(self, chunks: list[Chunk], offset: int) -> None:
        """The scanner cut these chunks, starting at *offset*; send those the server lacks."""
        if self._scope is None:
            self._moving = self._progress.begin(self.path, UP, self._size)
            self._scope = trio.CancelScope()
            self._cuts, cuts = trio.open_memory_channel[list[Located]](math.inf)
            self._asked, self._sent = trio.Event(), trio.Event()
            self._nursery.start_soon(self._run, cuts)
        elif self._sent.is_set():
            return  # the head start is over: stopped, or ended by an error
        located = []
        for chunk in chunks:
            located.append((chunk, offset))
            offset += chunk.size
        self._cuts.send_nowait(located)

    async def asked(self) -> None:
        """The scan is over: wait until the server has been asked about every chunk it cut, so
        that `lacking` is complete (unless the head start ended early)."""
        assert self._scope is not None
        self._cuts.close()
        await self._asked.wait()

    async def sent(self) -> None:
        """Wait until every chunk in `lacking` was sent (or the head start ended)."""
        assert self._scope is not None
        self._cuts.close()
        await self._sent.wait()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        if self._moving is not None:
            self._progress.end(self._moving)

    def _moved(self, size: int) -> None:
        """*size* bytes of the file are on the server (sent now, or had already)."""
        assert self._moving is not None
        self._moving.done += size

    async def _run(self, cuts: trio.MemoryReceiveChannel[list[Located]]) -> None:
        assert self._scope is not None
        to_send, sending = trio.open_memory_channel[Located](math.inf)
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._ask, cuts, to_send)
                    nursery.start_soon(self._send, sending)
        except* (TrioSyncError, OSError) as group:
            self.cut_short = True
            log.debug("%s: no head start: %s", self.path, group.exceptions[0])
        finally:
            self._asked.set()
            self._sent.set()

    async def _ask(
        self,
        cuts: trio.MemoryReceiveChannel[list[Located]],
        to_send: trio.MemorySendChannel[Located],
    ) -> None:
        seen: set[str] = set()  # a chunk repeated in the file goes once
        async with to_send:
            while True:
                try:
                    fresh = await cuts.receive()
                except trio.EndOfChannel:
                    break
                # Whatever else the scanner cut meanwhile goes in the same question.
                while True:
                    try:
                        fresh += cuts.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if not self._announce_failed:  # every chunk, repeats too: they place the file
                    self._unannounced += fresh
                fresh = [(c, at) for c, at in fresh if c.hash not in seen]
                seen.update(c.hash for c, _ in fresh)
                hashes = tuple(dict.fromkeys(c.hash for c, _ in fresh))
                lacking = await self._batches.missing(hashes) if hashes else set()
                for chunk, at in fresh:
                    if chunk.hash in lacking:
                        self.lacking.add(chunk.hash)
                        self._lacking_bytes += chunk.size
                        to_send.send_nowait((chunk, at))
                    else:
                        self.stored.add(chunk.hash)
                        self._moved(chunk.size)
                await self._announce_steps()
            self._asked.set()

    async def _announce_steps(self) -> None:
        """Announce what was cut since the last step (from the file's start, at the first),
        once the server lacks any chunk of the file.

        Even an edit of one chunk is worth it here, unlike for a whole file (`Transfer._announce`):
        a file sent early is big, and the others rebuild the new version from their copy of the
        old one (a second per GiB) while we still cut it, instead of after the commit. A file
        the server has all of (only touched, say) is not announced: the others would copy it
        for nothing."""
        if self._announce_failed:
            return
        if self._announced_chunks + len(self._unannounced) > MAX_ANNOUNCED_CHUNKS:
            self._give_up_announcing("too many chunks to announce")
            return
        if not self._lacking_bytes:
            return
        while self._unannounced:
            step = self._unannounced[:MAX_STEP_CHUNKS]
            del self._unannounced[:MAX_STEP_CHUNKS]
            chunks = tuple(c for c, _ in step)
            if not await self._announce_step(chunks, None):
                return
            self._announced_chunks += len(chunks)
            self._announced_end = step[-1][1] + step[-1][0].size
            self.announcing = True

    async def finish(self, hash: str, size: int) -> bool:
        """The scan is over and the engine uploads the version it found: send the hash that
        ends the announcement. Call after `asked`. False if there is none to end (not
        announced, or not all of it)."""
        if not self.announcing or self._announce_failed or size != self._announced_end:
            return False
        return await self._announce_step((), hash)

    async def _announce_step(self, chunks: tuple[Chunk, ...], hash: str | None) -> bool:
        if not self._upload:  # not for every path: each id costs a system call
            self._upload = uuid.uuid4().hex
        step = Incoming(
            self.path, hash, self._size, chunks, upload=self._upload, offset=self._announced_end
        )
        try:
            await self._announce(step)
        except (RemoteError, ProtocolError) as e:
            self._give_up_announcing(str(e))
            return False
        return True

    def _give_up_announcing(self, why: str) -> None:
        """Only a head start for the others: whoever fetches ahead stops when nothing more comes."""
        log.debug("%s: announcing no more steps: %s", self.path, why)
        self._announce_failed = True
        self._unannounced.clear()

    async def _send(self, sending: trio.MemoryReceiveChannel[Located]) -> None:
        fd: int | None = None
        in_flight = trio.Semaphore(EARLY_IN_FLIGHT)
        try:
            async with trio.open_nursery() as nursery:
                async for chunk, at in sending:
                    if fd is None:
                        fd = await self._offload.run_sync(self._open_file)
                    await in_flight.acquire()
                    await self._budget.acquire(chunk.size)
                    nursery.start_soon(self._send_one, fd, chunk, at, in_flight)
        finally:
            if fd is not None:
                os.close(fd)

    async def _send_one(self, fd: int, chunk: Chunk, at: int, in_flight: trio.Semaphore) -> None:
        try:
            frame = await self._offload.run_sync(self._read_frame, fd, chunk, at)
            if await self._batches.put(frame):
                self.stored.add(chunk.hash)
                self._moved(chunk.size)
            else:
                # The file changed since that chunk was cut: the rest would be stale too.
                assert self._scope is not None
                self.cut_short = True
                self._scope.cancel()
        finally:
            self._budget.release(chunk.size)
            in_flight.release()
