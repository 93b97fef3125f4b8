"""The server bounds what any peer can make it hold: connections, memory, time. Each test attacks as
the security review's probe did (shared/reviews/security-review.md), against a real server."""

from __future__ import annotations

import os
import random
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import zstandard

from trio_sync.core.hashing import hash_bytes
from trio_sync.errors import ProtocolError
from trio_sync.protocol.frames import RAW, ZSTD, FrameParser, frame_header
from trio_sync.protocol.models import (
    CDC_MIN,
    MAX_CHUNK_SIZE,
    MAX_DECODED_PER_REQUEST,
    Chunk,
    CommitRequest,
    FileEntry,
    content_hash,
)
from trio_sync.server.store import SQLiteMetaStore

from .conftest import TOKEN, ServerHandle

AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


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


async def test_an_answer_before_the_body_says_the_connection_will_close(
    server: ServerHandle,
) -> None:
    """Hypercorn closes a connection whose request body had not arrived when the answer was
    sent, without a `Connection: close`; a client reusing it met "Server disconnected"."""
    request = b"GET /info HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 5\r\n\r\n"
    got = await _exchange(server.port, request, within=3)  # the body never comes
    head = got.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200"), head
    assert b"\r\nconnection: close" in head, head
    request = b"GET /info HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"  # no body: kept open
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(request)
    with trio.fail_after(3):
        head = (await stream.receive_some()).split(b"\r\n\r\n", 1)[0].lower()
    await stream.aclose()
    assert b"connection: close" not in head, head


async def test_the_access_log_says_who_did_what_and_never_the_token(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """L9: there was no trail of who called what."""
    path = tmp_path / "access.log"
    server = ServerHandle(tmp_path / "server", nursery, settings={"access_log": path})
    await server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert (await client.get("/info", headers=HEADERS)).status_code == 200
        assert (
            await client.get("/info?x=1", headers={"Authorization": "Bearer nope"})
        ).status_code == 401
        # The test server's token is a shared one: each client's own name tells them apart.
        laptop = {**HEADERS, "X-Trio-Sync-Client": "laptop"}
        assert (await client.post("/chunks", headers=laptop, content=b"")).status_code == 200
        assert (await client.get("/info", headers=laptop)).status_code == 200
    await server.stop()
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) == 4, text
    address, name, method, target, status = lines[0].split()[2:7]
    assert (address, method, target, status) == ("127.0.0.1", '"GET', '/info"', "200")
    assert name == "shared"
    assert lines[1].split()[3:7] == ["-", '"GET', '/info?x=1"', "401"]
    assert [line.split()[3:5] for line in lines[2:]] == [
        ["shared:laptop", '"POST'],
        ["shared:laptop", '"GET'],
    ]
    assert TOKEN not in text
    assert "nope" not in text
    assert path.stat().st_mode & 0o777 == 0o600


async def test_an_idle_keep_alive_connection_is_closed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = ServerHandle(tmp_path / "server", nursery, settings={"keep_alive_timeout": 0.3})
    await server.start()
    request = b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n"  # keep-alive: the default of HTTP/1.1
    assert (await _exchange(server.port, request, within=3)).startswith(b"HTTP/1.1 401")
    await server.stop()


