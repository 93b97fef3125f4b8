"""A bound on the bytes held at once, shared by the tasks that hold them: the client's chunks
in memory, and the server's received chunks waiting for its disk."""

from __future__ import annotations

import trio
import trio.lowlevel


class ByteBudget:
    """Bounds bytes held at once. A request bigger than the whole budget waits until nothing
    else is held, then goes alone, so large chunks cannot starve."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, n: int) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while self.used and self.used + n > self.capacity:
            await self._lot.park()
        self.used += n
        await trio.lowlevel.cancel_shielded_checkpoint()

    def release(self, n: int) -> None:
        self.used -= n
        self._lot.unpark_all()
