"""TLS: the server serves a certificate, the client trusts it only as the user said (a pinned
fingerprint, a CA file, the system's CAs), and the token is never sent before that."""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from trio_sync.client.engine import Engine
from trio_sync.client.network import GatheringBackend, _Stream, use_gathering_reads
from trio_sync.client.remote import Remote
from trio_sync.config import ClientConfig
from trio_sync.core.hashing import hash_bytes
from trio_sync.core.tls import (
    certificate_fingerprint,
    fingerprint,
    make_self_signed,
    parse_fingerprint,
)
from trio_sync.core.tlsread import TLS_WRITE, TRANSPORT_READ
from trio_sync.errors import ServerNotTrusted
from trio_sync.protocol.frames import RAW, Frame
from trio_sync.server.listen import _Counted, listener_for

from .conftest import TOKEN, ServerHandle, in_sync, requests_between, traffic

Make = Callable[..., ClientConfig]


@pytest.fixture
async def tls_server(nursery: trio.Nursery, tmp_path: Path) -> ServerHandle:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(cert, key, "127.0.0.1")
    server = ServerHandle(tmp_path / "tls", nursery, settings={"tls_cert": cert, "tls_key": key})
    await server.start()
    assert server.url.startswith("https://")
    return server


def test_fingerprints_print_and_parse_alike(tmp_path: Path) -> None:
    make_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "127.0.0.1")
    printed = certificate_fingerprint(tmp_path / "c.pem")
    assert re.fullmatch(r"SHA256:([0-9A-F]{2}:){31}[0-9A-F]{2}", printed)
    assert parse_fingerprint(printed) == parse_fingerprint(printed.replace(":", "").lower()[6:])
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="fingerprint"):
        parse_fingerprint("SHA256:12:34")
    assert fingerprint(b"x").startswith("SHA256:")


async def test_clients_sync_over_tls_with_a_pinned_fingerprint_or_a_ca_file(
    tls_server: ServerHandle, start_client: Callable[..., Any], tmp_path: Path
) -> None:
    pin = parse_fingerprint(certificate_fingerprint(tmp_path / "cert.pem"))
    a = await start_client("a", server_url=tls_server.url, fingerprint=pin)
    b = await start_client("b", server_url=tls_server.url, ca_cert=tmp_path / "cert.pem")
    (a.root / "secret.txt").write_bytes(b"only over TLS")
    await in_sync(a.root, b.root)
    assert (b.root / "secret.txt").read_bytes() == b"only over TLS"


@pytest.mark.parametrize("how", ["wrong-pin", "system-cas"])
async def test_an_unverified_server_gets_nothing(
    tls_server: ServerHandle, client_config: Make, tmp_path: Path, how: str
) -> None:
    """Neither a request nor the token reaches a server the client could not verify."""
    pin = bytes(32) if how == "wrong-pin" else None
    config = client_config("c", server_url=tls_server.url, fingerprint=pin)
    before = await _traffic(tls_server, tmp_path)
    with pytest.raises(ServerNotTrusted):
        await Engine(config).sync_once()
    after = await _traffic(tls_server, tmp_path)
    assert sum(after["requests"].values()) - sum(before["requests"].values()) == 1  # ours
    assert requests_between(before, after, "GET /info") == 1


async def _traffic(server: ServerHandle, tmp_path: Path) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=tmp_path / "cert.pem")
    return await traffic(server, verify=context)


def _contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server's context with a certificate made for the test, and a client's that trusts it."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    make_self_signed(cert, key, "127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    return server_context, ssl.create_default_context(cafile=str(cert))


