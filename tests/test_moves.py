"""A folder moved as one operation: one request from the mover, one rename at the others."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from trio_sync.client.index import StatKey
from trio_sync.client.moves import HeldMoves, rename_folder
from trio_sync.client.scanner import stat_key
from trio_sync.core.hashing import content_hash, hash_bytes
from trio_sync.errors import Conflict, StoreError
from trio_sync.protocol.models import DIR, Chunk, CommitRequest, FileEntry, MoveRequest
from trio_sync.server import store
from trio_sync.server.store import SQLiteMetaStore

from .conftest import (
    TOKEN,
    ServerHandle,
    eventually,
    in_sync,
    messages,
    requests_between,
    traffic,
    write,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}


Start = Callable[..., Any]


async def test_a_moved_folder_is_one_request_and_one_rename_at_the_other_client(
    start_client: Start, server: ServerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(40):
        write(a / f"album/{i % 4}/photo{i}.jpg", os.urandom(5_000))
    write(a / "album/empty.txt", "")  # no content to match it by: the move names it
    write(a / "archive/keep.txt", "stays")
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)
    inode = os.stat(b / "album/3/photo7.jpg").st_ino

    caplog.set_level(logging.INFO)
    caplog.clear()
    before = await traffic(server)
    (a / "album").rename(a / "archive/album-2026")
    await in_sync(a, b)
    await eventually(
        lambda: "moved folder album to archive/album-2026" in " ".join(messages(caplog))
    )
    after = await traffic(server)
    assert requests_between(before, after, "POST /move") == 1
    for route in ("POST /commits", "POST /chunks", "POST /chunks/fetch"):
        assert requests_between(before, after, route) == 0, route
    # B renamed its folder: the very files, not copies of them.
    assert os.stat(b / "archive/album-2026/3/photo7.jpg").st_ino == inode
    assert not (b / "album").exists()

    # Both indexes followed: an edit at the new place is an edit, not a conflict.
    write(a / "archive/album-2026/3/photo7.jpg", "edited")
    write(b / "archive/album-2026/0/photo0.jpg", "edited on b")
    await in_sync(a, b)
    assert (a / "archive/album-2026/0/photo0.jpg").read_text() == "edited on b"
    assert (b / "archive/album-2026/3/photo7.jpg").read_text() == "edited"
    assert not [m for m in messages(caplog) if "conflict" in m]

    # The history shows the files' renames.
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as http:
        for old, new in [
            ("album/1/photo1.jpg", "archive/album-2026/1/photo1.jpg"),
            ("album/empty.txt", "archive/album-2026/empty.txt"),
            ("album", "archive/album-2026"),
        ]:
            gone = (await http.get("/history", params={"path": old})).json()["versions"][0]
            assert gone["renamed_to"] == new
            made = (await http.get("/history", params={"path": new})).json()["versions"][-1]
            assert made["renamed_from"] == old


async def test_a_move_of_a_folder_not_yet_synced_goes_path_by_path(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "docs/one.txt", "one")
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)

    before = await traffic(server)
    write(a / "docs/two.txt", "two")  # not on the server yet when the folder moves
    (a / "docs").rename(a / "papers")
    await in_sync(a, b)
    assert sorted(p.name for p in (b / "papers").iterdir()) == ["one.txt", "two.txt"]
    after = await traffic(server)
    assert requests_between(before, after, "POST /move") <= 1  # refused if it was asked


def test_a_folder_is_renamed_only_if_it_holds_what_was_synced(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root / "old/a.txt", "a")
    write(root / "old/sub/b.txt", "b")

    def checks() -> list[tuple[str, StatKey | None]]:
        return [
            ("old/a.txt", stat_key(os.lstat(root / "old/a.txt"))),
            ("old/sub", None),
            ("old/sub/b.txt", stat_key(os.lstat(root / "old/sub/b.txt"))),
        ]

    synced = checks()
    write(root / "old/sub/b.txt", "changed since")
    assert not rename_folder(root, "old", "new", synced)  # nothing moves
    assert (root / "old/sub/b.txt").read_text() == "changed since"
    assert not (root / "new").exists()

    write(root / "new/theirs.txt", "in the way")
    assert not rename_folder(root, "old", "new", checks())  # never over what is there
    assert (root / "new/theirs.txt").read_text() == "in the way"
    assert (root / "old/a.txt").read_text() == "a"

    (root / "new/theirs.txt").unlink()
    (root / "new").rmdir()
    assert rename_folder(root, "old", "new", checks())
    assert sorted(os.listdir(root)) == ["new"]
    assert (root / "new/sub/b.txt").read_text() == "changed since"


async def test_a_folder_with_a_change_not_yet_sent_is_not_renamed_and_the_change_stays(
    start_client: Start, server: ServerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(5):
        write(a / f"docs/{i}.txt", f"file {i}")
    await start_client("a")
    # A file still open for writing waits a minute here before it is sent.
    await start_client("b", settle_seconds=60, settle_max_seconds=120)
    await in_sync(a, b)

    caplog.set_level(logging.INFO)
    with open(b / "docs/2.txt", "r+b") as f:  # noqa: ASYNC230 - a writer that stays
        f.write(b"B's edit")
        f.flush()
        (a / "docs").rename(a / "papers")
        await eventually(lambda: len(list((b / "papers").glob("*.txt"))) == 5)
    # Path by path: the other files came over, the one being written kept its place and edit.
    assert (b / "docs/2.txt").read_bytes().startswith(b"B's edit")
    assert (b / "papers/2.txt").read_text() == "file 2"
    assert not [m for m in messages(caplog) if m.startswith("moved folder docs to papers (")]


def folder(path: str, rev: int, moved_from: str | None = None, origin: str = "a") -> FileEntry:
    return FileEntry(path=path, rev=rev, kind=DIR, origin=origin, moved_from=moved_from)


def gone(path: str, rev: int) -> FileEntry:
    return FileEntry(path=path, rev=rev, deleted=True, origin="a")


async def test_a_move_is_held_until_its_last_event_and_let_go_when_cut_short() -> None:
    held = HeldMoves()
    # The move's events: the new folder, its contents, the old ones' deletions, the old folder.
    assert held.take(folder("new", 10, moved_from="old"), "b") == (True, [])
    assert held.take(folder("new/sub", 11, moved_from="old/sub"), "b") == (True, [])
    assert held.take(gone("old/sub", 12), "b") == (True, [])
    assert held.ready("new") is None  # not whole yet
    # A path marked otherwise meanwhile (a local change, a rescan) waits with the move.
    assert held.keeps("old/sub/file.txt")
    assert held.keeps("new")
    assert not held.keeps("older")
    assert held.take(gone("old", 13), "b") == (True, ["new"])  # whole: its worker may go
    assert not held.keeps("new")
    move = held.ready("new")
    assert move is not None
    move.applying = True
    assert held.keeps("new")  # marked again while its worker applies the move
    assert held.take(folder("elsewhere", 14), "b") == (False, [])  # not part of it
    assert held.finish(move) == ["new", "new/sub", "old", "old/sub", "old/sub/file.txt"]
    assert held.move is None

    # A move whose events stop before its end is let go of by the next other event.
    assert held.take(folder("x", 20, moved_from="y"), "b") == (True, [])
    assert held.take(folder("x/z", 21, moved_from="y/z"), "b") == (True, [])
    assert held.take(folder("other", 22), "b") == (False, ["x", "x/z"])
    # Our own move, answered already, is not held.
    assert held.take(folder("mine", 30, moved_from="was", origin="b"), "b") == (False, [])
    # While we ask for our own, its events wait for the index to follow.
    ours, released = held.outgoing("p", "q")
    assert released == []
    assert held.take(folder("q", 40, moved_from="p", origin="b"), "b") == (True, [])
    assert held.take(gone("p", 41), "b") == (True, [])
    assert held.ready("q") is None  # nothing for a worker to apply
    assert held.finish(ours) == ["p", "q"]


async def test_a_folder_too_big_to_hold_is_not_moved_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "MAX_MOVE_CHUNKS", 2)  # 50,000 in earnest
    meta = await SQLiteMetaStore.open(tmp_path / "index.db")
    try:
        expect = {}
        for name in ("a", "b", "c"):
            chunks = (Chunk(hash_bytes(name.encode()), 1),)
            request = CommitRequest(
                f"big/{name}", 0, hash=content_hash(chunks), size=1, chunks=chunks
            )
            expect[name] = (await meta.commit(request, "a"))[0].rev
        folder = await meta.current("big")
        assert folder is not None
        expect[""] = folder.rev
        with pytest.raises(StoreError, match="too big to move as one"):
            await meta.move(MoveRequest("big", "moved", expect), "a")
        del expect["c"]  # now the server's folder is not the one expected
        with pytest.raises(Conflict):
            await meta.move(MoveRequest("big", "moved", expect), "a")
        assert await meta.current("moved") is None
        assert [e.path for e in await meta.list_current("", 10)] == [
            "big",
            "big/a",
            "big/b",
            "big/c",
        ]
    finally:
        await meta.aclose()
