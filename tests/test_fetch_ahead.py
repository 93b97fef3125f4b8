"""Fetching ahead: a big upload is announced, and other clients fetch its chunks as they reach
the server, so that little is left to do when the commit comes."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from httpx_sse import aconnect_sse

from trio_sync.client.early import EARLY_MIN_SIZE, EARLY_STEP
from trio_sync.client.transfer import AHEAD_WINDOW, PARTIAL_DIR, partial_name
from trio_sync.core.hashing import content_hash, cut, hash_bytes
from trio_sync.protocol.frames import MISSING, RAW, FrameParser, frame_header
from trio_sync.protocol.models import MAX_ANNOUNCED_CHUNKS, MAX_STEP_CHUNKS, Chunk
from trio_sync.protocol.paths import STATE_DIR_NAME

from .conftest import TOKEN, ServerHandle, eventually, in_sync, traffic

Start = Callable[..., Any]
MiB = 1024 * 1024
SLACK = 64 * 1024


def http(server: ServerHandle, name: str = "tester") -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Trio-Sync-Client": name}
    return httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30)


def chunked(content: bytes) -> list[tuple[Chunk, bytes]]:
    return [
        (Chunk(hash_bytes(content[o : o + n]), n), content[o : o + n])
        for o, n in cut(memoryview(content), final=True)
    ]


def announcement(path: str, pieces: list[tuple[Chunk, bytes]]) -> dict[str, Any]:
    chunks = [c for c, _ in pieces]
    return {
        "path": path,
        "hash": content_hash(chunks),
        "size": sum(c.size for c in chunks),
        "chunks": [[c.hash, c.size] for c in chunks],
    }


UPLOAD_ID = "5e" * 16


def step(
    path: str,
    content: bytes,
    pieces: list[tuple[Chunk, bytes]],
    start: int,
    stop: int,
    *,
    last: bool = False,
) -> dict[str, Any]:
    """An announcement of *pieces[start:stop]* as one step of the upload of *content*."""
    body: dict[str, Any] = {
        "path": path,
        "upload": UPLOAD_ID,
        "size": len(content),
        "offset": sum(c.size for c, _ in pieces[:start]),
        "chunks": [[c.hash, c.size] for c, _ in pieces[start:stop]],
    }
    if last:
        body["hash"] = content_hash([c for c, _ in pieces])
    return body


async def upload(client: httpx.AsyncClient, pieces: list[tuple[Chunk, bytes]]) -> None:
    body = b"".join(frame_header(c.hash, RAW, c.size) + data for c, data in pieces)
    response = await client.post("/chunks", content=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["stored"]) == len(pieces)


async def commit(
    client: httpx.AsyncClient, path: str, pieces: list[tuple[Chunk, bytes]], base_rev: int = 0
) -> int:
    """Commit *pieces* as *path*'s next version; its revision."""
    body = {**announcement(path, pieces), "base_rev": base_rev, "mtime_ns": 1_700_000_000 * 10**9}
    response = await client.post("/commit", json=body)
    assert response.status_code == 200, response.text
    rev: int = response.json()["entry"]["rev"]
    return rev


async def fetch(
    client: httpx.AsyncClient, hashes: list[str], **extra: Any
) -> list[tuple[str, str]]:
    response = await client.post("/chunks/fetch", json={"hashes": hashes, **extra})
    assert response.status_code == 200, response.text
    parser = FrameParser()
    frames = [(f.hash, f.encoding) for f in parser.feed(response.content)]
    parser.close()
    return frames


Events = list[tuple[str, str, dict[str, Any]]]


