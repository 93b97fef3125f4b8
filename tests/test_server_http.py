"""The wire contract, spoken by hand over real HTTP to a real server."""

from __future__ import annotations

import json
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from httpx_sse import aconnect_sse

from trio_sync.client.remote import _closing
from trio_sync.core.hashing import content_hash, hash_bytes
from trio_sync.protocol.models import MAX_CHUNK_SIZE, Chunk

from .conftest import TOKEN, ServerHandle

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def http(server: ServerHandle, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=10, **kwargs)


async def put_file(
    client: httpx.AsyncClient, path: str, data: bytes, base_rev: int = 0
) -> httpx.Response:
    chunk = Chunk(hash_bytes(data), len(data))
    put = await client.put(f"/chunks/{chunk.hash}", content=data)
    assert put.status_code == 201, put.text
    return await client.post("/commit", json=commit_body(path, [chunk], base_rev))


def commit_body(path: str, chunks: list[Chunk], base_rev: int = 0) -> dict[str, Any]:
    return {
        "path": path,
        "base_rev": base_rev,
        "hash": content_hash(chunks),
        "size": sum(c.size for c in chunks),
        "chunks": [[c.hash, c.size] for c in chunks],
        "executable": False,
        "mtime_ns": 1_700_000_000_000_000_000,
    }


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "not-bearer"],
)
@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/info"),
        ("GET", "/sync"),
        ("GET", "/files"),
        ("POST", "/commit"),
        ("POST", "/chunks"),
    ],
)
async def test_every_route_needs_the_token(
    server: ServerHandle, headers: dict[str, str], method: str, url: str
) -> None:
    async with http(server, headers=headers) as client:
        response = await client.request(method, url)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    "path",
    [
        "../escaped.txt",
        "../../escaped.txt",
        "/tmp/escaped.txt",
        "a/../../escaped.txt",
        "a/./b",
        "a//b",
        "nul\x00byte",
        "line\nfeed",
        ".trio-sync/state.db",
        "e\u0301.txt",
        "",
    ],
)
async def test_unsafe_paths_are_rejected_and_nothing_is_written(
    server: ServerHandle, tmp_path: Path, path: str
) -> None:
    before = snapshot(tmp_path)
    async with http(server, headers=AUTH) as client:
        data = b"payload"
        chunk = Chunk(hash_bytes(data), len(data))
        await client.put(f"/chunks/{chunk.hash}", content=data)
        before = snapshot(tmp_path)  # the chunk itself is content-addressed, inside the data dir
        response = await client.post("/commit", json=commit_body(path, [chunk]))
        assert response.status_code == 400
        assert response.json()["error"] == "bad_request"
        listing = (await client.get("/files")).text.splitlines()
    assert len(listing) == 1  # the header line only: nothing was committed
    assert snapshot(tmp_path) == before
    assert not (tmp_path.parent / "escaped.txt").exists()


@pytest.mark.parametrize("bad", ["../" + "a" * 62, "A" * 64, "zz", "a" * 63])
async def test_chunk_routes_reject_anything_but_a_hash(server: ServerHandle, bad: str) -> None:
    async with http(server, headers=AUTH) as client:
        response = await client.put(f"/chunks/{bad}", content=b"x")
    assert response.status_code in (400, 404)


async def test_chunk_must_match_its_hash(server: ServerHandle) -> None:
    async with http(server, headers=AUTH) as client:
        response = await client.put(f"/chunks/{hash_bytes(b'one')}", content=b"two")
        assert response.status_code == 422
        missing = await client.post("/chunks/missing", json={"hashes": [hash_bytes(b"one")]})
    assert missing.json()["missing"] == [hash_bytes(b"one")]
    assert list((server.data_dir / "tmp").iterdir()) == []


async def test_oversized_chunk_is_refused(server: ServerHandle) -> None:
    data = b"\0" * (MAX_CHUNK_SIZE + 2 * 1024 * 1024)
    async with http(server, headers=AUTH) as client:
        response = await client.put(f"/chunks/{hash_bytes(data)}", content=data)
    assert response.status_code == 413


