"""The transfer engine: content-defined chunks, batching, delta, reuse, resume, zstd, GC.

Byte and request counts come from the server's own counters (`GET /info` "traffic"), so each
test shows what really crossed the wire.
"""

from __future__ import annotations

import mmap
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from trio_sync.client.engine import Engine
from trio_sync.client.index import StatKey
from trio_sync.client.landing import Landing
from trio_sync.client.scanner import stat_key
from trio_sync.client.transfer import PARTIAL_DIR, partial_name, remove_parked_name
from trio_sync.config import ClientConfig, ServerConfig
from trio_sync.core.compression import pack, unpack
from trio_sync.core.direct import DIRECT_MIN
from trio_sync.core.durable import filesystem_type, group_syncer, syncfs
from trio_sync.core.hashing import Chunker, FileDigest, chunk_file, content_hash, cut, hash_bytes
from trio_sync.core.offload import Offload
from trio_sync.errors import (
    IncompatibleServer,
    LocalChanged,
    ProtocolError,
    StoreError,
    TrioSyncError,
)
from trio_sync.protocol.frames import RAW, ZSTD, Frame, FrameParser, frame_header
from trio_sync.protocol.models import (
    CDC_MAX,
    CDC_MIN,
    MAX_CHUNK_SIZE,
    Chunk,
    CommitRequest,
    FileEntry,
)
from trio_sync.protocol.paths import STATE_DIR_NAME
from trio_sync.server.gc import collect_garbage
from trio_sync.server.store import DiskBlobStore, SQLiteMetaStore

from .conftest import (
    TOKEN,
    ServerHandle,
    client_parts,
    evict,
    in_sync,
    requests_between,
    resident_pages,
    takes_o_direct,
    traffic,
)

Start = Callable[..., Any]
MiB = 1024 * 1024
#: Room for JSON (commits, events, listings) around the chunk bytes a test counts.
SLACK = 64 * 1024


def data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def chunks_of(content: bytes) -> list[Chunk]:
    return [
        Chunk(hash_bytes(content[o : o + n]), n) for o, n in cut(memoryview(content), final=True)
    ]


# -- chunking ---------------------------------------------------------------------------------


def digest_of(path: Path, content: bytes) -> FileDigest:
    """Write *content* to *path* and chunk it as the scanner does."""
    write(path, content)
    fd = os.open(path, os.O_RDONLY)
    try:
        return chunk_file(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 1, CDC_MIN - 1, CDC_MIN + 1, 9 * MiB + 7, 21 * MiB])
def test_streamed_chunking_cuts_like_the_whole_buffer(tmp_path: Path, size: int) -> None:
    content = data(size, size)
    digest = digest_of(tmp_path / "f", content)
    assert list(digest.chunks) == chunks_of(content)
    assert digest.size == size
    assert digest.hash == content_hash(digest.chunks)
    assert all(CDC_MIN <= c.size <= CDC_MAX for c in digest.chunks[:-1])


@pytest.mark.parametrize("step", [1, CDC_MAX, 5 * MiB])
def test_chunking_in_steps_cuts_like_chunking_at_once(tmp_path: Path, step: int) -> None:
    content = data(13 * MiB + 5, 12)
    whole = digest_of(tmp_path / "f", content)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        chunker = Chunker(fd)
        steps = []
        while not chunker.done:
            offset = chunker.position
            steps.append((offset, chunker.step(step)))
    finally:
        os.close(fd)
    assert chunker.digest() == whole
    assert [c for _, taken in steps for c in taken] == list(whole.chunks)
    # Each step says where its chunks start, and covers at least what was asked (but the last).
    ends = [offset for offset, _ in steps[1:]] + [len(content)]
    for (offset, taken), following in zip(steps, ends, strict=True):
        assert offset + sum(c.size for c in taken) == following
        assert following - offset >= step or following == len(content)


def test_streamed_chunking_cuts_runs_of_zeros_like_the_whole_buffer(tmp_path: Path) -> None:
    # Zeros never match the cut mask: those chunks are cut at CDC_MAX, not by content.
    content = bytes(5 * CDC_MAX) + data(3 * MiB, 7) + bytes(CDC_MAX + 1)
    digest = digest_of(tmp_path / "f", content)
    assert list(digest.chunks) == chunks_of(content)
    assert sum(c.size == CDC_MAX for c in digest.chunks) >= 6


