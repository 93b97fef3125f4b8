"""See and undo: saved settings, `trio-sync history`, `trio-sync restore`, through the installed
CLI against a real server, with real clients receiving what a restore brings back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_sync.cli import _describe as describe
from trio_sync.client import status
from trio_sync.client.settings import SETTINGS_FILE, TOKEN_FILE, Saved, save
from trio_sync.history import parse_when
from trio_sync.protocol.paths import STATE_DIR_NAME

from .conftest import TOKEN, ServerHandle, eventually, in_sync, tree

Start = Callable[..., Any]


async def cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = await trio.run_process(
        [sys.executable, "-m", "trio_sync", *map(str, args)],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, (done.stdout + done.stderr).decode()
    return done


async def history(path: Path) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads((await cli("history", path, "--json")).stdout)
    return answer


async def first_run(folder: Path, server: ServerHandle, tmp_path: Path) -> None:
    """What a user does once: `trio-sync client DIR --server URL --token-file FILE`."""
    token = tmp_path / "token-file"
    token.write_text(TOKEN)
    await cli("client", folder, "--server", server.url, "--token-file", token, "--name",
              folder.name, "--once")  # fmt: skip


async def live_pair(start_client: Start, server: ServerHandle, tmp_path: Path) -> tuple[Path, Path]:
    """Folders a and b with live clients; a's settings saved as a user's first run saves them,
    so that the commands find its server."""
    a, b = tmp_path / "a", tmp_path / "b"
    await first_run(a, server, tmp_path)
    await start_client("a")
    await start_client("b")
    return a, b


async def test_the_first_run_is_remembered_and_the_token_kept_private(
    server: ServerHandle, tmp_path: Path
) -> None:
    a = tmp_path / "a"
    await first_run(a, server, tmp_path)
    state = a / STATE_DIR_NAME
    assert (state / TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    assert TOKEN not in (state / SETTINGS_FILE).read_text()
    (a / "later.txt").write_text("sent by a run with no options")
    done = await cli("client", a, "--once")  # the server, the token, the name: all saved
    assert TOKEN not in (done.stdout + done.stderr).decode()
    b = tmp_path / "b"
    await first_run(b, server, tmp_path)
    assert (b / "later.txt").read_text() == "sent by a run with no options"
    none = await cli("client", tmp_path / "never-synced", "--once", check=False)
    assert none.returncode == 2
    assert b"no --server given" in none.stderr


async def test_history_shows_each_version_and_restore_brings_one_back(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = await live_pair(start_client, server, tmp_path)
    note = a / "notes" / "plan.txt"
    note.parent.mkdir()
    for text in ("first draft", "second draft"):
        note.write_text(text)
        await eventually(lambda t=text: (b / "notes/plan.txt").exists()  # type: ignore[misc]
                         and (b / "notes/plan.txt").read_text() == t)  # fmt: skip
    note.unlink()
    await eventually(lambda: not (b / "notes/plan.txt").exists())

    shown = json.loads((await cli("history", note, "--json")).stdout)
    versions = shown["versions"]
    assert [v.get("deleted", False) for v in versions] == [True, False, False]
    assert versions[-1]["origin"] == "a"
    listing = (await cli("history", note)).stdout.decode()
    for what in ("deleted", "changed", "created"):
        assert what in listing
    folder = (await cli("history", a / "notes")).stdout.decode()
    assert "notes/plan.txt" in folder  # a folder's history names what was deleted below it

    first = versions[-1]["rev"]
    await cli("restore", note, "--rev", str(first))
    await eventually(lambda: (b / "notes/plan.txt").exists())
    assert (b / "notes/plan.txt").read_text() == "first draft"
    await in_sync(a, b)
    await cli("restore", note, "--rev", str(versions[-2]["rev"]), "--to", a / "notes/second.txt")
    await eventually(lambda: (b / "notes/second.txt").exists())
    assert (b / "notes/second.txt").read_text() == "second draft"
    gone = await cli("restore", note, "--rev", str(versions[0]["rev"]), check=False)
    assert gone.returncode != 0  # a deletion is not a version to bring back


async def test_history_names_both_ends_of_a_rename(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = await live_pair(start_client, server, tmp_path)
    (a / "draft.txt").write_text("the report")
    (a / "other.txt").write_text("deleted for good")
    await in_sync(a, b)
    (a / "archive").mkdir()
    (a / "draft.txt").rename(a / "archive" / "report.txt")
    (a / "other.txt").unlink()
    await in_sync(a, b)

    old = json.loads((await cli("history", a / "draft.txt", "--json")).stdout)["versions"]
    assert old[0]["renamed_to"] == "archive/report.txt"
    new = json.loads((await cli("history", a / "archive/report.txt", "--json")).stdout)
    assert new["versions"][0]["renamed_from"] == "draft.txt"
    assert (
        "renamed from draft.txt" in (await cli("history", a / "archive/report.txt")).stdout.decode()
    )
    gone = json.loads((await cli("history", a / "other.txt", "--json")).stdout)["versions"]
    assert "renamed_to" not in gone[0]  # a deletion alone is a deletion
    folder = (await cli("history", a)).stdout.decode()
    assert "draft.txt (renamed to archive/report.txt)" in folder
    assert re.search(r"  other\.txt$", folder, re.MULTILINE)


async def test_a_mass_delete_is_undone_in_one_command(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(2000):
        path = a / f"d{i // 100:02d}" / f"f{i:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {i}")
    await first_run(a, server, tmp_path)
    await start_client("a", max_delete_fraction=1.0, max_delete_files=10**6)
    await start_client("b")
    await in_sync(a, b, timeout=60)
    before = tree(b)
    assert len(before) == 2000
    await trio.sleep(1.1)  # versions are timed to the second in what a user types
    moment = time.strftime("%Y-%m-%dT%H:%M:%S")
    await trio.sleep(1.1)
    for folder in a.iterdir():
        if folder.name != STATE_DIR_NAME:
            for path in folder.iterdir():
                path.unlink()
    await eventually(lambda: len(tree(b)) == 0, timeout=60)
    done = await cli("restore", a, "--before", moment)
    assert b"2000 restored" in done.stdout
    await eventually(lambda: len(tree(a)) == len(tree(b)) == 2000, timeout=60)
    await in_sync(a, b, timeout=60)
    assert tree(b) == before
    assert tree(a) == before


def test_times_are_iso_8601_local_or_with_an_offset_or_ages() -> None:
    now = 1_800_000_000.0
    assert parse_when("90m", now) == now - 5400
    assert parse_when("2h", now) == now - 7200
    assert parse_when("3d", now) == now - 3 * 86400
    utc = 1796119200.0  # 2026-12-01 10:00 UTC
    assert parse_when("2026-12-01T10:00:00+00:00") == utc
    assert parse_when("2026-12-01T10:00+01:00") == utc - 3600
    local = time.mktime((2026, 12, 1, 10, 0, 0, 0, 0, -1))
    assert parse_when("2026-12-01T10:00") == local
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday")


async def test_a_path_outside_any_synced_folder_is_a_clear_error(tmp_path: Path) -> None:
    done = await cli("history", tmp_path / "nothing", check=False)
    assert done.returncode == 2
    assert b"not inside a synced folder" in done.stderr


async def test_version_and_help_say_what_trio_sync_is() -> None:
    version = (await cli("--version")).stdout.decode()
    assert version.startswith("trio-sync ")
    assert version.split()[1][0].isdigit()
    helptext = (await cli("--help")).stdout.decode()
    assert "Keep folders on several machines identical" in helptext
    for command in ("server", "token", "client", "history", "restore", "status", "conflicts",
                    "confirm-deletes"):  # fmt: skip
        assert f"    {command}" in helptext


async def test_status_asks_the_running_client_and_says_what_holds_it(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(30):
        (a / "docs").mkdir(parents=True, exist_ok=True)
        (a / "docs" / f"f{i:02d}.txt").write_text(f"file {i}")
    (a / ".trio-syncignore").write_text("build/\n")
    (a / "build").mkdir()
    (a / "build" / "out.o").write_text("not synced")
    await first_run(a, server, tmp_path)
    client = await start_client("a")
    await start_client("b")
    await eventually(lambda: (b / "docs/f29.txt").exists())
    assert not (b / "build").exists()
    report = await client.engine.status()
    with trio.fail_after(15):
        while not report["in_sync"]:
            await trio.sleep(0.05)
            report = await client.engine.status()
    report = json.loads((await cli("status", a, "--json")).stdout)
    assert report["running"] is True
    assert report["connected"] is True
    assert report["in_sync"] is True
    assert report["ignored"] == {"count": 1, "examples": ["build"]}
    shown = (await cli("status", a / "docs")).stdout.decode()  # from inside DIR
    assert "in sync" in shown
    assert "ignored by .trio-syncignore: 1 (such as build)" in shown
    for i in range(20):
        (a / "docs" / f"f{i:02d}.txt").unlink()
    await eventually(lambda: (a / STATE_DIR_NAME / "held-deletes.json").exists())
    held = await cli("status", a, check=False)
    assert held.returncode == 1
    assert b"DELETIONS HELD BACK" in held.stdout
    await client.stop()
    stopped = await cli("status", a, check=False)
    assert stopped.returncode == 1
    assert b"no client is running" in stopped.stdout
    assert b"DELETIONS HELD BACK" in stopped.stdout  # what the client recorded


async def test_conflicts_lists_each_copy_with_its_original_and_client(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "plan.txt").parent.mkdir(parents=True)
    (a / "plan.txt").write_text("shared")
    await first_run(b, server, tmp_path)
    await start_client("a")
    client_b = await start_client("b")
    await in_sync(a, b)
    await client_b.stop()
    (a / "plan.txt").write_text("a's edit")
    (b / "plan.txt").write_text("b's edit, made offline")
    with trio.fail_after(15):  # a's edit reaches the server first
        while len((await history(b / "plan.txt"))["versions"]) < 2:  # noqa: ASYNC110
            await trio.sleep(0.1)
    await start_client("b")
    await in_sync(a, b)
    found = json.loads((await cli("conflicts", b, "--json", check=False)).stdout)
    assert len(found) == 1
    assert found[0]["original"] == "plan.txt"
    assert found[0]["client"] == "b"
    listed = await cli("conflicts", b, check=False)
    assert listed.returncode == 1
    assert b"a copy of plan.txt" in listed.stdout
    await cli("conflicts", b, "--resolve", found[0]["path"], "--keep", "mine")
    await eventually(lambda: (a / "plan.txt").read_text() == "b's edit, made offline")
    await in_sync(a, b)
    assert sorted(tree(a)) == ["plan.txt"]


async def test_a_conflict_resolved_as_both_or_theirs(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    (folder / STATE_DIR_NAME).mkdir(parents=True)
    save(folder / STATE_DIR_NAME, Saved("http://127.0.0.1:9", "me"), TOKEN)
    (folder / "a.txt").write_text("theirs")
    (folder / "a.sync-conflict-20261202-101500-laptop.txt").write_text("mine")
    (folder / "b.sync-conflict-20261202-101500-laptop.txt").write_text("mine too")
    (folder / "b.txt").write_text("theirs too")
    await cli("conflicts", folder, "--resolve", "a.sync-conflict-20261202-101500-laptop.txt",
              "--keep", "both")  # fmt: skip
    await cli("conflicts", folder, "--resolve", "b.sync-conflict-20261202-101500-laptop.txt",
              "--keep", "theirs")  # fmt: skip
    assert tree(folder) == {
        "a.txt": b"theirs",
        "a (from laptop).txt": b"mine",
        "b.txt": b"theirs too",
    }
    wrong = await cli("conflicts", folder, "--resolve", "a.txt", "--keep", "mine", check=False)
    assert wrong.returncode == 2
    assert b"not a conflict copy" in wrong.stderr


async def test_status_reaches_a_client_however_deep_its_folder_is(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    deep = tmp_path / ("d" * 100) / ("e" * 100) / "a"  # a socket address holds 108 bytes
    await first_run(deep, server, tmp_path)
    await start_client("a", root=deep)
    report = json.loads((await cli("status", deep, "--json")).stdout)
    assert report["running"] is True


async def test_status_says_what_is_moving_and_what_waits_to_go_up_and_down(
    start_client: Start, server: ServerHandle, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    big = 96 * 1024 * 1024
    (a / "a-big.bin").write_bytes(os.urandom(big))
    for i in range(40):
        (a / f"small-{i:02d}.txt").write_text(f"small {i}" * 100)
    small = sum(len(f"small {i}" * 100) for i in range(40))

    async def while_moving(folder: Path) -> dict[str, Any]:
        seen: dict[str, Any] | None = None
        with trio.fail_after(30):
            while seen is None or not seen.get("transfers"):
                seen = await trio.to_thread.run_sync(status.ask, folder)
                await trio.sleep(0.01)
        assert seen["in_sync"] is False
        (moving,) = seen["transfers"]
        assert moving["path"] == "a-big.bin"
        assert moving["total"] == big
        assert 0 <= moving["done"] <= moving["total"]
        return seen

    # One worker: the big file comes first, the small ones wait behind it.
    client_a = await start_client("a", wait=False, workers=1)
    seen = await while_moving(a)
    assert seen["transfers"][0]["direction"] == "up"
    assert seen["waiting_up"] == {"files": 40, "bytes": small}
    assert "40 files (30.3 KiB) to go up" in describe(a, seen)
    with trio.fail_after(30):
        while not (await client_a.engine.status())["in_sync"]:  # noqa: ASYNC110 - polled
            await trio.sleep(0.05)

    await start_client("b", wait=False, workers=1)
    seen = await while_moving(b)
    assert seen["transfers"][0]["direction"] == "down"
    assert seen["waiting_down"] == {"files": 40, "bytes": small}
    shown = describe(b, seen)
    assert "40 (30.3 KiB) to come down" in shown
    assert "↓ a-big.bin: " in shown
    await in_sync(a, b, timeout=60)