async def test_commit_needs_its_chunks_first(server: ServerHandle) -> None:
    chunk = Chunk(hash_bytes(b"never sent"), 10)
    async with http(server, headers=AUTH) as client:
        response = await client.post("/commit", json=commit_body("a.txt", [chunk]))
    assert response.status_code == 422
    assert response.json()["missing"] == [chunk.hash]


async def test_commit_hash_must_match_chunk_list(server: ServerHandle) -> None:
    data = b"content"
    chunk = Chunk(hash_bytes(data), len(data))
    body = commit_body("a.txt", [chunk]) | {"hash": hash_bytes(b"lie")}
    async with http(server, headers=AUTH) as client:
        await client.put(f"/chunks/{chunk.hash}", content=data)
        response = await client.post("/commit", json=body)
    assert response.status_code == 422


async def test_stale_base_revision_gets_409_with_the_current_version(server: ServerHandle) -> None:
    async with http(server, headers=AUTH) as client:
        first = (await put_file(client, "doc.txt", b"v1")).json()["entry"]
        second = (await put_file(client, "doc.txt", b"v2", base_rev=first["rev"])).json()["entry"]
        stale = await put_file(client, "doc.txt", b"v2-from-elsewhere", base_rev=first["rev"])
        assert stale.status_code == 409
        assert stale.json()["current"]["rev"] == second["rev"]
        assert stale.json()["current"]["hash"] == second["hash"]
        # Creating over an existing file without knowing it is stale too.
        blind = await put_file(client, "doc.txt", b"blind", base_rev=0)
        assert blind.status_code == 409
        # A stale delete must not remove the newer version either.
        delete = await client.post(
            "/commit", json={"path": "doc.txt", "base_rev": first["rev"], "deleted": True}
        )
        assert delete.status_code == 409
        listing = [json.loads(line) for line in (await client.get("/files")).text.splitlines()]
    assert listing[1]["hash"] == second["hash"]


async def test_delete_leaves_a_tombstone_and_recreate_after_it(server: ServerHandle) -> None:
    async with http(server, headers=AUTH) as client:
        created = (await put_file(client, "gone.txt", b"x")).json()["entry"]
        deleted = await client.post(
            "/commit", json={"path": "gone.txt", "base_rev": created["rev"], "deleted": True}
        )
        tombstone = deleted.json()["entry"]
        assert tombstone["deleted"] is True
        assert tombstone["rev"] > created["rev"]
        again = await put_file(client, "gone.txt", b"back", base_rev=0)
        assert again.status_code == 200


async def test_sse_stream_with_an_independent_parser(server: ServerHandle) -> None:
    """Catch-up from Last-Event-ID first, in order, then live events; framing per the spec."""
    async with http(server, headers=AUTH) as client:
        revs = []
        for i in range(3):
            revs.append((await put_file(client, f"f{i}.txt", b"%d" % i)).json()["entry"]["rev"])
        seen: list[tuple[str, str, dict[str, Any]]] = []
        headers = {"Last-Event-ID": str(revs[0])}
        with trio.fail_after(10):
            async with aconnect_sse(client, "GET", "/sync", headers=headers) as source:
                assert source.response.headers["content-type"].startswith("text/event-stream")
                async with aclosing(source.aiter_sse()) as events:
                    async for event in events:
                        seen.append((event.event, event.id, event.json()))
                        if len(seen) == 3:
                            await put_file(client, "live.txt", b"live")
                        if len(seen) == 4:
                            break
    assert seen[0][0] == "hello"
    assert [(e, i, d["path"]) for e, i, d in seen[1:]] == [
        ("change", str(revs[1]), "f1.txt"),
        ("change", str(revs[2]), "f2.txt"),
        ("change", str(revs[2] + 1), "live.txt"),
    ]


