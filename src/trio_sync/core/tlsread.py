"""Reads over TLS that take every record already received, not one record each.

`trio.SSLStream.receive_some` decrypts and returns one TLS record (at most 16 KiB) per call.
Above it, every read travels through an HTTP parser and its queues: h11, the ASGI queue and
Quart on the server; httpcore, h11 and httpx on a client. A 1 GiB transfer over TLS made 65,536
such reads and cost each end three to four times the CPU of the same transfer in plain HTTP.
`receive_gathered` returns the first record and every later one that can be decrypted without
waiting for the network, up to the size asked for.

Under it, an SSLStream reads its socket 64 KiB at a time (Trio's default); `WideReads` makes
that TRANSPORT_READ. Records gathered per read are the same; what goes is three of every four
trips through the socket and the SSLStream's locking around them.

Writes go the other way through `send_bounded`, at most TLS_WRITE at a time, so that what each
connection's buffers hold stays bounded whatever size a write is.
"""

from __future__ import annotations

import ssl
from typing import Any

import trio

#: The most bytes a TLS record takes on the wire: a 5-byte header, 16 KiB of plaintext and what
#: encryption adds (at most 2 KiB in TLS 1.2, 256 bytes in 1.3). This many bytes received hold at
#: least one whole record, which decrypts without waiting for the network.
RECORD_MAX = 5 + 2**14 + 2048
#: What an SSLStream reads from its socket at a time. Against Trio's 64 KiB, 256 KiB took the
#: server's CPU for a 1 GiB upload over TLS from 4.9-5.3 s to 4.2-4.5 s
#: (benchmarks/serverio.py's exchange, the server alone); 1 MiB saved no more.
TRANSPORT_READ = 256 * 1024
#: The most plaintext given to an SSLStream's `send_all` at once. It encrypts all it is given
#: into its outgoing memory buffer before sending any, and OpenSSL's memory buffers keep the
#: largest size they ever held for the connection's life: a 2 MiB chunk sent in one write left
#: 2 MiB held by that connection until it closed.
TLS_WRITE = 256 * 1024
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


async def send_bounded(stream: trio.abc.Stream, data: bytes | bytearray | memoryview) -> None:
    """`stream.send_all(data)`, in pieces of at most TLS_WRITE."""
    if len(data) <= TLS_WRITE:
        await stream.send_all(data)
        return
    view = memoryview(data)
    for start in range(0, len(view), TLS_WRITE):
        await stream.send_all(view[start : start + TLS_WRITE])


class WideReads(trio.abc.Stream):
    """A socket stream for an SSLStream to read TRANSPORT_READ bytes at a time from. Anything
    else asked of it (Hypercorn reads `.socket`) is the socket stream's."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(TRANSPORT_READ if max_bytes is None else max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class WideReadsListener(trio.abc.Listener[WideReads]):
    """Accepts from a SocketListener, for an SSLListener: its streams read TRANSPORT_READ."""

    def __init__(self, inner: trio.SocketListener) -> None:
        self._inner = inner

    async def accept(self) -> WideReads:
        return WideReads(await self._inner.accept())

    async def aclose(self) -> None:
        await self._inner.aclose()