async def follow(
    server: ServerHandle,
    name: str,
    events: Events,
    changes: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Record the events of a `/sync` stream opened as client *name*, until *changes* changes."""
    async with (
        http(server, name) as client,
        aconnect_sse(client, "GET", "/sync") as source,
        aclosing(source.aiter_sse()) as stream,
    ):
        async for event in stream:
            if event.event == "hello":
                task_status.started()
                continue
            events.append((event.event, event.id, event.json()))
            if sum(e == "change" for e, _, _ in events) == changes:
                return


def assert_steps_cover(steps: Events, size: int) -> None:
    """The announced steps run from the file's start to its end, each following on."""
    at = 0
    for _, _, d in steps:
        assert d["offset"] == at
        at += sum(n for _, n in d["chunks"])
    assert at == size


# -- the wire ---------------------------------------------------------------------------------


async def test_an_announcement_goes_to_the_other_streams_as_an_event_without_id(
    server: ServerHandle,
) -> None:
    pieces = chunked(random.Random(1).randbytes(3 * MiB))
    seen: dict[str, Events] = {"A": [], "B": []}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for name, events in seen.items():
                await nursery.start(follow, server, name, events, 1)
            async with http(server, "A") as a:
                response = await a.post("/announce", json=announcement("big.bin", pieces))
                assert response.status_code == 200, response.text
                await upload(a, pieces)
                await commit(a, "big.bin", pieces)
    (incoming, change) = seen["B"]
    assert incoming[:2] == ("incoming", "")
    assert incoming[2]["hash"] == announcement("big.bin", pieces)["hash"]
    assert (incoming[2]["path"], incoming[2]["origin"]) == ("big.bin", "A")
    assert change[0] == "change"
    assert [e for e, _, _ in seen["A"]] == ["change"]  # the announcer is not told its own news


@pytest.mark.parametrize(
    "damage",
    [
        {"hash": "0" * 64},
        {"path": "../escape.bin"},
        {"path": "/etc/passwd"},
        {"size": 5},
        {"chunks": []},
        {"chunks": [["0" * 64, 1]] * (MAX_ANNOUNCED_CHUNKS + 1)},
    ],
    ids=["hash", "dotdot", "absolute", "size", "no-chunks", "too-many-chunks"],
)
async def test_bad_announcements_are_refused(server: ServerHandle, damage: dict[str, Any]) -> None:
    pieces = chunked(random.Random(2).randbytes(MiB))
    async with http(server) as client:
        response = await client.post("/announce", json={**announcement("f.bin", pieces), **damage})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"


async def test_a_fetch_may_wait_for_chunks_that_are_still_on_their_way(
    server: ServerHandle,
) -> None:
    (first, second) = [chunked(random.Random(seed).randbytes(200_000)) for seed in (3, 4)]
    wanted = [first[0][0].hash, second[0][0].hash]
    async with http(server) as client:
        await upload(client, first)
        # Without a wait, what is not stored is missing at once.
        assert await fetch(client, wanted) == [(wanted[0], RAW), (wanted[1], MISSING)]
        got: list[tuple[str, str]] = []

        async def waiting() -> None:
            got.extend(await fetch(client, wanted, wait=20))

        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiting)
                await trio.sleep(0.3)
                assert not got
                await upload(client, second)
        assert got == [(wanted[0], RAW), (wanted[1], RAW)]
        # A wait runs out: the chunk is called missing.
        absent = "f" * 64
        with trio.fail_after(10):
            assert await fetch(client, [absent], wait=0.2) == [(absent, MISSING)]


async def test_a_waiting_fetch_ends_cleanly_when_the_server_stops(server: ServerHandle) -> None:
    absent = "e" * 64
    got: list[tuple[str, str]] = []
    async with http(server) as client:

        async def waiting() -> None:
            got.extend(await fetch(client, [absent], wait=30))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiting)
                await trio.sleep(0.3)
                await server.stop()
    assert got == [(absent, MISSING)]  # a whole answer, not one cut off at the grace period
    await server.start()  # the fixture stops it again


@pytest.mark.parametrize("wait", [-1, 31, "5", True])
async def test_a_fetch_wait_is_bounded(server: ServerHandle, wait: object) -> None:
    async with http(server) as client:
        response = await client.post("/chunks/fetch", json={"hashes": ["f" * 64], "wait": wait})
    assert response.status_code == 400