async def test_sse_sends_keepalive_comments(nursery: trio.Nursery, tmp_path: Path) -> None:
    handle = ServerHandle(tmp_path / "server", nursery, keepalive=0.2)
    await handle.start()
    try:
        async with (
            http(handle, headers=AUTH) as client,
            client.stream("GET", "/sync") as response,
        ):
            raw = b""
            with trio.fail_after(5):
                async with _closing(response.aiter_raw()) as pieces:
                    async for piece in pieces:
                        raw += piece
                        if b": keep-alive" in raw:
                            break
    finally:
        await handle.stop()


async def test_server_state_survives_a_restart(server: ServerHandle) -> None:
    async with http(server, headers=AUTH) as client:
        entry = (await put_file(client, "kept.txt", b"kept")).json()["entry"]
        server_id = (await client.get("/info")).json()["server_id"]
    await server.stop()
    await server.start()
    async with http(server, headers=AUTH) as client:
        info = (await client.get("/info")).json()
        listing = [json.loads(line) for line in (await client.get("/files")).text.splitlines()]
        chunk = await client.get(f"/chunks/{entry['chunks'][0][0]}")
    assert (info["server_id"], info["rev"], info["clients"]) == (server_id, entry["rev"], [])
    assert listing[1]["path"] == "kept.txt"
    assert chunk.content == b"kept"


async def test_folders_are_explicit_and_the_tree_stays_consistent(server: ServerHandle) -> None:
    async with http(server, headers=AUTH) as client:
        nested = (await put_file(client, "a/b/c.txt", b"c")).json()["entry"]
        listing = [json.loads(line) for line in (await client.get("/files")).text.splitlines()]
        kinds = {e["path"]: e["kind"] for e in listing[1:]}
        assert kinds == {"a": "dir", "a/b": "dir", "a/b/c.txt": "file"}

        folder_rev = listing[2]["rev"]  # "a/b"
        # No file where a non-empty folder is, and nothing below a file.
        over_folder = await put_file(client, "a/b", b"file over folder", base_rev=folder_rev)
        assert over_folder.status_code == 409
        assert over_folder.json()["reason"] == "blocked"
        under_file = await put_file(client, "a/b/c.txt/d", b"below a file")
        assert under_file.status_code == 409
        assert under_file.json()["blocking"]["path"] == "a/b/c.txt"

        # A folder is deleted only once it is empty.
        not_empty = await client.post(
            "/commit", json={"path": "a/b", "base_rev": folder_rev, "deleted": True}
        )
        assert not_empty.status_code == 409
        assert not_empty.json()["reason"] == "not_empty"
        await client.post(
            "/commit", json={"path": "a/b/c.txt", "base_rev": nested["rev"], "deleted": True}
        )
        emptied = await client.post(
            "/commit", json={"path": "a/b", "base_rev": folder_rev, "deleted": True}
        )
        assert emptied.status_code == 200

        empty_dir = await client.post("/commit", json={"path": "e", "base_rev": 0, "kind": "dir"})
        assert empty_dir.json()["entry"] == {
            "path": "e", "rev": empty_dir.json()["entry"]["rev"], "deleted": False,
            "kind": "dir", "origin": "unknown",
        }  # fmt: skip


async def test_uploaded_chunks_are_not_kept_in_memory(server: ServerHandle) -> None:
    """The client must let go of each chunk once sent, or memory grows with file size."""
    import gc
    import tracemalloc

    from trio_sync.client.remote import Remote
    from trio_sync.protocol.frames import RAW, Frame

    gc.disable()  # what a GC pass would free does not count: it would pile up between passes
    tracemalloc.start()
    try:
        async with Remote(server.url, TOKEN, "mem") as remote:
            for i in range(16):
                data = bytes([i]) * MAX_CHUNK_SIZE
                await remote.put_chunks([Frame(hash_bytes(data), RAW, data)])
                del data
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    assert peak < 6 * MAX_CHUNK_SIZE  # a few chunks in flight, not all sixteen


