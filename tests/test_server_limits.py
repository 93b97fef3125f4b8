"""The server bounds what any peer can make it hold: connections, memory, time. Each test attacks as
the security review's probe did (shared/reviews/security-review.md), against a real server."""

from __future__ import annotations

from pathlib import Path

import trio

from .conftest import TOKEN, ServerHandle

AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()


async def _exchange(port: int, request: bytes, *, within: float) -> bytes:
    """Send *request* on a new connection and read until the server closes it; fail if it has
    not closed it *within* seconds."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(request)
        got = b""
        with trio.fail_after(within):
            while data := await stream.receive_some():
                got += data
        return got
    finally:
        await stream.aclose()


async def test_a_connection_is_closed_after_connection_close(server: ServerHandle) -> None:
    """H1: after any answer, 401 included, the connection stayed open for good."""
    request = b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert (await _exchange(server.port, request, within=3)).startswith(b"HTTP/1.1 401")
    request = b"GET /info HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Connection: close\r\n\r\n"
    assert (await _exchange(server.port, request, within=3)).startswith(b"HTTP/1.1 200")


async def test_an_idle_keep_alive_connection_is_closed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = ServerHandle(tmp_path / "server", nursery, settings={"keep_alive_timeout": 0.3})
    await server.start()
    request = b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n"  # keep-alive: the default of HTTP/1.1
    assert (await _exchange(server.port, request, within=3)).startswith(b"HTTP/1.1 401")
    await server.stop()
