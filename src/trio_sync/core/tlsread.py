"""Reads over TLS that take every record already received, not one record each.

`trio.SSLStream.receive_some` decrypts and returns one TLS record (at most 16 KiB) per call.
Above it, every read travels through an HTTP parser and its queues: h11, the ASGI queue and
Quart on the server; httpcore, h11 and httpx on a client. A 1 GiB transfer over TLS made 65,536
such reads and cost each end three to four times the CPU of the same transfer in plain HTTP.
`receive_gathered` returns the first record and every later one that can be decrypted without
waiting for the network, up to the size asked for.
"""

from __future__ import annotations

import ssl
from typing import Any

import trio

#: The most bytes a TLS record takes on the wire: a 5-byte header, 16 KiB of plaintext and what
#: encryption adds (at most 2 KiB in TLS 1.2, 256 bytes in 1.3). This many bytes received hold at
#: least one whole record, which decrypts without waiting for the network.
RECORD_MAX = 5 + 2**14 + 2048
#: Gathering ends after this long at most (1 MiB takes about 1 ms). A read that would have to
#: wait, because what was received was not data (a post-handshake message), is cancelled then,
#: which loses nothing. One that has to send first (answering a key update: HTTP clients do not
#: ask for one mid-request) would break the connection, and the peer would retry its request.
GATHER_WAIT = 0.005


def incoming_of(stream: trio.abc.Stream) -> ssl.MemoryBIO | None:
    """What *stream* (an SSLStream) has received and not yet decrypted; None for any other
    stream. The buffer is private to Trio, hence looked up with care: without it, reads are a
    record each."""
    incoming = getattr(stream, "_incoming", None) if isinstance(stream, trio.SSLStream) else None
    return incoming if isinstance(incoming, ssl.MemoryBIO) else None


async def receive_gathered(
    stream: trio.abc.Stream, incoming: ssl.MemoryBIO | None, max_bytes: int
) -> bytes | bytearray:
    """`stream.receive_some(max_bytes)`, and then, if *incoming* is its buffer, the records
    after the first that have arrived already, up to *max_bytes* in all."""
    data = await stream.receive_some(max_bytes)
    if incoming is None or not data or len(data) >= max_bytes:
        return data
    pieces = [data]
    size = len(data)
    tls: Any = stream  # an SSLStream: pending() is its SSLObject's
    with trio.move_on_after(GATHER_WAIT):
        while size < max_bytes and (tls.pending() or incoming.pending >= RECORD_MAX):
            more = await stream.receive_some(max_bytes - size)
            if not more:
                break  # the peer closed: the next read says so
            pieces.append(more)
            size += len(more)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)
