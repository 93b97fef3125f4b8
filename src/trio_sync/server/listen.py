"""Hypercorn's trio worker with a cap on open connections.

Hypercorn accepts every connection it is offered (pgjones/hypercorn#81, open), so a peer that
opens connections and sends nothing holds one descriptor each until the keep-alive timeout,
and enough of them exhaust the process's descriptors. Here a connection slot is taken
*before* `accept()`: at the cap the server stops accepting, further peers wait in the
kernel's backlog, and the server's descriptors stay bounded whatever peers do.

This is `hypercorn.trio.worker_serve` reduced to what we use (TCP listeners, TLS, lifespan,
graceful shutdown) around the same per-connection `TCPServer`.
"""

from __future__ import annotations

import logging
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from ..core.tlsread import WideReadsListener, incoming_of, receive_gathered, send_bounded

log = logging.getLogger("trio_sync.server")

#: Descriptors kept for everything but connections: the databases, chunk files being read or
#: written, the data dir lock, the log.
RESERVED_FDS = 256


def connection_cap(wanted: int) -> int:
    """The connections this process can hold open: *wanted*, or less if the descriptor limit
    allows less even after raising its soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        target = wanted + RESERVED_FDS if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    cap = max(1, min(wanted, soft - RESERVED_FDS))
    if cap < wanted:
        log.warning(
            "serving at most %d connections at once (the descriptor limit is %d; raise it with"
            " `ulimit -n` or LimitNOFILE= to serve %d)", cap, soft, wanted,
        )  # fmt: skip
    return cap


class _CappedListener(trio.abc.Listener[trio.abc.Stream]):
    """Accepts only while a slot is free; the slot comes back when the connection is closed."""

    def __init__(self, inner: trio.abc.Listener[Any], slots: trio.Semaphore) -> None:
        self._inner = inner
        self._slots = slots

    async def accept(self) -> trio.abc.Stream:
        await self._slots.acquire()
        try:
            stream = await self._inner.accept()
        except BaseException:
            self._slots.release()
            raise
        return _Counted(stream, self._slots)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Counted(trio.abc.Stream):
    """A connection that gives its slot back when closed. Its descriptor is what the cap
    bounds, not the handler: Hypercorn's handler outlives a closed connection until its idle
    timer ends.

    Over TLS it also hands Hypercorn every record that has arrived in one read
    (`core.tlsread`): a 1 GiB upload over TLS took the server 8.1 s of CPU in 65,536 reads of a
    record each, 5.8 s when each read takes what one read from the socket
    brought (64 KiB, four records).
    """

    def __init__(self, inner: trio.abc.Stream, slots: trio.Semaphore) -> None:
        self._inner = inner
        self._slots: trio.Semaphore | None = slots
        self._incoming = incoming_of(inner)

    def __getattr__(self, name: str) -> Any:
        # Hypercorn tells TLS from plain TCP by the attributes the stream has.
        return getattr(self._inner, name)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._incoming is None:
            await self._inner.send_all(data)
        else:
            await send_bounded(self._inner, data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if max_bytes is None:
            return await self._inner.receive_some()
        return await receive_gathered(self._inner, self._incoming, max_bytes)

    async def send_eof(self) -> None:
        await self._inner.send_eof()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._slots is not None:
                self._slots.release()
                self._slots = None


def listener_for(sock: socket.socket, context: ssl.SSLContext | None) -> trio.abc.Listener[Any]:
    """Connections on a listening *sock*: over TLS with *context*, plain without. Over TLS the
    socket is read TRANSPORT_READ at a time (`core.tlsread`)."""
    plain = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    if context is None:
        return plain
    return trio.SSLListener(WideReadsListener(plain), context, https_compatible=True)


async def serve(
    app: Any,
    config: Config,
    *,
    max_connections: int,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *app* on *config*'s binds until *shutdown_trigger* returns, with at most
    *max_connections* connections open; then give open requests `config.graceful_timeout`."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, state)
    context = WorkerContext(None)
    slots = trio.Semaphore(max_connections)

    async def handle(stream: trio.abc.Stream) -> None:
        try:
            connection = ConnectionState(state.copy())
            await TCPServer(wrapped, config, context, connection, stream)  # type: ignore[arg-type]
        finally:
            await trio.aclose_forcefully(stream)  # closed by now; if not, its slot comes back

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            sockets = config.create_sockets()
            ssl_context = config.create_ssl_context()
            listeners: list[trio.abc.Listener[Any]] = []
            binds = []
            for secure, group in (
                (True, sockets.secure_sockets),
                (False, sockets.insecure_sockets),
            ):
                for sock in group:
                    sock.listen(config.backlog)
                    assert ssl_context is not None or not secure
                    listener = listener_for(sock, ssl_context if secure else None)
                    listeners.append(_CappedListener(listener, slots))
                    bind = repr_socket_addr(sock.family, sock.getsockname())
                    binds.append(f"{'https' if secure else 'http'}://{bind}")
            task_status.started(binds)
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    partial(trio.serve_listeners, handle, listeners, handler_nursery=connections)
                )
                await shutdown_trigger()
                accepting.cancel_scope.cancel()
            await context.terminated.set()  # tells open connections to finish their request
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
