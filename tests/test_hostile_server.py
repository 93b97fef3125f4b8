"""A hostile or broken server against a real client: lying sizes, chunk lists and hashes, unsafe
paths, malformed JSON of every shape. The client refuses with an error of its own (and, live,
reconnects), never crashes with a Python error, and writes nothing outside its folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_sync.client.engine import Engine
from trio_sync.config import ClientConfig
from trio_sync.core.hashing import content_hash, hash_bytes
from trio_sync.errors import TrioSyncError
from trio_sync.protocol.models import CHUNKER, Chunk

MiB = 1024 * 1024
INFO = {"server_id": "hostile", "rev": 1, "chunker": CHUNKER, "clients": []}
HEADER = {"server_id": "hostile", "rev": 1}
ONE = Chunk(hash_bytes(b"x" * MiB), MiB)


def _entry(**changes: Any) -> dict[str, Any]:
    entry = {
        "path": "f", "rev": 1, "deleted": False, "kind": "file", "hash": content_hash([ONE]),
        "size": MiB, "chunks": [[ONE.hash, MiB]], "executable": False, "mtime_ns": 0,
    }  # fmt: skip
    return {**entry, **changes}


def _lines(*records: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


CASES: dict[str, dict[str, bytes]] = {
    "info-not-json": {"/info": b"<html>"},
    "info-a-list": {"/info": b"[1, 2]"},
    "info-nested-deep": {"/info": b"[" * 100_000},
    "files-header-a-list": {"/files": b"[]\n"},
    "files-header-without-id": {"/files": _lines({"rev": 1})},
    "entry-size-lies": {"/files": _lines(HEADER, _entry(size=10, chunks=[[ONE.hash, MiB]] * 64))},
    "entry-hash-lies": {"/files": _lines(HEADER, _entry(hash="0" * 64))},
    "entry-tiny-chunks": {
        "/files": _lines(HEADER, _entry(size=2, chunks=[[ONE.hash, 1], [ONE.hash, 1]]))
    },
    "entry-escapes": {"/files": _lines(HEADER, _entry(path="../escape"))},
    "entry-absolute": {"/files": _lines(HEADER, _entry(path="/tmp/escape"))},
    "entry-state-folder": {"/files": _lines(HEADER, _entry(path=".TRIO-SYNC/state.db"))},
    "entry-not-an-object": {"/files": _lines(HEADER, ["f", 1])},
}


async def _serve_canned(
    answers: dict[str, bytes], task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A minimal HTTP/1.1 server: each path answers 200 with its canned body, then closes."""

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = await stream.receive_some()
            if not piece:
                return
            data += piece
        path = data.split(b" ", 2)[1].decode().split("?")[0]
        body = answers.get(path, json.dumps(INFO if path == "/info" else HEADER).encode() + b"\n")
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        await stream.send_all(head.encode() + body)
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize("case", CASES)
async def test_a_hostile_server_gets_a_clear_refusal_and_nothing_escapes(
    nursery: trio.Nursery, tmp_path: Path, case: str
) -> None:
    port = await nursery.start(_serve_canned, CASES[case])
    folder = tmp_path / "folder"
    config = ClientConfig(folder, f"http://127.0.0.1:{port}", "token", "me")
    with pytest.raises(TrioSyncError):  # ours, not a TypeError, KeyError or AttributeError
        await Engine(config).sync_once()
    assert os.listdir(tmp_path) == ["folder"]  # nothing beside it
    assert set(os.listdir(folder)) <= {".trio-sync"}
