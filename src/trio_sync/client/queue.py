"""The set of paths that need a look, handed to workers one path at a time.

A path is never with two workers at once; a path marked while a worker has it is looked at again
when that worker is done. Marking the same path twice before anyone looks costs nothing.
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

    def mark(self, path: str) -> None:
        if path in self._busy:
            self._again.add(path)
        else:
            self._pending[path] = None
        self._wake()

    def mark_many(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.mark(path)

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

    @property
    def idle(self) -> bool:
        return not self._pending and not self._busy

    async def wait_idle(self) -> None:
        while not self.idle:
            await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
