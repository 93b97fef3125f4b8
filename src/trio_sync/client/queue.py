"""The set of paths that need a look, handed to workers one path at a time.

A path is never with two workers at once; a path marked while a worker has it is looked at again
when that worker is done. Marking the same path twice before anyone looks costs nothing.
A path can also be marked for later (`defer`), so a worker never sleeps holding its place.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio


class PathQueue:
    def __init__(self) -> None:
        self._pending: dict[str, None] = {}  # insertion-ordered set
        self._busy: set[str] = set()
        self._again: set[str] = set()
        self._changed = trio.Event()
        self._deferred: dict[str, float] = {}  # path -> trio time it is due

    def mark(self, path: str) -> None:
        if path in self._busy:
            self._again.add(path)
        else:
            self._pending[path] = None
        self._wake()

    def mark_many(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.mark(path)

    def defer(self, path: str, delay: float) -> None:
        """Mark *path* after *delay* seconds (the queue is not idle meanwhile)."""
        due = trio.current_time() + delay
        self._deferred[path] = min(due, self._deferred.get(path, due))
        self._wake()

    async def run_deferred(self) -> None:
        """Marks deferred paths when they are due; runs in the nursery that owns the workers."""
        while True:
            if not self._deferred:
                await self._changed.wait()
                continue
            with trio.move_on_at(min(self._deferred.values())):
                await self._changed.wait()  # an earlier deadline may arrive meanwhile
            now = trio.current_time()
            due = [p for p, t in self._deferred.items() if t <= now]
            for path in due:
                del self._deferred[path]
            self.mark_many(due)

    async def get(self) -> str:
        while not self._pending:
            await self._changed.wait()
        path = next(iter(self._pending))
        del self._pending[path]
        self._busy.add(path)
        return path

    def done(self, path: str) -> None:
        self._busy.discard(path)
        if path in self._again:
            self._again.discard(path)
            self._pending[path] = None
        self._wake()

    def counts(self) -> tuple[int, int, int]:
        """Paths waiting for a worker, held by one, and deferred to later."""
        return len(self._pending), len(self._busy), len(self._deferred)

    def waiting(self) -> list[str]:
        """The paths waiting for a worker, now or later."""
        return [*self._pending, *(p for p in self._deferred if p not in self._pending)]

    @property
    def busy(self) -> frozenset[str]:
        """The paths workers hold now."""
        return frozenset(self._busy)

    @property
    def idle(self) -> bool:
        return not self._pending and not self._busy and not self._deferred

    async def wait_idle(self) -> None:
        while not self.idle:
            await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
