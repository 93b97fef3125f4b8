"""Sending a big file while it is hashed (client/early.py): the chunks go before the engine has
decided to upload, the upload takes over without sending any of them again, and a head start
that is not taken over, or whose file changed, ends quietly."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trio_sync.client.early import EARLY_MIN_SIZE
from trio_sync.client.index import StatKey
from trio_sync.client.scanner import LocalFile
from trio_sync.core.hashing import chunk_file
from trio_sync.errors import LocalChanged, RemoteError

from .conftest import (
    TOKEN,
    ServerHandle,
    client_parts,
    in_sync,
    open_fds_to,
    requests_between,
    traffic,
)

Start = Callable[..., Any]
MiB = 1024 * 1024
SLACK = 64 * 1024


def rested(key: StatKey) -> bool:
    """The settle rule: a file is done with once it has not been modified for a second."""
    return time.time() - key.mtime_ns / 1e9 >= 1.0


def write_settled(path: Path, content: bytes) -> None:
    """Write *content* with an mtime a minute ago: a file nobody is writing any more."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    past = time.time() - 60
    os.utime(path, (past, past))


async def server_lacks(server: ServerHandle, local: LocalFile) -> list[str]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        hashes = [c.hash for c in local.chunks]
        response = await client.post(server.url + "/chunks/missing", json={"hashes": hashes})
        missing: list[str] = response.json()["missing"]
        return missing


async def test_a_big_file_is_sent_before_the_upload_and_not_again_by_it(
    server: ServerHandle, tmp_path: Path
) -> None:
    root = tmp_path / "a"
    content = random.Random(1).randbytes(40 * MiB)
    write_settled(root / "big.bin", content)
    async with client_parts(server, root) as (transfer, scanner, early_sends, _):
        with transfer.sending_early("big.bin", early_sends, rested) as early:
            local = await scanner.scan("big.bin", None, early)
            assert local is not None
            # The engine has not decided anything yet; the chunks are on their way already.
            await early.sent()
            assert await server_lacks(server, local) == []
            assert early.lacking == {c.hash for c in local.chunks}
            assert not early.cut_short
            before = await traffic(server)
            entry = await transfer.upload(local, 0, early)
            after = await traffic(server)
    assert entry.hash == local.hash
    assert requests_between(before, after, "POST /chunks") == 0
    assert after["bytes_in"] - before["bytes_in"] < SLACK


async def test_a_head_start_nobody_takes_over_is_stopped_and_closes_its_file(
    server: ServerHandle, tmp_path: Path
) -> None:
    root = tmp_path / "a"
    write_settled(root / "big.bin", random.Random(2).randbytes(64 * MiB))
    with trio.fail_after(20):
        async with client_parts(server, root) as (transfer, scanner, early_sends, _):
            with transfer.sending_early("big.bin", early_sends, rested) as early:
                local = await scanner.scan("big.bin", None, early)
                assert local is not None
                assert early.started
            # The block is over (the engine decided not to upload): the sending stops, the
            # file is closed, and what was not sent yet stays unsent.
            await early.sent()
            await trio.sleep(0.3)
            assert open_fds_to(root / "big.bin") == []
            assert await server_lacks(server, local) != []


async def test_a_file_that_changed_since_it_was_cut_ends_the_head_start_quietly(
    server: ServerHandle, tmp_path: Path
) -> None:
    root = tmp_path / "a"
    hashed = random.Random(3).randbytes(24 * MiB)
    write_settled(root / "big.bin", hashed)
    fd = os.open(root / "big.bin", os.O_RDONLY)
    try:
        digest = chunk_file(fd)
    finally:
        os.close(fd)
    write_settled(root / "big.bin", random.Random(4).randbytes(24 * MiB))  # same size, new bytes
    async with client_parts(server, root) as (transfer, _, early_sends, _):
        with transfer.sending_early("big.bin", early_sends, rested) as early:
            early.cut(list(digest.chunks), 0)
            await early.sent()  # no error: only the head start ends
            assert early.stored == set()
            assert early.cut_short
            stat = os.stat(root / "big.bin")
            key = StatKey(stat.st_size, stat.st_mtime_ns, stat.st_ino, False)
            local = LocalFile("big.bin", key, digest.hash, digest.chunks)
            # The upload meets the change itself, and reports it as it always did.
            with pytest.raises(LocalChanged):
                await transfer.upload(local, 0, early)


async def test_a_head_start_ends_quietly_when_the_server_is_gone(
    server: ServerHandle, tmp_path: Path
) -> None:
    root = tmp_path / "a"
    write_settled(root / "big.bin", random.Random(6).randbytes(24 * MiB))
    async with client_parts(server, root) as (transfer, scanner, early_sends, _):
        await server.stop()
        with transfer.sending_early("big.bin", early_sends, rested) as early:
            local = await scanner.scan("big.bin", None, early)  # hashing does not need it
            assert local is not None
            with trio.fail_after(20):
                await early.sent()
            assert early.stored == set()
            assert early.cut_short
            # The upload meets the outage itself, as it would have without the head start.
            with pytest.raises(RemoteError):
                await transfer.upload(local, 0, early)


async def test_big_files_are_hashed_a_few_at_a_time(server: ServerHandle, tmp_path: Path) -> None:
    # A worker per file, but each big file being hashed holds a read buffer: no more of them at
    # once than there are I/O threads, as when each was hashed in one thread call.
    root = tmp_path / "a"
    names = [f"big{i}.bin" for i in range(12)]
    for i, name in enumerate(names):
        write_settled(root / name, random.Random(10 + i).randbytes(EARLY_MIN_SIZE + MiB))
    most = 0
    async with client_parts(server, root) as (transfer, scanner, early_sends, _):
        await server.stop()  # nothing is sent: the head starts end at their first question

        async def scan(name: str) -> None:
            with transfer.sending_early(name, early_sends, rested) as early:
                assert await scanner.scan(name, None, early) is not None

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(scan, name)
            while len(nursery.child_tasks) > 0:
                most = max(most, sum(len(open_fds_to(root / name)) for name in names))
                await trio.sleep(0.001)
    assert 1 <= most <= 4  # the client's I/O threads, as the engine makes them


@pytest.mark.parametrize(
    ("size", "age", "wanted"),
    [
        (EARLY_MIN_SIZE, 60.0, True),
        (EARLY_MIN_SIZE - 1, 60.0, False),  # small: hashed in a moment anyway
        (EARLY_MIN_SIZE * 4, 0.0, False),  # still being written: not uploaded yet either
    ],
)
async def test_only_big_files_that_are_not_being_written_are_sent_early(
    server: ServerHandle, tmp_path: Path, size: int, age: float, wanted: bool
) -> None:
    async with client_parts(server, tmp_path / "a") as (transfer, _, early_sends, _):
        with transfer.sending_early("f", early_sends, rested) as early:
            mtime_ns = int((time.time() - age) * 1e9)
            assert early.wants(StatKey(size, mtime_ns, 1, False)) is wanted
            assert not early.started


async def test_live_clients_move_a_big_file_each_chunk_once_each_way(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    await start_client("a")
    await start_client("b")
    before = await traffic(server)
    content = random.Random(5).randbytes(48 * MiB)
    write_settled(tmp_path / "staging/big.bin", content)
    (tmp_path / "staging").rename(a / "data")
    await in_sync(a, b, timeout=60)
    after = await traffic(server)
    # Sent early while hashed, fetched ahead, then committed and placed:
    # still each byte once in, once out.
    assert after["bytes_in"] - before["bytes_in"] <= len(content) + SLACK
    assert after["bytes_out"] - before["bytes_out"] <= len(content) + SLACK
