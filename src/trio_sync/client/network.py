"""The client's network streams under httpx: Trio's, with reads over TLS that take every record
already received (`core.tlsread`) instead of one 16 KiB record each, which cost a client three
to four times the CPU per byte downloaded over TLS, and that read the socket in larger pieces.

httpcore reads through a pluggable network backend; httpx builds its connection pool without a
way to pass one, so `use_gathering_reads` sets it on the pools of a client it has just made.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx
import trio

from ..core.tlsread import WideReads, incoming_of, receive_gathered, send_bounded

_CONNECT_ERRORS: dict[type[Exception], type[Exception]] = {
    trio.TooSlowError: httpcore.ConnectTimeout,
    trio.BrokenResourceError: httpcore.ConnectError,
    OSError: httpcore.ConnectError,
}
_READ_ERRORS: dict[type[Exception], type[Exception]] = {
    trio.TooSlowError: httpcore.ReadTimeout,
    trio.BrokenResourceError: httpcore.ReadError,
    trio.ClosedResourceError: httpcore.ReadError,
}
_WRITE_ERRORS: dict[type[Exception], type[Exception]] = {
    trio.TooSlowError: httpcore.WriteTimeout,
    trio.BrokenResourceError: httpcore.WriteError,
    trio.ClosedResourceError: httpcore.WriteError,
}


@contextmanager
def _within(
    timeout: float | None, errors: dict[type[Exception], type[Exception]]
) -> Iterator[None]:
    """A deadline, and Trio's errors as the httpcore errors httpx maps to its own."""
    try:
        with trio.fail_after(math.inf if timeout is None else timeout):
            yield
    except tuple(errors) as e:
        for kind, mapped in errors.items():
            if isinstance(e, kind):
                raise mapped(str(e)) from e
        raise  # pragma: no cover - every kind is in the map


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._incoming = incoming_of(stream)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _within(timeout, _READ_ERRORS):
            return bytes(await receive_gathered(self._stream, self._incoming, max_bytes))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            with _within(timeout, _WRITE_ERRORS):
                if self._incoming is None:
                    await self._stream.send_all(buffer)
                else:
                    await send_bounded(self._stream, buffer)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        transport = (
            WideReads(self._stream) if isinstance(self._stream, trio.SocketStream) else self._stream
        )
        tls = trio.SSLStream(
            transport, ssl_context, server_hostname=server_hostname, https_compatible=True
        )
        try:
            with _within(timeout, _CONNECT_ERRORS):
                await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(self._stream)
            raise
        return _Stream(tls)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            # The SSLStream stands in for its SSLObject: it forwards what httpcore asks of it
            # (the negotiated protocol) and is public.
            return self._stream if isinstance(self._stream, trio.SSLStream) else None
        sock = self._socket()
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        if info == "socket":
            return sock
        if info == "is_readable":
            return sock.is_readable()
        return None

    def _socket(self) -> trio.socket.SocketType:
        stream = self._stream
        while isinstance(stream, (trio.SSLStream, WideReads)):
            stream = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream.inner
        assert isinstance(stream, trio.SocketStream)
        return stream.socket


class GatheringBackend(httpcore.AsyncNetworkBackend):
    """TCP over Trio, as httpcore's own Trio backend, with gathered reads over TLS."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[tuple[Any, ...]] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        with _within(timeout, _CONNECT_ERRORS):
            stream = await trio.open_tcp_stream(host, port, local_address=local_address)
        for option in socket_options or ():
            stream.setsockopt(*option)
        return _Stream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[tuple[Any, ...]] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        with _within(timeout, _CONNECT_ERRORS):
            return _Stream(await trio.open_unix_socket(path))

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


def use_gathering_reads(client: httpx.AsyncClient) -> bool:
    """Give the connection pools of *client* (just made, no connection yet) the gathering
    backend. False where httpx no longer keeps them where this looks: the client then reads a
    record at a time, as before."""
    transports = [getattr(client, "_transport", None)]
    transports += list(getattr(client, "_mounts", {}).values())
    done = False
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if isinstance(pool, httpcore.AsyncConnectionPool) and hasattr(pool, "_network_backend"):
            pool._network_backend = GatheringBackend()
            done = True
    return done