def edits(content: bytes) -> dict[str, bytes]:
    middle = len(content) // 2
    return {
        "same": content,
        "overwrite in the middle": content[:middle] + data(MiB, 2) + content[middle + MiB :],
        "append": content + data(MiB + 3, 3),
        "truncate": content[: middle + 5],
        "insert at the start": b"!" + content,
        "delete in the middle": content[:middle] + content[middle + 777 :],
        "zeros over a chunk": content[:CDC_MAX] + bytes(CDC_MAX) + content[2 * CDC_MAX :],
        "another file": data(len(content), 4),
        "empty": b"",
    }


@pytest.mark.parametrize("edit", list(edits(b"")))
@pytest.mark.parametrize("step", [None, CDC_MAX])
def test_a_file_cut_with_its_old_chunks_in_hand_cuts_as_if_cut_alone(
    tmp_path: Path, edit: str, step: int | None
) -> None:
    content = data(21 * MiB + 11, 9)
    old = chunks_of(content)
    new = edits(content)[edit]
    write(tmp_path / "f", new)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        chunker = Chunker(fd, old)
        while not chunker.done:
            chunker.step(step or 0)
    finally:
        os.close(fd)
    assert list(chunker.digest().chunks) == chunks_of(new)
    # Known chunks where they were are taken by their hash alone: for an edit in place or an
    # append, all of them but around the edit and the old last one.
    taken = {"same": len(old) - 1, "append": len(old) - 1, "overwrite in the middle": len(old) - 5}
    if edit in taken:
        assert chunker.recognized >= taken[edit]
    elif edit in ("another file", "empty", "insert at the start"):
        assert chunker.recognized == 0


def test_an_insert_at_the_start_changes_only_the_first_chunk() -> None:
    content = data(20 * MiB, 1)
    before, after = chunks_of(content), chunks_of(b"!" + content)
    assert len(set(after) - set(before)) == 1


# -- frames and compression -----------------------------------------------------------------


@given(st.lists(st.binary(max_size=300), max_size=5), st.data())
def test_frames_parse_however_the_stream_is_split(payloads: list[bytes], draw: Any) -> None:
    stream = b"".join(frame_header(hash_bytes(p), RAW, len(p)) + p for p in payloads)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    parser = FrameParser()
    got: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got.extend(parser.feed(stream[start:end]))
    parser.close()
    assert [f.payload for f in got] == payloads
    assert all(f.hash == hash_bytes(f.payload) for f in got)


@pytest.mark.parametrize(
    "stream",
    [
        b"x" * 200,  # no header end
        b"abc raw 1\n.",  # not a hash
        ("a" * 64 + " gzip 1\n.").encode(),  # unknown encoding
        ("a" * 64 + f" raw {MAX_CHUNK_SIZE + 1}\n").encode(),  # too big
        ("a" * 64 + " missing 3\nabc").encode(),  # a missing chunk has no payload
    ],
)
def test_bad_frames_are_protocol_errors(stream: bytes) -> None:
    with pytest.raises(ProtocolError):
        list(FrameParser().feed(stream))


def test_a_frame_cut_short_is_an_error() -> None:
    parser = FrameParser()
    list(parser.feed(("a" * 64 + " raw 10\nabc").encode()))
    with pytest.raises(ProtocolError):
        parser.close()


def test_compression_is_used_only_where_it_pays() -> None:
    noise = data(MiB, 2)
    assert pack(noise) == (RAW, noise)
    text = b"the quick brown fox jumps over the lazy dog\n" * 20_000
    encoding, payload = pack(text)
    assert encoding == ZSTD
    assert len(payload) < len(text) // 10
    assert unpack(encoding, payload, len(text)) == text


def test_a_compressed_chunk_cannot_expand_past_the_limit() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(20 * MiB))
    with pytest.raises(ProtocolError):
        unpack(ZSTD, bomb, MAX_CHUNK_SIZE)
    with pytest.raises(ProtocolError):
        unpack(ZSTD, b"not zstd at all", MAX_CHUNK_SIZE)


