"""End to end, in process: a real Hypercorn server on loopback and real clients on temp folders."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_sync.client.early import EARLY_MIN_SIZE
from trio_sync.client.engine import Engine
from trio_sync.errors import AuthenticationFailed, FolderInUse, ProtocolError
from trio_sync.protocol.paths import STATE_DIR_NAME

from .conftest import (
    ServerHandle,
    eventually,
    in_sync,
    messages,
    open_fds_to,
    requests_between,
    traffic,
    tree,
    write,
)

Start = Callable[..., Any]


async def test_initial_sync_goes_both_ways(start_client: Start, tmp_path: Path) -> None:
    write(tmp_path / "a/only-a.txt", "from a")
    write(tmp_path / "a/shared/same.txt", "same")
    write(tmp_path / "b/only-b/deep/file.bin", os.urandom(5000))
    write(tmp_path / "b/shared/same.txt", "same")
    await start_client("a")
    await start_client("b")
    await in_sync(tmp_path / "a", tmp_path / "b")
    assert set(tree(tmp_path / "a")) == {
        "only-a.txt",
        "shared/same.txt",
        "only-b/deep/file.bin",
    }


async def test_live_create_modify_delete_and_nested_folders(
    start_client: Start, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    await start_client("a")
    await start_client("b")

    write(a / "x/y/z/new.txt", "one")
    await eventually(lambda: (b / "x/y/z/new.txt").exists())
    assert (b / "x/y/z/new.txt").read_text() == "one"

    write(a / "x/y/z/new.txt", "two, longer")
    await eventually(lambda: (b / "x/y/z/new.txt").read_text() == "two, longer")

    write(b / "from-b.txt", "hello a")
    await eventually(lambda: (a / "from-b.txt").exists())

    (a / "x/y/z/new.txt").unlink()
    await eventually(lambda: not (b / "x/y/z/new.txt").exists())
    assert (b / "x/y/z").is_dir()  # the folder was not deleted, only the file

    shutil.rmtree(a / "x")
    await eventually(lambda: not (b / "x").exists())
    await in_sync(a, b)


async def test_empty_folders_are_created_and_deleted(start_client: Start, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "empty-at-start/inner").mkdir(parents=True)
    await start_client("a")
    await start_client("b")
    await eventually(lambda: (b / "empty-at-start/inner").is_dir())

    (b / "made-live/deeper").mkdir(parents=True)
    await eventually(lambda: (a / "made-live/deeper").is_dir())
    (a / "made-live/deeper").rmdir()
    await eventually(lambda: not (b / "made-live/deeper").exists())
    assert (b / "made-live").is_dir()


async def test_file_and_folder_with_the_same_name_keep_both(
    start_client: Start, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "thing", "a file called thing")
    write(b / "thing/inside.txt", "a folder called thing")
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)
    files = tree(a)
    assert files["thing"] == b"a file called thing"  # first to reach the server keeps the name
    copies = [p for p in files if p.startswith("thing.sync-conflict-")]
    assert len(copies) == 1
    assert copies[0].endswith("-b/inside.txt")
    assert files[copies[0]] == b"a folder called thing"


async def test_deleting_a_folder_keeps_what_another_client_added_to_it(
    start_client: Start, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "shared/old.txt", "old")
    await start_client("a")
    client_b = await start_client("b")
    await in_sync(a, b)
    await client_b.stop()

    write(b / "shared/new-from-b.txt", "added while a deleted the folder")
    shutil.rmtree(a / "shared")
    await eventually(lambda: not (a / "shared").exists())
    await trio.sleep(0.3)
    await start_client("b")
    await in_sync(a, b)
    assert tree(a) == {"shared/new-from-b.txt": b"added while a deleted the folder"}


async def test_executable_bit_and_mtime_are_carried(start_client: Start, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "run.sh", "#!/bin/sh\necho hi\n")
    (a / "run.sh").chmod(0o755)
    os.utime(a / "run.sh", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    await start_client("a")
    await start_client("b")
    await eventually(lambda: (b / "run.sh").exists())
    st = (b / "run.sh").stat()
    assert st.st_mode & 0o111
    assert st.st_mtime_ns == 1_600_000_000_000_000_000


async def test_rename_of_file_and_folder(start_client: Start, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "old.txt", "content")
    for i in range(5):
        write(a / f"folder/sub/{i}.txt", f"file {i}")
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)

    (a / "old.txt").rename(a / "new.txt")
    (a / "folder").rename(a / "moved")
    await eventually(lambda: (b / "moved/sub/4.txt").exists() and (b / "new.txt").exists())
    await in_sync(a, b)
    assert not (b / "old.txt").exists()
    assert not (b / "folder").exists()


async def test_concurrent_edits_keep_both_versions(
    start_client: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "report.txt", "original")
    client_a = await start_client("a")
    client_b = await start_client("b")
    await in_sync(a, b)
    await client_b.stop()

    write(a / "report.txt", "edited on a")
    write(b / "report.txt", "edited on b, offline")
    caplog.set_level(logging.INFO)
    await eventually(lambda: "report.txt" in messages_text(caplog, "uploaded report.txt"))
    await start_client("b")
    await in_sync(a, b)

    files = tree(a)
    assert files["report.txt"] == b"edited on a"  # the first change to reach the server wins
    copies = [p for p in files if p.startswith("report.sync-conflict-") and p.endswith("-b.txt")]
    assert len(copies) == 1
    assert files[copies[0]] == b"edited on b, offline"
    await client_a.stop()


def messages_text(caplog: pytest.LogCaptureFixture, needle: str) -> str:
    return "\n".join(m for m in messages(caplog) if needle in m)


async def test_edit_beats_delete(start_client: Start, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "keep.txt", "v1")
    await start_client("a")
    client_b = await start_client("b")
    await in_sync(a, b)
    await client_b.stop()

    (a / "keep.txt").unlink()
    write(b / "keep.txt", "v2 edited while offline")
    await trio.sleep(0.3)  # let a's delete reach the server first (any order must end the same)
    await start_client("b")
    await eventually(lambda: (a / "keep.txt").exists())
    await in_sync(a, b)
    assert (a / "keep.txt").read_text() == "v2 edited while offline"


async def test_reconnect_after_server_restart_catches_up_through_the_cursor(
    server: ServerHandle,
    start_client: Start,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "before.txt", "before")
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)

    await server.stop()
    write(a / "while-down.txt", "written while the server was down")
    await trio.sleep(0.2)
    caplog.clear()
    await server.start()

    await eventually(lambda: (b / "while-down.txt").exists())
    await in_sync(a, b)
    # b resumed from its cursor instead of listing everything again.
    reconnects = [m for m in messages(caplog) if m.startswith("b connected (from rev")]
    assert reconnects
    assert not reconnects[0].endswith("(from rev 0)")
    assert not any(m.startswith("server has") for m in messages(caplog))


async def test_client_restart_does_not_transfer_again(
    start_client: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(20):
        write(a / f"f{i}.txt", f"file {i}")
    client_a = await start_client("a")
    client_b = await start_client("b")
    await in_sync(a, b)
    await client_a.stop()
    await client_b.stop()

    caplog.set_level(logging.INFO)
    caplog.clear()
    await start_client("a")
    await start_client("b")
    transfers = [m for m in messages(caplog) if m.startswith(("uploaded", "downloaded"))]
    assert transfers == []
    assert tree(a) == tree(b)


async def test_a_restarted_client_looks_at_unchanged_files_together_and_finds_the_changed(
    start_client: Start, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    an_hour_ago = time.time_ns() - 3600 * 10**9
    for i in range(300):
        write(a / f"d{i % 10}/f{i}.txt", f"file {i:03}")
        os.utime(a / f"d{i % 10}/f{i}.txt", ns=(an_hour_ago, an_hour_ago))  # not racy
    client_a = await start_client("a")
    await start_client("b")
    await in_sync(a, b)
    await client_a.stop()
    # While A is stopped: an edit that keeps the size (only the stat's mtime tells), a file
    # replaced by a symlink, one deleted.
    write(a / "d0/f0.txt", "FILE 000")
    os.utime(a / "d0/f0.txt", ns=(an_hour_ago, an_hour_ago + 10**9))
    (a / "d1/f1.txt").unlink()
    (a / "d1/f1.txt").symlink_to(a / "d2/f2.txt")
    (a / "d3/f3.txt").unlink()

    restarted = await start_client("a")
    # Its first reconcile looked at 300 paths; the 297 unchanged shared their thread calls.
    assert restarted.engine.blocking_calls < 50
    await eventually(lambda: (b / "d0/f0.txt").read_bytes() == b"FILE 000")
    await eventually(lambda: not (b / "d3/f3.txt").exists())
    assert (b / "d1/f1.txt").read_bytes() == b"file 001"  # a symlink is not synced
    assert len(tree(b)) == 299


async def test_a_file_touched_or_rewritten_unchanged_is_remembered_with_its_new_stat(
    start_client: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    an_hour_ago = time.time_ns() - 3600 * 10**9
    write(a / "same.txt", "same bytes")
    os.utime(a / "same.txt", ns=(an_hour_ago, an_hour_ago))
    client = await start_client("a")
    await start_client("b")
    await eventually(lambda: (b / "same.txt").exists())
    # Touched, then written again with the same bytes: the content is the base's both times.
    touched = an_hour_ago + 10**9
    os.utime(a / "same.txt", ns=(touched, touched))
    await eventually(lambda: client.engine.index.get("same.txt").mtime_ns == touched)
    entry = client.engine.index.get("same.txt")
    assert not entry.racy
    assert entry.rev == 1
    write(a / "same.txt", "same bytes")
    now = (a / "same.txt").stat().st_mtime_ns
    await eventually(lambda: client.engine.index.get("same.txt").mtime_ns == now)
    await client.stop()
    caplog.set_level(logging.INFO)
    caplog.clear()
    await start_client("a")
    assert not [m for m in messages(caplog) if m.startswith("uploaded")]
    assert (b / "same.txt").read_text() == "same bytes"


async def test_state_folder_and_temp_files_never_leave_the_client(
    server: ServerHandle, start_client: Start, tmp_path: Path
) -> None:
    a = tmp_path / "a"
    write(a / "real.txt", "x")
    client = await start_client("a")
    await eventually(lambda: len(client.engine.remote_state or {}) == 1)
    assert set((client.engine.remote_state or {}).keys()) == {"real.txt"}
    assert (a / ".trio-sync/state.db").exists()


async def test_symlinks_are_skipped_and_never_followed(
    start_client: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    outside = tmp_path / "outside"
    write(outside / "secret.txt", "do not sync")
    a.mkdir()
    (a / "link-to-file").symlink_to(outside / "secret.txt")
    (a / "link-to-dir").symlink_to(outside)
    write(a / "normal.txt", "ok")
    caplog.set_level(logging.WARNING)
    await start_client("a")
    b_client = await start_client("b")
    await eventually(lambda: (b / "normal.txt").exists())
    assert set(tree(b)) == {"normal.txt"}
    assert any("symlinks are not synced" in m for m in messages(caplog))

    # b has a symlinked folder where a has a real one: b must not write through the link.
    (b / "docs").symlink_to(outside)
    await trio.sleep(0.1)
    write(a / "docs/readme.txt", "for docs")
    await eventually(
        lambda: any("parent folder 'docs' is a symlink" in m for m in messages(caplog))
    )
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    await b_client.stop()


async def test_server_replaced_loses_nothing(
    nursery: trio.Nursery,
    server: ServerHandle,
    start_client: Start,
    tmp_path: Path,
) -> None:
    a = tmp_path / "a"
    write(a / "precious.txt", "keep me")
    client = await start_client("a")
    await eventually(lambda: "precious.txt" in (client.engine.remote_state or {}))
    await client.stop()

    # A new, empty server at the same address (its data dir was wiped).
    await server.stop()
    fresh = ServerHandle(tmp_path / "fresh-server", nursery, port=server.port)
    await fresh.start()
    client = await start_client("a")
    assert (a / "precious.txt").read_text() == "keep me"
    assert "precious.txt" in (client.engine.remote_state or {})
    await client.stop()
    await fresh.stop()
    await server.start()  # so the fixture can stop it


async def test_a_second_client_on_the_same_folder_is_refused(
    start_client: Start, client_config: Callable[..., Any], tmp_path: Path
) -> None:
    await start_client("a")
    with pytest.raises(FolderInUse, match="already syncing"):
        await Engine(client_config("a")).sync_once()
    assert (tmp_path / "a/.trio-sync/tmp").is_dir()  # the refused one removed nothing


async def test_rejected_token_is_fatal_not_a_retry_loop(
    client_config: Callable[..., Any],
) -> None:
    engine = Engine(client_config("a", token="wrong"))
    with trio.fail_after(5), pytest.raises(AuthenticationFailed):
        await engine.run()


async def test_ignore_rules_apply_both_ways_and_follow_the_rules_file(
    start_client: Start, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / ".trio-syncignore", "*.log\nbuild/\n")
    write(a / "app.log", "noise from a")
    write(a / "build/out.o", "object")
    write(a / "src.txt", "source")
    client_a = await start_client("a")
    await start_client("b")
    await eventually(lambda: (b / "src.txt").exists() and (b / ".trio-syncignore").exists())
    write(b / "debug.log", "noise from b")
    write(b / "b.txt", "from b")
    await eventually(lambda: (a / "b.txt").exists())
    assert set((client_a.engine.remote_state or {}).keys()) == {
        ".trio-syncignore",
        "src.txt",
        "b.txt",
    }
    assert not (b / "app.log").exists()
    assert not (b / "build").exists()
    assert not (a / "debug.log").exists()

    write(b / ".trio-syncignore", "build/\n")  # logs are no longer ignored, anywhere
    await eventually(lambda: (b / "app.log").exists() and (a / "debug.log").exists())
    assert not (b / "build").exists()


async def test_names_that_differ_only_in_normalisation_are_both_kept(
    start_client: Start, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    nfc, nfd = "caf\u00e9.txt", "cafe\u0301.txt"
    write(a / nfc, "composed")
    write(a / nfd, "decomposed")
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)
    files = tree(b)
    assert files[nfc] == b"composed"
    copies = [p for p in files if p.startswith("caf\u00e9.sync-conflict-")]
    assert [files[c] for c in copies] == [b"decomposed"]

    write(a / "na\u0308me.txt", "made live")  # decomposed, written while watching
    await eventually(lambda: (b / "n\u00e4me.txt").exists())
    assert not (a / "na\u0308me.txt").exists()


async def test_moves_and_copies_reuse_local_content_instead_of_downloading(
    start_client: Start, server: ServerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(5):
        write(a / f"album/photo{i}.jpg", os.urandom(20_000))
    write(a / "doc.txt", "document")
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)

    caplog.set_level(logging.INFO)
    caplog.clear()
    before = await traffic(server)
    (a / "album-2026").mkdir()
    for photo in (a / "album").iterdir():  # file by file (a folder's move is one: test_moves)
        photo.rename(a / "album-2026" / photo.name)
    shutil.copy(a / "doc.txt", a / "doc copy.txt")
    await in_sync(a, b)
    # The log line follows the rename that made the trees equal.
    await eventually(lambda: len([m for m in messages(caplog) if m.startswith("placed")]) == 6)
    after = await traffic(server)
    assert requests_between(before, after, "POST /chunks/fetch") == 0  # nothing fetched again
    assert requests_between(before, after, "POST /chunks") == 0  # nor sent


async def test_a_file_still_being_written_is_uploaded_once(
    start_client: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    await start_client("a", settle_seconds=0.8)
    await start_client("b")
    caplog.set_level(logging.INFO)
    with open(a / "growing.bin", "wb") as f:  # noqa: ASYNC230 - a writer that pauses
        for _ in range(5):
            f.write(os.urandom(10_000))
            f.flush()
            await trio.sleep(0.1)
    await eventually(lambda: (b / "growing.bin").exists())
    await in_sync(a, b)
    uploads = [m for m in messages(caplog) if m.startswith("uploaded growing.bin")]
    assert len(uploads) == 1


async def test_a_big_file_still_being_written_is_read_once_until_it_rests(
    start_client: Start, tmp_path: Path
) -> None:
    # The first look hashes it (a single edit is then hashed while it rests); reading it again
    # at each later look would be wasted while it is still being written, and for a big file
    # that keeps growing (a log, a download) each look would read all of it again.
    a, b = tmp_path / "a", tmp_path / "b"
    await start_client("a", settle_seconds=1.0)
    await start_client("b")
    growing = a / "growing.bin"
    reads = 0
    reading = False
    with open(growing, "wb") as f:  # noqa: ASYNC230 - a writer that pauses
        f.write(os.urandom(EARLY_MIN_SIZE))
        for _ in range(30):
            f.write(os.urandom(100_000))
            f.flush()
            for _ in range(50):
                now_reading = bool(open_fds_to(growing, read_only=True))
                reads += now_reading and not reading
                reading = now_reading
                await trio.sleep(0.002)
    assert reads <= 1
    await in_sync(a, b, timeout=30)


async def test_a_big_file_that_never_rests_is_uploaded_now_and_then(
    start_client: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    await start_client("a", settle_seconds=0.8, settle_max_seconds=1.0)
    await start_client("b")
    caplog.set_level(logging.INFO)
    growing = a / "growing.bin"
    written = os.urandom(EARLY_MIN_SIZE)
    states = {len(written)}  # the sizes the file had, each a prefix of what was written
    seen_in_b: set[bytes] = set()
    with open(growing, "wb") as f:  # noqa: ASYNC230 - a writer that never pauses for long
        f.write(written)
        for _ in range(35):
            more = os.urandom(100_000)
            f.write(more)
            f.flush()
            written += more
            states.add(len(written))
            await trio.sleep(0.1)
            with suppress(FileNotFoundError):
                seen_in_b.add((b / "growing.bin").read_bytes())
    uploads = [m for m in messages(caplog) if m.startswith("uploaded growing.bin")]
    await in_sync(a, b, timeout=30)
    assert seen_in_b, "nothing arrived while the file was written"
    # What arrived while it was written is a state the file really had, never a mix.
    for content in seen_in_b:
        assert len(content) in states
        assert content == written[: len(content)]
    # About once a second (settle_max_seconds) while it was written, not at every look.
    assert 1 <= len(uploads) <= 5


async def test_a_closed_file_goes_at_once_and_one_still_open_waits(
    start_client: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # With a settle time of a minute, only the kernel's word that the writer is done (a close
    # after writing, a rename into place) can send a file within this test's timeouts.
    a, b = tmp_path / "a", tmp_path / "b"
    await start_client("a", settle_seconds=60, settle_max_seconds=120)
    await start_client("b")
    caplog.set_level(logging.INFO)

    with open(a / "download.part", "wb") as f:  # noqa: ASYNC230 - a writer that stays
        for i in range(50):  # five seconds of writing in small pieces, then a pause
            f.write(b"%d," % i)
            f.flush()
            await trio.sleep(0.1)
            assert not (b / "download.part").exists()  # still open: not sent
        await trio.sleep(0.5)
        assert not (b / "download.part").exists()
    await eventually(lambda: tree(b).get("download.part", b"").endswith(b"49,"))
    assert [m for m in messages(caplog) if m.startswith("uploaded download.part")] == [
        "uploaded download.part (new local file, 140 bytes)"
    ]  # once, with its final content

    write(a / "notes.md", "v1")  # written whole and closed
    await eventually(lambda: (b / "notes.md").exists())
    write(a / ".notes.md.tmp", "v2, saved by an editor")
    os.rename(a / ".notes.md.tmp", a / "notes.md")
    await in_sync(a, b)
    with open(a / "notes.md", "r+b") as f:  # noqa: ASYNC230 - overwritten in place
        f.write(b"V3")
    await in_sync(a, b)
    assert (b / "notes.md").read_bytes() == b"V3, saved by an editor"
    # The save by rename was one change in B, not a deletion and a new file.
    assert not [m for m in messages(caplog) if m.startswith("deleted")]


async def test_editor_saves_and_bulk_creation_make_one_change_each(
    start_client: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "notes.md", "v1")
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)
    caplog.set_level(logging.INFO)
    caplog.clear()

    # An editor's save: write a temp file, then rename it over the original.
    write(a / ".notes.md.swp", "v2")
    os.rename(a / ".notes.md.swp", a / "notes.md")
    # `tar x`: many files at once.
    for i in range(200):
        write(a / f"unpacked/dir{i % 10}/file{i}", f"content {i}")
    await in_sync(a, b)

    def uploads() -> list[str]:
        return [m.split()[1] for m in messages(caplog) if m.startswith("uploaded")]

    await eventually(lambda: len(uploads()) >= 201)
    await trio.sleep(0.2)  # anything more would be a repeat
    assert sorted(uploads()) == sorted(
        ["notes.md", *(f"unpacked/dir{i % 10}/file{i}" for i in range(200))]
    )
    assert (b / "notes.md").read_text() == "v2"


async def test_a_server_speaking_garbage_is_retried_not_a_crash(
    nursery: trio.Nursery, client_config: Callable[..., Any]
) -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        with suppress(trio.BrokenResourceError):
            await stream.receive_some(65536)
            body = b"this is not JSON"
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, garbage, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    config = client_config("g", server_url=f"http://127.0.0.1:{port}")

    with pytest.raises(ProtocolError, match="invalid JSON"):
        await Engine(config).sync_once()
    with trio.move_on_after(1) as still_running:
        await Engine(config).run()  # logs and retries; must not raise
    assert still_running.cancelled_caught


async def test_a_client_cancelled_while_starting_releases_its_folder(
    client_config: Callable[..., Any],
) -> None:
    """Found by the soak: cancellation right after taking the folder lock leaked it."""
    for i in range(60):  # cancel at many moments of start-up, the lock's one among them
        with trio.move_on_after(i * 0.0001):
            await Engine(client_config("a")).run()
    assert await Engine(client_config("a")).sync_once() == []


async def test_a_failing_state_database_pauses_the_path_not_the_client(
    start_client: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Review M9: an index write that failed (`database or disk is full`) ended the client with
    a traceback. A write that cannot get the database (a real sqlite error, like a full disk)
    now pauses that path; the client runs on and finishes once the database is back."""
    a, b = await start_client("a"), await start_client("b")
    blocker = sqlite3.connect(a.root / STATE_DIR_NAME / "state.db", timeout=0)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        (a.root / "f.txt").write_bytes(b"written while the database is locked")
        await eventually(
            lambda: "cannot write the state database" in messages_text(caplog, "f.txt"),
            timeout=20,
        )
    finally:
        blocker.rollback()
        blocker.close()
    await in_sync(a.root, b.root, timeout=20)
    assert (b.root / "f.txt").read_bytes() == b"written while the database is locked"
    assert not a.done.is_set()
    await eventually(lambda: a.engine.index.get("f.txt") is not None)