async def test_an_announcement_in_steps_goes_to_the_other_streams_step_by_step(
    server: ServerHandle,
) -> None:
    content = random.Random(15).randbytes(3 * MiB)
    pieces = chunked(content)
    seen: Events = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(follow, server, "B", seen, 1)
            async with http(server, "A") as a:
                for body in (
                    step("big.bin", content, pieces, 0, 2),
                    step("big.bin", content, pieces, 2, len(pieces), last=True),
                ):
                    response = await a.post("/announce", json=body)
                    assert response.status_code == 200, response.text
                await upload(a, pieces)
                await commit(a, "big.bin", pieces)
    first, last, change = seen
    assert (first[0], first[2]["upload"], first[2]["offset"]) == ("incoming", UPLOAD_ID, 0)
    assert "hash" not in first[2]
    assert last[2]["offset"] == sum(c.size for c, _ in pieces[:2])
    assert last[2]["hash"] == change[2]["hash"] == content_hash([c for c, _ in pieces])


@pytest.mark.parametrize(
    "damage",
    [
        {"upload": "not-an-id"},
        {"offset": -1},
        {"size": 100},  # the chunks reach past the size
        {"hash": "0" * 64},  # a last step must reach the size
        {"chunks": []},  # nor hash: an empty step
        {"chunks": [["0" * 64, 1000], ["1" * 64, 1000]]},  # a short chunk before the file's end
        {"chunks": [["0" * 64, 200_000]] * (MAX_STEP_CHUNKS + 1)},
    ],
    ids=["upload-id", "offset", "past-size", "hash-short", "empty", "short-chunk", "too-many"],
)
async def test_bad_steps_are_refused(server: ServerHandle, damage: dict[str, Any]) -> None:
    content = random.Random(16).randbytes(MiB)
    pieces = chunked(content)
    async with http(server) as client:
        body = {**step("f.bin", content, pieces, 0, 1), **damage}
        response = await client.post("/announce", json=body)
    assert response.status_code == 400, response.text


# -- the clients ------------------------------------------------------------------------------


