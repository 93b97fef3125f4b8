"""Wakes event streams when a new revision is committed.

The change log itself is the MetaStore's `versions` table: each subscriber reads from its own cursor
in bounded pages, so a slow subscriber costs a cursor, not a growing queue.
"""

from __future__ import annotations

import trio


class ChangeHub:
    def __init__(self, latest_rev: int = 0) -> None:
        self._latest = latest_rev
        self._changed = trio.Event()
        self._closed = False
        self.subscribers: dict[int, str] = {}
        self._next_id = 0

    @property
    def latest_rev(self) -> int:
        return self._latest

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, rev: int) -> None:
        if rev > self._latest:
            self._latest = rev
        self._wake()

    def close(self) -> None:
        """Server shutdown: every waiting stream returns and ends its response."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_beyond(self, rev: int) -> None:
        """Return once a revision newer than *rev* exists, or the hub is closed."""
        while self._latest <= rev and not self._closed:
            await self._changed.wait()

    def subscribe(self, name: str) -> int:
        self._next_id += 1
        self.subscribers[self._next_id] = name
        return self._next_id

    def unsubscribe(self, token: int) -> None:
        self.subscribers.pop(token, None)