async def test_connections_beyond_the_cap_wait_until_one_closes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Peers that connect and send nothing held a descriptor each with no bound (hypercorn#81).
    Beyond the cap a connection waits in the kernel's backlog until the server closes one (here
    the idle ones, at the keep-alive timeout)."""
    server = ServerHandle(
        tmp_path / "server", nursery, settings={"max_connections": 4, "keep_alive_timeout": 2}
    )
    await server.start()
    idle = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(4)]
    request = b"GET /info HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Connection: close\r\n\r\n"
    waiting = await trio.open_tcp_stream("127.0.0.1", server.port)
    await waiting.send_all(request)
    with trio.move_on_after(1) as not_served:
        await waiting.receive_some()
    assert not_served.cancelled_caught, "a fifth connection was served past a cap of four"
    got = b""
    with trio.fail_after(10):
        while data := await waiting.receive_some():
            got += data
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    for stream in [*idle, waiting]:
        await stream.aclose()
    await server.stop()


async def test_a_trickled_body_ends_with_408(nursery: trio.Nursery, tmp_path: Path) -> None:
    """M8: `POST /chunks` at a byte every few seconds held its connection for ever."""
    server = ServerHandle(tmp_path / "server", nursery, settings={"body_grace": 0.3})
    await server.start()
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = b"POST /chunks HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 1000\r\n\r\n"
    await stream.send_all(head + b"0" * 10)
    got = b""
    with trio.fail_after(5):
        while data := await stream.receive_some():
            got += data
            if len(got) < 40:  # keep trickling until the answer comes
                await stream.send_all(b"0")
    await stream.aclose()
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    head_lines = got.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    assert head_lines.count(b"connection: close") == 1  # said once, closed after
    await server.stop()


async def test_chunks_that_decode_to_too_much_are_refused_before_decoding(
    server: ServerHandle,
) -> None:
    """H2: zstd frames of a few hundred bytes each decoding to a whole chunk of zeros; the server
    decoded them all (38 KB cost it 1 GiB) before it hashed any."""
    bomb = zstandard.ZstdCompressor().compress(b"\0" * MAX_CHUNK_SIZE)
    assert len(bomb) < 1024
    count = MAX_DECODED_PER_REQUEST // MAX_CHUNK_SIZE + 1
    body = b"".join(
        frame_header(hash_bytes(i.to_bytes(4, "big")), ZSTD, len(bomb)) + bomb for i in range(count)
    )
    async with httpx.AsyncClient(base_url=server.url, headers=HEADERS) as client:
        response = await client.post("/chunks", content=body)
        assert response.status_code == 400, response.text
        assert "decode to at most" in response.json()["message"]
        listing = await client.post("/chunks/missing", json={"hashes": []})
        assert listing.status_code == 200


def test_a_frame_sent_a_byte_at_a_time_is_not_held_as_an_object_per_byte() -> None:
    """M7: each received piece was kept as its own memoryview until its frame was complete,
    about 200 bytes of memory per payload byte."""
    payload = bytes(range(256)) * 512  # 128 KiB
    stream = frame_header(hash_bytes(payload), RAW, len(payload)) + payload
    parser = FrameParser()
    tracemalloc.start()
    try:
        frames = [f for i in range(len(stream)) for f in parser.feed(stream[i : i + 1])]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [f.payload for f in frames] == [payload]
    assert peak < 40 * len(payload)  # was about 200 per byte


@pytest.mark.parametrize(
    ("chunks", "problem"),
    [
        ([1000, 1000], "at least"),  # tiny chunks: a list far bigger than the file (M6)
        ([MAX_CHUNK_SIZE + 1], "chunk size"),  # bigger than the chunker ever cuts (H2)
    ],
)
async def test_chunk_lists_are_held_to_the_chunkers_bounds(
    server: ServerHandle, chunks: list[int], problem: str
) -> None:
    listed = [Chunk(hash_bytes(i.to_bytes(4, "big")), size) for i, size in enumerate(chunks)]
    commit = {
        "path": "f", "base_rev": 0, "hash": content_hash(listed), "size": sum(chunks),
        "chunks": [[c.hash, c.size] for c in listed], "executable": False, "mtime_ns": 0,
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=server.url, headers=HEADERS) as client:
        response = await client.post("/commit", json=commit)
    assert response.status_code == 400
    assert problem in response.json()["message"]


def test_an_entry_from_the_server_must_agree_with_its_chunk_list() -> None:
    """L1: an entry saying size 10 but listing much more made the client take its in-memory
    path for a big file; one whose hash is not its chunk list's could never be verified."""
    chunk = Chunk(hash_bytes(b"x"), 1)
    entry = {
        "path": "f", "rev": 1, "hash": content_hash([chunk]), "size": 1,
        "chunks": [[chunk.hash, 1]], "executable": False, "mtime_ns": 0,
    }  # fmt: skip
    assert FileEntry.from_json(entry).size == 1
    with pytest.raises(ProtocolError, match="size"):
        FileEntry.from_json({**entry, "size": 10})
    with pytest.raises(ProtocolError, match="hash"):
        FileEntry.from_json({**entry, "hash": "0" * 64})


@pytest.mark.parametrize(
    ("method", "url", "extra"),
    [
        ("POST", "/commit", {"content": b"[" * 100_000}),  # RecursionError in the JSON parser
        ("POST", "/commit", {"json": {"path": "f", "base_rev": 2**63}}),
        ("GET", "/sync?cursor=%C2%B2", {}),  # "²".isdigit() is true
        ("GET", "/sync?cursor=9223372036854775808", {}),  # past SQLite's integers
        ("GET", "/sync?cursor=%D9%A1%D9%A2", {}),  # Arabic-Indic digits
    ],
    ids=["nested-json", "huge-int", "superscript-cursor", "huge-cursor", "arabic-cursor"],
)
async def test_odd_input_is_a_clear_400_not_a_traceback(
    server: ServerHandle, method: str, url: str, extra: dict[str, object], caplog: Any
) -> None:
    """L3: these answered 500 with a full traceback each (log flooding), or a stream that died."""
    async with httpx.AsyncClient(base_url=server.url, headers=HEADERS) as client:
        response = await client.request(method, url, **extra)  # type: ignore[arg-type]
    assert response.status_code == 400, response.text
    assert "Traceback" not in caplog.text


