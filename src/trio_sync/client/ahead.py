"""What this client knows of an upload another client announced (`event: incoming`).

An announcement comes whole (the version's hash and every chunk), or in steps as the uploader
cuts the file: then the chunk list grows step by step, and the last step brings the hash, which
is checked against the list assembled here. `Transfer.fetch_ahead` fetches what it knows of and
waits for more; a step that does not follow on (one missed, or a different size) breaks the
announcement, and the fetch-ahead stops: the commit's download fetches whatever is left.
"""

from __future__ import annotations

import trio

from ..protocol.models import MAX_ANNOUNCED_CHUNKS, Chunk, Incoming, content_hash


class Announced:
    def __init__(self, first: Incoming) -> None:
        self.path = first.path
        self.size = first.size
        #: Set for announcements in steps: the uploader's (origin, upload id).
        self.key = (first.origin, first.upload) if first.upload else None
        self.upload = first.upload
        #: The chunks announced so far, in file order, from offset 0.
        self.chunks: list[Chunk] = []
        #: The version's hash: known once the announcement is complete.
        self.hash: str | None = None
        self.broken = False
        self._end = 0
        self._changed = trio.Event()
        self.add(first)

    @property
    def over(self) -> bool:
        """Nothing more will be added: complete, or broken."""
        return self.hash is not None or self.broken

    def add(self, step: Incoming) -> None:
        if self.over:
            return
        if (
            step.offset != self._end
            or step.size != self.size
            or len(self.chunks) + len(step.chunks) > MAX_ANNOUNCED_CHUNKS
        ):
            self.broken = True
        else:
            self.chunks += step.chunks
            self._end += sum(c.size for c in step.chunks)
            if step.hash is not None:
                # A whole announcement's hash was checked against its list when it was read.
                whole = not step.upload
                if self._end == self.size and (whole or content_hash(self.chunks) == step.hash):
                    self.hash = step.hash
                else:
                    self.broken = True
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Return once a step was added (or the announcement broke)."""
        await self._changed.wait()