def test_compression_contexts_serve_many_threads_and_survive_bad_input() -> None:
    # Each thread reuses its own zstd contexts; a corrupt or oversized chunk must not leave the
    # thread's decompressor unusable for the next one.
    def round_trips(seed: int) -> bool:
        for i in range(40):
            text = f"line {seed} {i}\n".encode() * (500 + 50 * i)
            encoding, payload = pack(text)
            assert encoding == ZSTD
            if unpack(encoding, payload, len(text)) != text:
                return False
            with pytest.raises(ProtocolError):
                unpack(ZSTD, payload[: len(payload) // 2], len(text))
            with pytest.raises(ProtocolError):
                unpack(ZSTD, payload, len(text) - 1)
        return True

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(round_trips, range(8)))


# -- the wire ---------------------------------------------------------------------------------


async def test_chunk_upload_rejects_a_chunk_that_does_not_match_its_hash(
    server: ServerHandle,
) -> None:
    good, bad = b"good chunk", b"bad chunk"
    body = frame_header(hash_bytes(good), RAW, len(good)) + good
    body += frame_header(hash_bytes(b"something else"), RAW, len(bad)) + bad
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        answer = (await client.post("/chunks", content=body)).json()
        assert answer == {"stored": [hash_bytes(good)], "rejected": [hash_bytes(b"something else")]}
        cut_short = await client.post("/chunks", content=body[:-3])
        assert cut_short.status_code == 400
        fetched = await client.post(
            "/chunks/fetch", json={"hashes": [hash_bytes(good), hash_bytes(bad)]}
        )
        frames = list(FrameParser().feed(fetched.content))
        assert [(f.encoding, f.payload) for f in frames] == [(RAW, good), ("missing", b"")]


async def test_each_chunk_of_an_upload_is_judged_alone_whatever_its_size_or_encoding(
    server: ServerHandle,
) -> None:
    text = b"compressible text " * 500
    big = data(300_000, 1)  # sent in a frame of its own, not with the small ones
    encoding, packed = pack(text)
    assert encoding == ZSTD
    frames = [
        (hash_bytes(text), ZSTD, packed),
        (hash_bytes(b"corrupt"), ZSTD, b"not zstd at all"),
        (hash_bytes(b"claimed"), RAW, b"something else"),
        (hash_bytes(big), RAW, big),
        (hash_bytes(b"plain"), RAW, b"plain"),
    ]
    body = b"".join(frame_header(h, e, len(p)) + p for h, e, p in frames)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        answer = (await client.post("/chunks", content=body)).json()
        good = [hash_bytes(text), hash_bytes(big), hash_bytes(b"plain")]
        assert sorted(answer["stored"]) == sorted(good)
        assert sorted(answer["rejected"]) == sorted(
            [hash_bytes(b"corrupt"), hash_bytes(b"claimed")]
        )
        fetched = await client.post("/chunks/fetch", json={"hashes": good})
        payloads = [f.payload for f in FrameParser().feed(fetched.content)]
        assert payloads == [text, big, b"plain"]


async def test_a_chunk_upload_cut_short_stores_none_of_its_chunks(server: ServerHandle) -> None:
    # A request is made durable as a whole; the client sends a failed request's chunks again.
    chunks = [b"first of the request", b"second of the request"]
    body = b"".join(frame_header(hash_bytes(c), RAW, len(c)) + c for c in chunks)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        assert (await client.post("/chunks", content=body[:-3])).status_code == 400
        hashes = [hash_bytes(c) for c in chunks]
        missing = await client.post("/chunks/missing", json={"hashes": hashes})
        assert missing.json() == {"missing": hashes}
    assert files_below(server.data_dir / "tmp") == set()


async def test_a_batch_of_commits_gets_one_result_each(server: ServerHandle) -> None:
    chunk = b"content"
    chunks = [Chunk(hash_bytes(chunk), len(chunk))]
    file = CommitRequest(
        "a.txt", 0, hash=content_hash(chunks), size=len(chunk), chunks=tuple(chunks)
    )
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        missing = await client.post("/commits", json={"commits": [file.to_json()]})
        assert missing.json()["results"][0]["error"] == "chunks_missing"
        await client.post("/chunks", content=frame_header(chunks[0].hash, RAW, 7) + chunk)
        folder = CommitRequest("dir", 0, kind="dir")
        stale = CommitRequest("dir", 5, kind="dir")
        answer = await client.post(
            "/commits", json={"commits": [file.to_json(), folder.to_json(), stale.to_json()]}
        )
    results = answer.json()["results"]
    assert results[0]["entry"]["path"] == "a.txt"
    assert results[1]["entry"]["path"] == "dir"
    assert results[2]["error"] == "conflict"


# -- end to end -------------------------------------------------------------------------------


async def test_many_small_files_move_in_few_requests(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(400):
        write(a / f"dir{i % 10}/file{i}", data(4096, i))
    before = await traffic(server)
    await start_client("a")
    await start_client("b")
    await in_sync(a, b, timeout=60)
    after = await traffic(server)
    # One request per file and route without batching; batches here hold dozens of files
    # (how many depends on how fast files arrive: see docs/benchmarks.md for 10,000 files).
    for route in ("POST /chunks", "POST /commits", "POST /chunks/fetch"):
        assert 0 < requests_between(before, after, route) <= 80, route
    assert requests_between(before, after, "POST /commit") == 0
    # Small files this folder never synced are sent without asking whether the server has them.
    assert requests_between(before, after, "POST /chunks/missing") == 0


async def test_a_copy_of_synced_content_is_not_uploaded_again(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "small.txt", data(4096, 1))
    await start_client("a")
    await start_client("b")
    await in_sync(a, b, timeout=30)
    before = await traffic(server)
    write(a / "copy.txt", (a / "small.txt").read_bytes())
    await in_sync(a, b, timeout=30)
    after = await traffic(server)
    # Content the folder synced before: the client asks first, and the server already has it.
    assert requests_between(before, after, "POST /chunks/missing") >= 1
    assert requests_between(before, after, "POST /chunks") == 0


async def test_content_removed_a_moment_ago_is_not_sent_again(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    # A folder moved out and back in (or a rename whose deletions are handled first): by the
    # time the files come back, no synced file holds their content any more.
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(50):
        write(a / f"old/f{i}.txt", data(4096, i))
    await start_client("a", max_delete_fraction=1.0)  # every file leaves for a moment
    await start_client("b")
    await in_sync(a, b, timeout=30)
    (a / "old").rename(tmp_path / "aside")
    await in_sync(a, b, timeout=30)
    before = await traffic(server)
    (tmp_path / "aside").rename(a / "new")
    await in_sync(a, b, timeout=30)
    after = await traffic(server)
    assert requests_between(before, after, "POST /chunks") == 0
    assert after["bytes_in"] - before["bytes_in"] < 50 * 4096


async def test_edits_inside_a_large_file_move_about_what_changed(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "big.bin", data(24 * MiB, 3))
    await start_client("a")
    await start_client("b")
    await in_sync(a, b, timeout=60)

    async def measure(edit: Callable[[Path], None]) -> tuple[int, int]:
        before = await traffic(server)
        edit(a / "big.bin")
        await in_sync(a, b, timeout=60)
        after = await traffic(server)
        return after["bytes_in"] - before["bytes_in"], after["bytes_out"] - before["bytes_out"]

    def overwrite_middle(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(12 * MiB)
            f.write(data(MiB, 4))

    def insert_at_start(path: Path) -> None:
        path.write_bytes(b"!" + path.read_bytes())

    def append(path: Path) -> None:
        with open(path, "ab") as f:
            f.write(data(MiB, 5))

    for edit, changed in ((overwrite_middle, MiB), (insert_at_start, 1), (append, MiB)):
        sent, received = await measure(edit)
        # What changed, plus at most the two chunks around it.
        assert sent <= changed + 2 * CDC_MAX + SLACK, edit.__name__
        assert received <= changed + 2 * CDC_MAX + SLACK, edit.__name__


async def test_a_download_reuses_chunks_from_other_local_files(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    original = data(12 * MiB, 6)
    write(a / "original.bin", original)
    await start_client("a")
    await start_client("b")
    await in_sync(a, b, timeout=60)
    before = await traffic(server)
    write(a / "longer copy.bin", original + data(MiB, 7))
    await in_sync(a, b, timeout=60)
    after = await traffic(server)
    assert after["bytes_out"] - before["bytes_out"] <= MiB + CDC_MAX + SLACK
    assert after["bytes_in"] - before["bytes_in"] <= MiB + CDC_MAX + SLACK


async def test_an_interrupted_upload_resumes_without_resending_stored_chunks(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    content = data(16 * MiB, 8)
    chunks = chunks_of(content)
    half = len(chunks) // 2
    # What an upload cut off half way leaves on the server: the first chunks, no commit.
    body = b""
    offset = 0
    for chunk in chunks[:half]:
        body += frame_header(chunk.hash, RAW, chunk.size) + content[offset : offset + chunk.size]
        offset += chunk.size
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        assert (await client.post("/chunks", content=body)).status_code == 200
    write(tmp_path / "a/big.bin", content)
    before = await traffic(server)
    await start_client("a")
    after = await traffic(server)
    assert after["bytes_in"] - before["bytes_in"] <= len(content) - offset + SLACK


async def test_an_interrupted_download_resumes_from_its_partial_file(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    content = data(16 * MiB, 9)
    write(a / "big.bin", content)
    uploader = await start_client("a")
    await uploader.stop()
    # What a download cut off half way leaves: the first half in place, the rest not written.
    digest_hash = content_hash(chunks_of(content))
    partial = b / STATE_DIR_NAME / PARTIAL_DIR / partial_name("big.bin", digest_hash)
    write(partial, content[: 8 * MiB])
    before = await traffic(server)
    await start_client("b")
    await in_sync(a, b)
    after = await traffic(server)
    assert after["bytes_out"] - before["bytes_out"] <= 8 * MiB + CDC_MAX + SLACK
    assert not partial.exists()


@pytest.mark.parametrize("compress", [True, False])
async def test_compressible_content_travels_compressed(
    start_client: Start, server: ServerHandle, tmp_path: Path, compress: bool
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    text = b"".join(b"line %d of a log file that repeats itself\n" % i for i in range(100_000))
    write(a / "app.log", text)
    before = await traffic(server)
    await start_client("a", compress=compress)
    await start_client("b", compress=compress)
    await in_sync(a, b, timeout=60)
    after = await traffic(server)
    sent, received = (
        after["bytes_in"] - before["bytes_in"],
        after["bytes_out"] - before["bytes_out"],
    )
    if compress:
        assert sent < len(text) // 4
        assert received < len(text) // 4
    else:
        assert sent > len(text)
        assert received > len(text)


async def test_a_client_refuses_a_server_that_chunks_differently(
    nursery: trio.Nursery, client_config: Callable[..., ClientConfig]
) -> None:
    async def other_version(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        body = b'{"server_id": "x", "rev": 0, "chunker": "fixed-4M/sha256"}'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, other_version, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    engine = Engine(client_config("c", server_url=f"http://127.0.0.1:{port}"))
    with pytest.raises(IncompatibleServer):
        await engine.sync_once()


# -- chunk store --------------------------------------------------------------------------------


def files_below(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


async def test_chunks_stored_in_the_older_two_level_layout_are_moved_and_served(
    tmp_path: Path,
) -> None:
    contents = [b"kept from before", b"also from before"]
    hashes = [hash_bytes(c) for c in contents]
    for hash, content in zip(hashes, contents, strict=True):
        old = tmp_path / "chunks" / hash[:2] / hash[2:4] / hash
        old.parent.mkdir(parents=True)
        old.write_bytes(content)
    io = Offload(1)
    blobs = DiskBlobStore.open(tmp_path, offload=io)
    async with io.running():
        assert await blobs.missing(hashes) == []
        assert [await blobs.get(h) for h in hashes] == contents
        new = b"stored after the move"
        await blobs.put(hash_bytes(new), new)
        assert await blobs.get(hash_bytes(new)) == new
    flat = {f"{h[:2]}/{h}" for h in [*hashes, hash_bytes(new)]}
    assert files_below(tmp_path / "chunks") == flat
    DiskBlobStore.open(tmp_path, offload=io)
    assert files_below(tmp_path / "chunks") == flat

    (tmp_path / "chunk-layout").write_text("some/future/layout\n")
    with pytest.raises(StoreError, match="laid out as"):
        DiskBlobStore.open(tmp_path, offload=io)


@pytest.mark.parametrize("group_sync", [True, False], ids=["syncfs", "fsync-each"])
async def test_a_chunk_batch_lands_whole_when_it_ends(tmp_path: Path, group_sync: bool) -> None:
    io = Offload(2)
    blobs = DiskBlobStore.open(tmp_path, offload=io, group_sync=group_sync)
    old = b"stored before"
    contents = [b"one", b"two", old, b"three" * 1000]
    hashes = [hash_bytes(c) for c in contents]
    async with io.running():
        await blobs.put(hash_bytes(old), old)
        async with blobs.batch() as batch:
            for hash, content in zip(hashes, contents, strict=True):
                await batch.add(hash, content)
            with pytest.raises(StoreError, match="does not match"):
                await batch.add(hash_bytes(b"other"), b"not other")
            assert await blobs.missing(hashes) == [h for h in hashes if h != hash_bytes(old)]
        assert await blobs.missing(hashes) == []
        assert [await blobs.get(h) for h in hashes] == contents
    assert files_below(tmp_path / "tmp") == set()


async def test_small_chunks_are_staged_and_read_several_at_a_time(tmp_path: Path) -> None:
    io = Offload(2)
    blobs = DiskBlobStore.open(tmp_path, offload=io)
    contents = [b"a" * 100, b"b" * 200, b"c" * 300, b"d" * 400]
    hashes = [hash_bytes(c) for c in contents]
    wrong = hash_bytes(b"something else")
    async with io.running():
        async with blobs.batch() as batch:
            refused = await batch.add_many(
                [
                    (hashes[0], contents[0]),
                    (wrong, b"not it"),
                    *zip(hashes[1:], contents[1:], strict=True),
                ]
            )
        assert refused == {wrong}
        assert await blobs.missing([*hashes, wrong]) == [wrong]
        # Read in order until the bytes reach the limit: at least one, None where absent.
        assert await blobs.get_some(hashes, 250) == contents[:2]
        assert await blobs.get_some([wrong, *hashes], 1) == [None, contents[0]]
        assert await blobs.get_some(hashes, 1) == contents[:1]
        assert await blobs.get_some(hashes, 10_000) == contents
    assert files_below(tmp_path / "tmp") == set()


@pytest.mark.parametrize("cached", [False, True], ids=["direct", "cached"])
async def test_chunk_files_bypass_the_page_cache_when_asked(tmp_path: Path, cached: bool) -> None:
    if not cached and not takes_o_direct(tmp_path):
        pytest.skip("this filesystem does not take O_DIRECT")
    io = Offload(2)
    blobs = DiskBlobStore.open(tmp_path, offload=io, direct=not cached)
    assert blobs.direct is not cached
    rng = random.Random(7)
    sizes = [1, 4095, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, 512 * 1024 + 3, MAX_CHUNK_SIZE]
    contents = [rng.randbytes(size) for size in sizes]
    hashes = [hash_bytes(c) for c in contents]
    async with io.running():
        async with blobs.batch() as batch:
            assert await batch.add_many(list(zip(hashes, contents, strict=True))) == set()
        assert await blobs.get_some(hashes, 2**30) == contents
        for hash, content in zip(hashes, contents, strict=True):
            stored = tmp_path / "chunks" / hash[:2] / hash
            assert stored.read_bytes() == content
            pages = -(-len(content) // mmap.PAGESIZE)
            evict(stored)  # read through the cache by read_bytes() just now
            assert resident_pages(stored) == 0
            assert await blobs.get(hash) == content
            if cached or len(content) < DIRECT_MIN:
                assert resident_pages(stored) == pages
            else:
                assert resident_pages(stored) <= 1  # the last partial block goes through it

        # Written fresh, not read back by anyone but the store.
        more = rng.randbytes(512 * 1024 + 5)
        await blobs.put(hash_bytes(more), more)
        stored = tmp_path / "chunks" / hash_bytes(more)[:2] / hash_bytes(more)
        assert resident_pages(stored) == (129 if cached else 1)
        stored.write_bytes(more + b"!")  # damaged: found and removed, direct or not
        assert await blobs.get(hash_bytes(more)) is None
        assert not stored.exists()
    assert files_below(tmp_path / "tmp") == set()


@pytest.mark.parametrize("group_sync", [True, False], ids=["syncfs", "fsync-each"])
async def test_a_chunk_batch_that_fails_or_is_cancelled_stores_nothing(
    tmp_path: Path, group_sync: bool
) -> None:
    io = Offload(2)
    blobs = DiskBlobStore.open(tmp_path, offload=io, group_sync=group_sync)
    contents = [b"never stored", b"nor this"]
    hashes = [hash_bytes(c) for c in contents]
    async with io.running():

        async def add_then_fail() -> None:
            async with blobs.batch() as batch:
                for hash, content in zip(hashes, contents, strict=True):
                    await batch.add(hash, content)
                raise ProtocolError("the request broke off")

        with pytest.raises(ProtocolError):
            await add_then_fail()
        with trio.CancelScope() as scope:
            async with blobs.batch() as batch:
                for hash, content in zip(hashes, contents, strict=True):
                    await batch.add(hash, content)
                scope.cancel()
                await trio.sleep_forever()
        assert await blobs.missing(hashes) == hashes
    assert files_below(tmp_path / "tmp") == set()
    assert files_below(tmp_path / "chunks") == set()


def test_syncfs_stands_in_for_fsync_only_on_filesystems_known_to_flush_everything(
    tmp_path: Path,
) -> None:
    mountinfo = (
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n"
        "40 27 0:45 / /home/me/remote rw,nosuid,nodev,relatime shared:5 - fuse.sshfs me@host: rw\n"
    )
    assert filesystem_type(os.makedev(254, 0), mountinfo) == "ext4"
    assert filesystem_type(os.makedev(0, 45), mountinfo) == "fuse.sshfs"  # optional fields skipped
    assert filesystem_type(os.makedev(9, 9), mountinfo) is None
    here = filesystem_type(tmp_path.stat().st_dev, Path("/proc/self/mountinfo").read_text())
    if here in {"ext4", "xfs", "btrfs", "tmpfs"}:
        assert group_syncer(tmp_path) is syncfs is not None
    else:
        assert group_syncer(tmp_path) is None


# -- deleting a file the server deleted -------------------------------------------------------


def parked(tmp_path: Path) -> tuple[Path, Path, StatKey]:
    """A synced file about to be deleted: checked, and given a second name in the parking."""
    target, spot = tmp_path / "doomed.txt", tmp_path / "parked"
    target.write_bytes(b"the synced content")
    os.link(target, spot)
    return target, spot, stat_key(os.lstat(target))


def no_conflict_copy() -> Path:
    raise AssertionError("no conflict copy expected")


def test_a_parked_file_loses_its_old_name_when_unchanged(tmp_path: Path) -> None:
    target, spot, expected = parked(tmp_path)
    remove_parked_name(target, expected, spot, keep_as=no_conflict_copy)
    assert not target.exists()
    assert spot.read_bytes() == b"the synced content"


def test_a_file_replaced_while_being_deleted_is_kept(tmp_path: Path) -> None:
    target, spot, expected = parked(tmp_path)
    (tmp_path / "editor-save").write_bytes(b"saved by the user")
    os.replace(tmp_path / "editor-save", target)  # how editors save: a new file over the name
    with pytest.raises(LocalChanged):
        remove_parked_name(target, expected, spot, keep_as=no_conflict_copy)
    assert target.read_bytes() == b"saved by the user"


def test_a_file_written_in_place_while_being_deleted_is_kept(tmp_path: Path) -> None:
    target, spot, expected = parked(tmp_path)
    with open(target, "r+b") as f:  # the parked name sees this write too
        f.write(b"THE USER'S EDIT, LONGER")
    with pytest.raises(LocalChanged):
        remove_parked_name(target, expected, spot, keep_as=no_conflict_copy)
    assert target.read_bytes() == b"THE USER'S EDIT, LONGER"


# -- landing downloads ------------------------------------------------------------------------


@pytest.mark.parametrize("group_sync", [True, False], ids=["syncfs", "fsync-each"])
async def test_small_downloads_land_together_and_one_failure_stays_its_own(
    tmp_path: Path, group_sync: bool
) -> None:
    root, tmp_dir = tmp_path / "folder", tmp_path / "folder" / STATE_DIR_NAME / "tmp"
    tmp_dir.mkdir(parents=True)
    write(root / "mine.txt", b"a local edit the decision did not know about")
    (root / "out").symlink_to(tmp_path)  # a path through it would leave the folder
    wanted = {f"sub{i % 4}/f{i}.txt": f"content {i}".encode() for i in range(40)}
    outcomes: dict[str, Exception | None] = {}
    io = Offload(2)
    landing = Landing(
        root, tmp_dir, io, syncfs=group_syncer(tmp_dir) if group_sync else None, client="t"
    )

    async def deliver(path: str, content: bytes) -> None:
        work = tmp_dir / f"{len(outcomes)}-{random.random()}.part"
        work.write_bytes(content)
        try:
            await landing.place(work, path, None)
        except Exception as e:
            outcomes[path] = e
            work.unlink()
        else:
            outcomes[path] = None

    async with io.running(), trio.open_nursery() as nursery:
        await nursery.start(landing.run)
        async with trio.open_nursery() as senders:
            for path, content in [*wanted.items(), ("mine.txt", b"theirs"), ("out/x", b"x")]:
                senders.start_soon(deliver, path, content)
        nursery.cancel_scope.cancel()

    assert all(outcomes[path] is None for path in wanted)
    assert {p: (root / p).read_bytes() for p in wanted} == wanted
    assert isinstance(outcomes["mine.txt"], LocalChanged)
    assert (root / "mine.txt").read_bytes() == b"a local edit the decision did not know about"
    assert isinstance(outcomes["out/x"], TrioSyncError)
    assert not (tmp_path / "x").exists()
    assert list(tmp_dir.iterdir()) == []
    stats = landing.statistics()
    assert stats.files == len(wanted) + 2
    assert stats.batches <= stats.files // 8  # files that arrive together land together


async def test_files_made_from_parked_copies_land_together(
    server: ServerHandle, tmp_path: Path
) -> None:
    # A folder moved on another client arrives as deletions (each file parked) and creations
    # of the same content (each built from its parked copy). An fsync per file and per folder
    # took most of the 1.5 s that a move of 1,000 files took to reach the other client.
    root = tmp_path / "a"
    contents = {f"old/f{i}.txt": random.Random(i).randbytes(3000 + i) for i in range(40)}
    for path, content in contents.items():
        write(root / path, content)
    async with client_parts(server, root, syncfs=True) as parts:
        found = {path: await parts.scanner.scan(path, None) for path in contents}
        for path, local in found.items():
            assert local is not None
            await parts.transfer.delete_local(path, local)
        before = parts.landing.statistics()
        start = await traffic(server)
        async with trio.open_nursery() as nursery:
            for rev, (path, local) in enumerate(found.items(), 1):
                assert local is not None
                entry = FileEntry(
                    path.replace("old/", "new/"), rev, hash=local.hash, size=local.stat.size,
                    chunks=local.chunks, mtime_ns=local.stat.mtime_ns,
                )  # fmt: skip
                nursery.start_soon(parts.transfer.download, entry, None)
        after = parts.landing.statistics()
    assert {p: (root / p.replace("old/", "new/")).read_bytes() for p in contents} == contents
    assert not any((root / p).exists() for p in contents)
    assert requests_between(start, await traffic(server), "POST /chunks/fetch") == 0
    assert after.files - before.files == len(contents)
    assert after.batches - before.batches <= len(contents) // 8


# -- garbage collection -----------------------------------------------------------------------


async def test_garbage_collection_keeps_what_history_and_commits_need(tmp_path: Path) -> None:
    meta = await SQLiteMetaStore.open(tmp_path / "index.db")
    io = Offload(2)
    blobs = DiskBlobStore.open(tmp_path, offload=io)
    lock = trio.Lock()
    async with io.running():
        try:
            versions = [b"version one", b"version two"]
            chunks = [Chunk(hash_bytes(v), len(v)) for v in versions]
            for chunk, content in zip(chunks, versions, strict=True):
                await blobs.put(chunk.hash, content)
            rev = 0
            for chunk in chunks:
                entry, _ = await meta.commit(
                    CommitRequest(
                        "notes.txt",
                        rev,
                        hash=content_hash([chunk]),
                        size=chunk.size,
                        chunks=(chunk,),
                    ),
                    "a",
                )
                rev = entry.rev
            orphan = b"uploaded, never committed"
            await blobs.put(hash_bytes(orphan), orphan)
            later = time.time() + 10

            # Within the history window and the grace period, everything stays.
            kept = await collect_garbage(
                meta, blobs, lock, keep_history=3600, grace=3600, now=later
            )
            assert (kept.versions_pruned, kept.chunks_deleted) == (0, 0)
            # Past both: the replaced version and the orphan go; the current version stays.
            gone = await collect_garbage(meta, blobs, lock, keep_history=1, grace=1, now=later)
            assert (gone.versions_pruned, gone.chunks_deleted) == (1, 2)
            assert await blobs.get(chunks[1].hash) == versions[1]
            assert await blobs.get(chunks[0].hash) is None
            # A chunk someone just asked about is fresh again and survives.
            await blobs.put(hash_bytes(orphan), orphan)
            assert await blobs.missing([hash_bytes(orphan)]) == []
            fresh = await collect_garbage(meta, blobs, lock, keep_history=1, grace=5, now=later - 6)
            assert fresh.chunks_deleted == 0
            # An upload over a slow link: what it sent first is still there hours later (L8).
            grace = ServerConfig(tmp_path).gc_grace
            slow = await collect_garbage(
                meta, blobs, lock, keep_history=1, grace=grace, now=time.time() + 6 * 3600
            )
            assert slow.chunks_deleted == 0
        finally:
            await meta.aclose()
