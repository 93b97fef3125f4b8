"""Request bodies from untrusted peers: bounded in size, and they must keep coming."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

import trio

from ..errors import ProtocolError
from .refusals import BodyTooSlow

#: Room for a batch of chunks (clients send about 8 MiB), or a commit's chunk list (about 200,000
#: chunks), plus framing.
MAX_BODY = 17 * 1024 * 1024
#: A request body must keep coming: after a grace period (ServerConfig.body_grace), at
#: BODY_MIN_RATE bytes a second on average. A trickled body would otherwise hold its connection
#: (and, for an upload, its batch) for ever.
BODY_MIN_RATE = 16 * 1024


async def paced(pieces: AsyncIterator[bytes], grace: float) -> AsyncGenerator[bytes, None]:
    """*pieces* as they arrive, within MAX_BODY and the rate above. Only the time spent waiting
    for the peer counts: while the server's own disk holds the reader back, no clock runs."""
    waited = 0.0
    received = 0
    while True:
        began = trio.current_time()
        with trio.move_on_at(began - waited + grace + received / BODY_MIN_RATE) as scope:
            piece = await anext(pieces, None)
        if scope.cancelled_caught:
            raise BodyTooSlow(f"the request body came slower than {BODY_MIN_RATE} bytes/s")
        waited += trio.current_time() - began
        if piece is None:
            return
        received += len(piece)
        if received > MAX_BODY:
            raise ProtocolError(f"a request body is at most {MAX_BODY} bytes")
        yield piece