async def test_a_client_announces_a_big_upload_before_it_commits_it_and_not_a_small_edit(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    big = random.Random(5).randbytes(12 * MiB)
    (tmp_path / "a").mkdir()
    (tmp_path / "a/big.bin").write_bytes(big)
    (tmp_path / "a/small.bin").write_bytes(random.Random(6).randbytes(MiB))
    events: Events = []

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(follow, server, "watcher", events, 3)
            await start_client("a")
            # An edit that sends one chunk of the big file is not worth announcing.
            with (tmp_path / "a/big.bin").open("r+b") as f:
                f.seek(6 * MiB)
                f.write(b"edited")
    kinds = [e for e, _, _ in events]
    incoming = [(d["path"], d["hash"], d["origin"]) for e, _, d in events if e == "incoming"]
    committed = next(d for e, _, d in events if e == "change" and d["path"] == "big.bin")
    assert incoming == [("big.bin", committed["hash"], "a")]  # the small file is not announced
    assert kinds.index("incoming") < events.index(("change", str(committed["rev"]), committed))
    edit = events[-1]
    assert (edit[0], edit[2]["path"]) == ("change", "big.bin")
    assert edit[2]["hash"] != committed["hash"]


async def test_a_file_sent_while_it_is_hashed_is_announced_step_by_step(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    content = random.Random(20).randbytes(2 * EARLY_STEP + 8 * MiB)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "big.bin").write_bytes(content)
    events: Events = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(follow, server, "watcher", events, 1)
            await start_client("a")
            (staging / "big.bin").rename(tmp_path / "a/big.bin")
    *steps, (kind, _, committed) = events
    assert kind == "change"
    assert {(e, d["upload"], d["origin"]) for e, _, d in steps} == {
        ("incoming", steps[0][2]["upload"], "a")
    }
    assert_steps_cover(steps, len(content))
    assert len(steps) >= 3  # one per cut (16 MiB each), the last with the hash
    chunks = [Chunk(h, n) for _, _, d in steps for h, n in d["chunks"]]
    assert [c.to_json() for c in chunks] == committed["chunks"]
    assert ["hash" in d for _, _, d in steps] == [False] * (len(steps) - 1) + [True]
    assert steps[-1][2]["hash"] == committed["hash"]


async def test_an_edit_of_a_big_file_is_announced_in_steps_and_the_same_bytes_again_are_not(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    # Six bytes change in the first step: the others can rebuild the file from their own copy
    # while this client cuts the rest, so the edit is announced from its first step on.
    content = random.Random(21).randbytes(2 * EARLY_STEP + 8 * MiB)
    edited = content[:MiB] + b"edited" + content[MiB + 6 :]
    a = tmp_path / "a"
    a.mkdir()
    (a / "big.bin").write_bytes(content)
    events: Events = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(follow, server, "watcher", events, 2)
            client = await start_client("a")
            await eventually(lambda: any(e == "change" for e, _, _ in events))
            first_upload = {d["upload"] for e, _, d in events if e == "incoming"}
            # The same bytes written again: the server lacks nothing, so no one is told to
            # copy the file for nothing.
            with (a / "big.bin").open("r+b") as f:
                f.seek(MiB)
                f.write(content[MiB : MiB + 6])
            await trio.sleep(0.5)
            await eventually(lambda: client.engine.queue.idle)
            assert {d["upload"] for e, _, d in events if e == "incoming"} == first_upload
            with (a / "big.bin").open("r+b") as f:
                f.seek(MiB)
                f.write(b"edited")
    first_change = next(i for i, (e, _, _) in enumerate(events) if e == "change")
    *steps, (kind, _, committed) = events[first_change + 1 :]
    assert kind == "change"
    assert committed["hash"] == content_hash([c for c, _ in chunked(edited)])
    assert len(steps) >= 3
    assert {(e, d["origin"]) for e, _, d in steps} == {("incoming", "a")}
    assert len({d["upload"] for _, _, d in steps} | first_upload) == 2
    assert_steps_cover(steps, len(edited))
    assert steps[-1][2]["hash"] == committed["hash"]


async def test_a_client_rebuilds_an_announced_edit_from_its_own_copy_before_the_commit(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    old = random.Random(22).randbytes(12 * MiB)
    new = b"edited" + old[6:]
    old_pieces, new_pieces = chunked(old), chunked(new)
    kept = {c.hash for c, _ in old_pieces}
    changed = [(c, data) for c, data in new_pieces if c.hash not in kept]
    b = tmp_path / "b"
    partials = b / STATE_DIR_NAME / PARTIAL_DIR
    await start_client("b")
    async with http(server, "A") as a:
        await upload(a, old_pieces)
        rev = await commit(a, "big.bin", old_pieces)
        await eventually(lambda: (b / "big.bin").exists() and (b / "big.bin").read_bytes() == old)
        start = await traffic(server)
        announced = step("big.bin", new, new_pieces, 0, len(new_pieces), last=True)
        assert (await a.post("/announce", json=announced)).status_code == 200
        await upload(a, changed)
        await eventually(lambda: any(p.read_bytes() == new for p in partials.iterdir()))
        before_commit = await traffic(server)
        # Only the changed chunk crossed the wire: the rest came from B's copy of the file.
        changed_size = sum(c.size for c, _ in changed)
        assert changed_size < MiB
        assert before_commit["bytes_out"] - start["bytes_out"] < changed_size + SLACK
        await commit(a, "big.bin", new_pieces, base_rev=rev)
    await eventually(lambda: (b / "big.bin").read_bytes() == new)
    after = await traffic(server)
    assert after["bytes_out"] - before_commit["bytes_out"] < SLACK
    await eventually(lambda: not list(partials.iterdir()))


async def test_a_client_fetches_an_announced_upload_as_it_arrives(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    content = random.Random(7).randbytes(16 * MiB)
    pieces = chunked(content)
    half = len(pieces) // 2
    b = tmp_path / "b"
    await start_client("b")
    async with http(server, "A") as a:
        start = await traffic(server)
        assert (await a.post("/announce", json=announcement("big.bin", pieces))).status_code == 200
        await upload(a, pieces[:half])
        first = sum(c.size for c, _ in pieces[:half])
        await wait_for_bytes_out(server, start, first)
        await upload(a, pieces[half:])  # B's fetch was waiting for these
        await wait_for_bytes_out(server, start, len(content))
        partial = (
            b
            / STATE_DIR_NAME
            / PARTIAL_DIR
            / partial_name("big.bin", content_hash([c for c, _ in pieces]))
        )
        assert partial.read_bytes() == content
        before_commit = await traffic(server)
        await commit(a, "big.bin", pieces)
    await eventually(lambda: (b / "big.bin").exists() and (b / "big.bin").read_bytes() == content)
    after = await traffic(server)
    # The download found every chunk in place: only the event and no chunk crossed the wire.
    assert after["bytes_out"] - before_commit["bytes_out"] < SLACK
    assert not partial.exists()


async def test_a_client_fetches_an_upload_announced_in_steps_before_its_hash_is_known(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    # The second half repeats the first: chunks fetched for the first step are copied, not
    # fetched again, for the second.
    half = random.Random(17).randbytes(6 * MiB)
    content = half + half + random.Random(18).randbytes(2 * MiB)
    pieces = chunked(content)
    middle = next(i for i, (c, _) in enumerate(pieces) if c.hash in {p.hash for p, _ in pieces[:i]})
    b = tmp_path / "b"
    partials = b / STATE_DIR_NAME / PARTIAL_DIR
    await start_client("b")
    async with http(server, "A") as a:
        start = await traffic(server)
        response = await a.post("/announce", json=step("big.bin", content, pieces, 0, middle))
        assert response.status_code == 200, response.text
        await upload(a, pieces[:middle])
        first = sum(c.size for c, _ in pieces[:middle])
        await wait_for_bytes_out(server, start, first)  # B fetched them: no hash yet
        response = await a.post(
            "/announce", json=step("big.bin", content, pieces, middle, len(pieces), last=True)
        )
        assert response.status_code == 200, response.text
        await upload(a, pieces[middle:])
        unique = {c.hash: c.size for c, _ in pieces}
        await wait_for_bytes_out(server, start, sum(unique.values()))
        (partial,) = partials.iterdir()
        await eventually(lambda: partial.read_bytes() == content)
        before_commit = await traffic(server)
        await commit(a, "big.bin", pieces)
    await eventually(lambda: (b / "big.bin").exists() and (b / "big.bin").read_bytes() == content)
    after = await traffic(server)
    # Every chunk crossed the wire once, ahead of the commit; the download found them all.
    assert after["bytes_out"] - start["bytes_out"] < sum(unique.values()) + SLACK
    assert after["bytes_out"] - before_commit["bytes_out"] < SLACK
    await eventually(lambda: not list(partials.iterdir()))


async def test_a_missed_step_stops_the_fetch_ahead_and_the_download_still_lands(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    content = random.Random(19).randbytes(12 * MiB)
    pieces = chunked(content)
    third = len(pieces) // 3
    b = tmp_path / "b"
    await start_client("b")
    async with http(server, "A") as a:
        start = await traffic(server)
        await a.post("/announce", json=step("big.bin", content, pieces, 0, third))
        await upload(a, pieces[:third])
        await wait_for_bytes_out(server, start, sum(c.size for c, _ in pieces[:third]))
        # The step from `third` to `2 * third` never reaches B; the next one does not follow on.
        await a.post(
            "/announce", json=step("big.bin", content, pieces, 2 * third, len(pieces), last=True)
        )
        await upload(a, pieces[third:])
        await commit(a, "big.bin", pieces)
    await eventually(lambda: (b / "big.bin").exists() and (b / "big.bin").read_bytes() == content)
    await eventually(lambda: not list((b / STATE_DIR_NAME / PARTIAL_DIR).iterdir()))


async def wait_for_bytes_out(server: ServerHandle, start: dict[str, Any], at_least: int) -> None:
    with trio.fail_after(20):
        while (await traffic(server))["bytes_out"] - start["bytes_out"] < at_least:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def send_ahead(
    server: ServerHandle,
    a: httpx.AsyncClient,
    path: str,
    pieces: list[tuple[Chunk, bytes]],
    sent: list[tuple[Chunk, bytes]] | None = None,
) -> None:
    """As an uploader: announce *pieces*, send them (or only *sent*), and wait until the server
    has sent as many bytes on (to the client fetching ahead)."""
    sent = pieces if sent is None else sent
    start = await traffic(server)
    assert (await a.post("/announce", json=announcement(path, pieces))).status_code == 200
    await upload(a, sent)
    await wait_for_bytes_out(server, start, sum(c.size for c, _ in sent))


async def test_a_fetch_ahead_asks_for_two_windows_at_once(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    # The later window's chunks arrive first: B takes them while it still waits for the first
    # window's. One request at a time would wait for the first window before asking for more.
    content = random.Random(12).randbytes(14 * MiB)
    pieces = chunked(content)
    first_window = 0
    size = 0
    while size + pieces[first_window][0].size <= AHEAD_WINDOW:
        size += pieces[first_window][0].size
        first_window += 1
    later = pieces[first_window:]
    partial = (
        tmp_path / "b" / STATE_DIR_NAME / PARTIAL_DIR
        / partial_name("big.bin", content_hash([c for c, _ in pieces]))
    )  # fmt: skip
    await start_client("b")
    async with http(server, "A") as a:
        await send_ahead(server, a, "big.bin", pieces, later)

        # The partial file has its full size from the start: wait for the bytes themselves.
        def later_bytes() -> bytes:
            with partial.open("rb") as f:
                f.seek(size)
                return f.read()

        await eventually(lambda: partial.exists() and later_bytes() == content[size:])
        assert later_bytes() == content[size:]
        await upload(a, pieces[:first_window])
        await eventually(lambda: partial.read_bytes() == content)


async def test_a_newer_announcement_stops_the_older_one_and_drops_its_partial_file(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    partials = tmp_path / "b" / STATE_DIR_NAME / PARTIAL_DIR
    old, new = [chunked(random.Random(seed).randbytes(10 * MiB)) for seed in (8, 9)]
    await start_client("b")
    async with http(server, "A") as a:
        # The uploader sends half of a version, then the file changes and it starts over.
        await send_ahead(server, a, "log.bin", old, old[:2])
        # B is now waiting for the rest of that version, which never comes.
        await send_ahead(server, a, "log.bin", new)
    name = partial_name("log.bin", content_hash([c for c, _ in new]))
    await eventually(lambda: [p.name for p in partials.iterdir()] == [name], timeout=5)


async def test_a_file_fetched_ahead_whose_commit_never_comes_is_dropped_in_time(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    partials = tmp_path / "b" / STATE_DIR_NAME / PARTIAL_DIR
    given_up, later = [chunked(random.Random(seed).randbytes(9 * MiB)) for seed in (10, 11)]
    await start_client("b", ahead_keep_seconds=0.3)
    async with http(server, "A") as a:
        # An upload that is never committed (given up, or committed under another name).
        await send_ahead(server, a, "abandoned.bin", given_up)
        abandoned = partial_name("abandoned.bin", content_hash([c for c, _ in given_up]))
        assert [p.name for p in partials.iterdir()] == [abandoned]
        await trio.sleep(1.0)
        # The next announcement finds it too old.
        await a.post("/announce", json=announcement("other.bin", later))
        await upload(a, later)
    kept = partial_name("other.bin", content_hash([c for c, _ in later]))
    await eventually(lambda: [p.name for p in partials.iterdir()] == [kept], timeout=5)


@pytest.mark.parametrize(
    ("size", "pause"),
    [
        (12 * MiB, 0.05),
        # Big enough to be sent while it is hashed, and left long enough to be (client/early.py).
        (EARLY_MIN_SIZE + 4 * MiB, 0.15),
    ],
)
async def test_big_files_replaced_while_uploading_converge_and_leave_no_partial_files(
    start_client: Start, tmp_path: Path, size: int, pause: float
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    await start_client("a")
    await start_client("b")
    rng = random.Random(12)
    for round in range(4):
        # Each version replaces the last before its upload can finish (new content each time,
        # so every one is announced), then one is left to settle.
        for _ in range(3):
            part = a / f"v{round}.tmp"
            part.write_bytes(rng.randbytes(size))
            part.rename(a / "disk.img")
            await trio.sleep(pause)
        (a / f"other{round}.bin").write_bytes(rng.randbytes(9 * MiB))
    await in_sync(a, b, timeout=60)
    partials = b / STATE_DIR_NAME / PARTIAL_DIR
    try:
        await eventually(lambda: not list(partials.iterdir()), timeout=10)
    except trio.TooSlowError:
        left = sorted(p.name for p in partials.iterdir())
        raise AssertionError(f"partial files left behind: {left}") from None


async def test_files_fetched_ahead_are_still_known_after_a_reconnection(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    partials = tmp_path / "b" / STATE_DIR_NAME / PARTIAL_DIR
    given_up, later = [chunked(random.Random(seed).randbytes(9 * MiB)) for seed in (13, 14)]
    await start_client("b", ahead_keep_seconds=0.3)
    async with http(server, "A") as a:
        await send_ahead(server, a, "abandoned.bin", given_up)
    await server.stop()
    await server.start()  # B reconnects, with a new connection's worth of transfer machinery
    async with http(server, "A") as a:
        with trio.fail_after(10):
            while "b" not in (await a.get("/info")).json()["clients"]:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await trio.sleep(1.0)
        await a.post("/announce", json=announcement("other.bin", later))
        await upload(a, later)
    kept = partial_name("other.bin", content_hash([c for c, _ in later]))
    await eventually(lambda: [p.name for p in partials.iterdir()] == [kept], timeout=5)


async def test_announcements_are_not_fetched_ahead_past_the_quota(
    start_client: Start, server: ServerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review M1: a 1.4 KB announcement made every live client write 256 MiB ahead of a commit
    that never came. Fetching ahead is bounded by a quota and by half the free space."""
    caplog.set_level(logging.INFO)
    content = random.Random(8).randbytes(16 * MiB)
    pieces = chunked(content)
    b = tmp_path / "b"
    await start_client("b", ahead_quota=8 * MiB)
    async with http(server, "A") as a:
        assert (await a.post("/announce", json=announcement("big.bin", pieces))).status_code == 200
        await eventually(lambda: "not fetching big.bin ahead" in caplog.text)
        await upload(a, pieces)
        assert list((b / STATE_DIR_NAME / PARTIAL_DIR).iterdir()) == []
        await commit(a, "big.bin", pieces)
    await eventually(lambda: (b / "big.bin").exists() and (b / "big.bin").read_bytes() == content)


async def test_a_download_waits_for_free_space_instead_of_filling_the_disk(
    start_client: Start, server: ServerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client never fills its disk with a download: with less free space than the file and the
    reserve, it says so and waits (the reserve is set past any disk here to make that so)."""
    b = await start_client("b", free_space_reserve=2**62)
    content = random.Random(9).randbytes(3 * MiB)
    async with http(server, "A") as a:
        pieces = chunked(content)
        await upload(a, pieces)
        await commit(a, "big.bin", pieces)
    await eventually(lambda: "big.bin: not enough free space" in caplog.text)
    assert not (b.root / "big.bin").exists()
    assert not b.done.is_set()  # paused, not ended