async def _tls_pair(tmp_path: Path) -> tuple[trio.SSLStream[Any], Any]:
    """A TLS connection over memory streams: the client's end, and the server's as the server's
    listener wraps it."""
    server_context, client_context = _contexts(tmp_path)
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_context, server_hostname="127.0.0.1")
    server = trio.SSLStream(server_raw, server_context, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, _Counted(server, trio.Semaphore(1))


async def test_the_server_reads_what_arrived_over_tls_at_once_not_a_record_at_a_time(
    tmp_path: Path,
) -> None:
    # A read per 16 KiB record travels through h11, the ASGI queue and Quart each time: it
    # tripled the server's CPU for an upload over TLS.
    client, server = await _tls_pair(tmp_path)
    sent = bytes(range(256)) * 4096  # 1 MiB, 64 records
    await client.send_all(sent)
    received = bytearray()
    reads = 0
    while len(received) < len(sent):
        received += await server.receive_some(len(sent))
        reads += 1
    assert received == sent
    assert reads < 16  # a record a read would be 64; gathering may stop early on a busy machine

    # What arrived is handed on at once, without waiting for more that is not coming.
    await client.send_all(b"one small request")
    with trio.fail_after(5):
        assert await server.receive_some(2**20) == b"one small request"
    await client.aclose()
    with trio.fail_after(5):
        assert await server.receive_some(2**20) == b""
    await server.aclose()


async def test_a_client_reads_what_arrived_over_tls_at_once(
    tls_server: ServerHandle, tmp_path: Path
) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB: 64 records
    hash = hash_bytes(chunk)
    context = ssl.create_default_context(cafile=tmp_path / "cert.pem")
    async with Remote(tls_server.url, TOKEN, "t", verify=context) as remote:
        assert await remote.put_chunks([Frame(hash, RAW, chunk)]) == ({hash}, set())
    largest = {}
    for gathering in (False, True):
        client = httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, verify=context)
        async with client:
            if gathering:
                assert use_gathering_reads(client)
            async with client.stream("GET", f"{tls_server.url}/chunks/{hash}") as response:
                await trio.sleep(0.2)  # the whole answer arrives meanwhile
                pieces = [piece async for piece in response.aiter_raw()]
        assert b"".join(pieces) == chunk
        largest[gathering] = max(len(piece) for piece in pieces)
    assert largest[False] <= 2**14 < largest[True]


async def test_both_ends_read_their_socket_in_large_pieces_over_tls(tmp_path: Path) -> None:
    # Trio's SSLStream reads 64 KiB from its socket at a time; a read is a trip through the
    # socket and the SSLStream's locks, 16,384 of them per GiB.
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    make_self_signed(cert, key, "127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    sock = socket.create_server(("127.0.0.1", 0))
    listener = listener_for(sock, server_context)

    async def pair() -> tuple[trio.SSLStream[Any], trio.SSLStream[Any]]:
        """A connection: the client's end, made by its network backend, and the server's."""
        accepted: list[trio.SSLStream[Any]] = []

        async def accept() -> None:
            stream = await listener.accept()
            assert isinstance(stream, trio.SSLStream)
            await stream.do_handshake()
            accepted.append(stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            plain = await GatheringBackend().connect_tcp("127.0.0.1", sock.getsockname()[1])
            context = ssl.create_default_context(cafile=str(cert))
            tls = await plain.start_tls(context, "127.0.0.1")
        client = tls.get_extra_info("ssl_object")
        assert isinstance(client, trio.SSLStream)
        return client, accepted[0]

    for receiving_end in (0, 1):  # the client's, the server's
        ends = await pair()
        receiver, sender = ends[receiving_end], ends[1 - receiving_end]
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.send_all, bytes(2**20))
                await trio.sleep(0.2)  # what the socket buffers hold arrives meanwhile
                raw = await receiver.transport_stream.receive_some()
                nursery.cancel_scope.cancel()
        assert 2**16 < len(raw) <= TRANSPORT_READ
        for end in ends:
            await trio.aclose_forcefully(end)
    await listener.aclose()


class _Wire(trio.abc.Stream):
    """A transport that notes the size of every write."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_both_ends_hand_tls_a_bounded_piece_at_a_time(tmp_path: Path) -> None:
    # An SSLStream encrypts all it is given into a memory buffer before sending it, and
    # OpenSSL's buffers keep their largest size while the connection lasts: a 2 MiB chunk in
    # one write held 2 MiB per connection, which took the server over its memory target.
    server_context, client_context = _contexts(tmp_path)
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client_wire, server_wire = _Wire(client_raw), _Wire(server_raw)
    client_tls = trio.SSLStream(client_wire, client_context, server_hostname="127.0.0.1")
    server_tls = trio.SSLStream(server_wire, server_context, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_tls.do_handshake)
        nursery.start_soon(server_tls.do_handshake)
    client = _Stream(client_tls)  # as the client's network backend makes it
    server = _Counted(server_tls, trio.Semaphore(1))  # as the server's listener does
    payload = bytes(range(256)) * 8192  # 2 MiB

    async def received(receive: Callable[[int], Any]) -> bytes:
        got = bytearray()
        while len(got) < len(payload):
            got += await receive(2**20)
        return bytes(got)

    for wire, send, receive in (
        (client_wire, client.write, server.receive_some),
        (server_wire, server.send_all, client_tls.receive_some),
    ):
        wire.writes.clear()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, payload)
                assert await received(receive) == payload
        assert sum(wire.writes) > len(payload)  # all of it, in records
        assert max(wire.writes) <= TLS_WRITE + 1024  # a record's overhead is 22 bytes
    await client.aclose()
    await server.aclose()
