"""`POST /chunks` outside Quart (server/intake.py): it reads a body only as fast as the disk
takes it, and authenticates and answers as every other route does."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing

from trio_sync.core.hashing import hash_bytes
from trio_sync.core.offload import Offload
from trio_sync.protocol.frames import RAW, frame_header
from trio_sync.server.auth import FAILURES_ALLOWED, Authenticator
from trio_sync.server.bodies import MAX_BODY
from trio_sync.server.hub import ChangeHub
from trio_sync.server.intake import STAGING_BYTES, ChunkIntake
from trio_sync.server.store import DiskBlobStore

from .conftest import TOKEN, ServerHandle, eventually

MiB = 1024 * 1024
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def _upload(seed: str, count: int) -> tuple[list[str], bytes]:
    chunks = [random.Random(f"{seed}.{i}").randbytes(MiB) for i in range(count)]
    hashes = [hash_bytes(c) for c in chunks]
    return hashes, b"".join(
        frame_header(h, RAW, len(c)) + c for h, c in zip(hashes, chunks, strict=True)
    )


def _scope() -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/chunks", "raw_path": b"/chunks", "query_string": b"",
        "root_path": "", "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "extensions": {},
    }  # fmt: skip


async def test_uploads_are_read_no_faster_than_the_disk_takes_them(tmp_path: Path) -> None:
    # Two uploads of 12 MiB while the disk's threads are all busy: together the intake reads
    # about STAGING_BYTES of them and waits; then every chunk lands.
    uploads = [_upload(name, 12) for name in ("first", "second")]
    assert 2 * 12 * MiB > STAGING_BYTES + 4 * MiB
    offload = Offload(2)
    disk_busy = threading.Event()
    pulled = 0
    answers: list[list[dict[str, Any]]] = [[], []]

    def sender(sent: list[dict[str, Any]]) -> Callable[[dict[str, Any]], Any]:
        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        return send

    def receiver(body: bytes) -> Callable[[], Any]:
        pieces = [body[i : i + 64 * 1024] for i in range(0, len(body), 64 * 1024)]

        async def receive() -> dict[str, Any]:
            nonlocal pulled
            await trio.lowlevel.checkpoint()
            piece = pieces.pop(0)
            pulled += len(piece)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

        return receive

    async with offload.running():
        blobs = await trio.to_thread.run_sync(lambda: DiskBlobStore.open(tmp_path, offload=offload))
        intake = ChunkIntake(blobs, ChangeHub(), Authenticator(None, TOKEN), offload, body_grace=30)
        async with trio.open_nursery() as nursery:

            async def occupy_a_thread() -> None:
                await offload.run_sync(disk_busy.wait)

            for _ in range(offload.threads):
                nursery.start_soon(occupy_a_thread)
            for (_, body), sent in zip(uploads, answers, strict=True):
                nursery.start_soon(intake, _scope(), receiver(body), sender(sent))  # type: ignore[arg-type]
            try:
                await trio.testing.wait_all_tasks_blocked(cushion=0.2)
                # What is held: the budget, plus at most a frame and a message per upload.
                assert STAGING_BYTES <= pulled <= STAGING_BYTES + 2 * (MiB + 64 * 1024 + 100)
            finally:
                disk_busy.set()
        for (hashes, _), sent in zip(uploads, answers, strict=True):
            assert sent[0]["status"] == 200
            assert sorted(httpx.Response(200, content=sent[1]["body"]).json()["stored"]) == sorted(
                hashes
            )
        assert await blobs.missing([h for hashes, _ in uploads for h in hashes]) == []


async def test_an_upload_cut_off_stores_nothing(server: ServerHandle) -> None:
    hashes, body = _upload("cut", 4)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = (
        f"POST /chunks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    await stream.send_all(head + body[: len(body) // 2])
    await trio.sleep(0.2)
    await stream.aclose()
    await eventually(lambda: not list((server.data_dir / "tmp").iterdir()), timeout=5)
    async with httpx.AsyncClient(base_url=server.url, headers=HEADERS) as client:
        missing = await client.post("/chunks/missing", json={"hashes": hashes})
    assert missing.json()["missing"] == hashes


async def test_a_body_declared_too_big_is_refused_before_it_is_read(server: ServerHandle) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = (
        f"POST /chunks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    await stream.send_all(head)
    got = b""
    with trio.fail_after(5):
        while data := await stream.receive_some():
            got += data
    await stream.aclose()
    head_text, _, body = got.partition(b"\r\n\r\n")
    assert head_text.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in head_text.lower()
    assert httpx.Response(413, content=body).json()["error"] == "too_large"


async def test_wrong_tokens_count_against_uploads_too(server: ServerHandle) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        for i in range(FAILURES_ALLOWED):
            wrong = await client.post(
                "/chunks", content=b"", headers={"Authorization": f"Bearer wrong-{i}"}
            )
            assert wrong.status_code == 401
            assert wrong.json()["error"] == "unauthorized"
        refused = await client.post("/chunks", content=b"", headers=HEADERS)
    assert refused.status_code == 429
    assert refused.json()["error"] == "too_many_failures"
    assert 0 < int(refused.headers["Retry-After"]) <= 60


async def test_after_refusing_an_upload_the_rest_of_its_body_is_taken_in(tmp_path: Path) -> None:
    # The intake stops reading a body it refuses; Hypercorn would go on reading it into the
    # request's queue and, once that is full, wait there, even to say that the connection
    # closed: the answer's last send hung and the connection was never let go.
    messages = [b"not a frame header\n"] + [bytes(64 * 1024)] * 40
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"type": "http.request", "body": messages.pop(0), "more_body": bool(messages)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    offload = Offload(1)
    async with offload.running():
        blobs = await trio.to_thread.run_sync(lambda: DiskBlobStore.open(tmp_path, offload=offload))
        intake = ChunkIntake(blobs, ChangeHub(), Authenticator(None, TOKEN), offload, body_grace=30)
        with trio.fail_after(5):
            await intake(_scope(), receive, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 400
    assert messages == []