async def test_a_damaged_chunk_is_never_served_and_the_next_upload_repairs_it(
    server: ServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """Review L2: a chunk overwritten on disk ("hello" → "jello") was served for ever, and an
    upload of the right bytes was answered "stored" without repairing it."""
    data = b"hello"
    name = hash_bytes(data)
    async with httpx.AsyncClient(base_url=server.url, headers=HEADERS) as client:
        assert (await client.put(f"/chunks/{name}", content=data)).status_code == 201
        (stored,) = (server.data_dir / "chunks").glob(f"**/{name}")
        stored.write_bytes(b"jello")  # bit rot, a bad restore

        assert (await client.get(f"/chunks/{name}")).status_code == 404  # not the damaged bytes
        assert "damaged" in caplog.text
        missing = await client.post("/chunks/missing", json={"hashes": [name]})
        assert missing.json()["missing"] == [name]  # so a client sends it again

        assert (await client.put(f"/chunks/{name}", content=data)).status_code == 201
        assert (await client.get(f"/chunks/{name}")).content == data

        stored.write_bytes(b"jello")  # damaged again; an upload alone repairs it
        assert (await client.put(f"/chunks/{name}", content=data)).status_code == 201
        assert stored.read_bytes() == data


async def test_pages_of_events_and_listings_are_bounded_in_bytes(tmp_path: Path) -> None:
    """Review M6: pages were 500 events or 1,000 entries whatever their size; entries with long
    chunk lists made one page need hundreds of MiB."""
    meta = await SQLiteMetaStore.open(tmp_path / "index.db")
    chunk = Chunk(hash_bytes(b"c"), CDC_MIN)
    chunks = (chunk,) * 60_000  # about 4.5 MB of chunk list a version
    for name in ("a", "b", "c"):
        request = CommitRequest(
            path=name, base_rev=0, hash=content_hash(chunks), size=CDC_MIN * len(chunks),
            chunks=chunks,
        )  # fmt: skip
        await meta.commit(request, "test")
    events = await meta.changes_since(0, 500, max_bytes=8 * 1024 * 1024)
    assert [e.path for e in events] == ["a", "b"]  # the third waits for the next page
    listing = await meta.list_current("", 1000, max_bytes=8 * 1024 * 1024)
    assert [e.path for e in listing] == ["a", "b"]
    assert [e.path for e in await meta.list_current("b", 1000)] == ["c"]
    await meta.aclose()


async def test_the_data_dir_is_private_whatever_the_umask(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review L9: the store's files and folders were 0644/0755, fine only inside a data dir the
    server made itself."""
    data = tmp_path / "shared-data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    server = ServerHandle(data, nursery)
    await server.start()
    async with httpx.AsyncClient(base_url=server.url, headers=HEADERS) as client:
        assert (await client.put(f"/chunks/{hash_bytes(b'x')}", content=b"x")).status_code == 201
    await server.stop()
    assert "can be read by other users" in caplog.text
    for path in [data / "index.db", data / "tokens.db", data / "lock"]:
        assert path.stat().st_mode & 0o077 == 0, path
    for folder in [data / "chunks", data / "tmp", *(data / "chunks").iterdir()]:
        assert folder.stat().st_mode & 0o077 == 0, folder


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB filesystem of its own (tmpfs; needs the right to mount, as root has here)."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_a_full_disk_answers_507_and_loses_nothing(
    nursery: trio.Nursery, small_disk: Path
) -> None:
    server = ServerHandle(small_disk / "data", nursery)
    await server.start()
    kept = random.Random(1).randbytes(CDC_MIN)
    async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=30) as client:
        assert (await client.put(f"/chunks/{hash_bytes(kept)}", content=kept)).status_code == 201
        statuses = []
        for i in range(4):  # 8 MiB of new chunks into what is left of 4 MiB
            data = random.Random(i + 2).randbytes(MAX_CHUNK_SIZE)
            body = frame_header(hash_bytes(data), RAW, len(data)) + data
            statuses.append((await client.post("/chunks", content=body)).status_code)
        assert 507 in statuses, statuses
        assert set(statuses) <= {200, 507}
        assert (await client.get(f"/chunks/{hash_bytes(kept)}")).content == kept
        assert (await client.get("/info")).status_code == 200
    assert os.listdir(small_disk / "data" / "tmp") == []  # nothing half stored left behind
    await server.stop()