async def test_metrics_are_prometheus_text_behind_the_bearer_token(server: ServerHandle) -> None:
    async with http(server) as client:
        assert (await client.get("/metrics")).status_code == 401
        headers = {**AUTH, "X-Trio-Sync-Client": "watcher"}
        async with (
            aconnect_sse(client, "GET", "/sync", headers=headers) as source,
            aclosing(source.aiter_sse()) as events,
        ):
            async for event in events:
                if event.event == "hello":
                    made = await client.post(
                        "/commit",
                        json={"path": "d", "base_rev": 0, "kind": "dir"},
                        headers=AUTH,
                    )
                    assert made.status_code == 200
                elif event.event == "change":  # the stream still open: one client
                    stale = {"path": "d", "base_rev": 999, "kind": "dir", "deleted": True}
                    refused = await client.post("/commit", json=stale, headers=AUTH)
                    assert refused.status_code == 409
                    answer = await client.get("/metrics", headers=AUTH)
                    break
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    assert "trio_sync_commits_total 1.0" in text
    assert 'trio_sync_conflicts_total{reason="stale"} 1.0' in text
    assert "trio_sync_clients_connected 1.0" in text
    assert "trio_sync_commit_to_event_seconds_count 1.0" in text
    assert 'trio_sync_requests_total{route="POST /commit"} 2.0' in text
    assert "trio_sync_received_bytes_total" in text
    assert TOKEN not in text


async def test_a_folder_moves_in_one_transaction_if_it_is_what_the_client_expects(
    server: ServerHandle,
) -> None:
    async with http(server, headers=AUTH) as client:
        a = (await put_file(client, "old/a.txt", b"a")).json()["entry"]
        b = (await put_file(client, "old/sub/b.txt", b"b")).json()["entry"]
        folders = {e["path"]: e["rev"] for e in await listing(client) if e["kind"] == "dir"}
        expect = {"": folders["old"], "sub": folders["old/sub"], "a.txt": a["rev"]}

        # Not what the server has (b.txt left out): refused, nothing changes.
        stale = await client.post("/move", json={"from": "old", "to": "new", "expect": expect})
        assert stale.status_code == 409
        assert stale.json()["reason"] == "stale"
        expect["sub/b.txt"] = b["rev"]
        await put_file(client, "taken/x.txt", b"x")
        taken = await client.post("/move", json={"from": "old", "to": "taken", "expect": expect})
        assert taken.status_code == 409
        assert taken.json()["reason"] == "blocked"
        inside = await client.post("/move", json={"from": "old", "to": "old/in", "expect": expect})
        assert inside.status_code == 400
        assert {e["path"] for e in await listing(client)} == {
            "old", "old/a.txt", "old/sub", "old/sub/b.txt", "taken", "taken/x.txt",
        }  # fmt: skip

        moved = await client.post("/move", json={"from": "old", "to": "deep/new", "expect": expect})
        assert moved.status_code == 200, moved.text
        entries = moved.json()["entries"]
    # A missing parent first, then the new paths parents first, then the old ones children
    # first, each a revision of its own; each new path names where it came from.
    assert [(e["path"], e["deleted"]) for e in entries] == [
        ("deep", False), ("deep/new", False), ("deep/new/a.txt", False),
        ("deep/new/sub", False), ("deep/new/sub/b.txt", False), ("old/sub/b.txt", True),
        ("old/sub", True), ("old/a.txt", True), ("old", True),
    ]  # fmt: skip
    assert [e["rev"] for e in entries] == list(range(entries[0]["rev"], entries[-1]["rev"] + 1))
    assert [e.get("moved_from") for e in entries] == [
        None, "old", "old/a.txt", "old/sub", "old/sub/b.txt", None, None, None, None,
    ]  # fmt: skip
    assert (entries[2]["hash"], entries[2]["chunks"]) == (a["hash"], a["chunks"])
    async with http(server, headers=AUTH) as client:
        assert {e["path"] for e in await listing(client)} == {
            "deep", "deep/new", "deep/new/a.txt", "deep/new/sub", "deep/new/sub/b.txt",
            "taken", "taken/x.txt",
        }  # fmt: skip


async def listing(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    lines = (await client.get("/files")).text.splitlines()
    return [json.loads(line) for line in lines[1:]]
