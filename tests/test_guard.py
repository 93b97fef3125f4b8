"""The mass-delete guard: a deletion of most of a folder does not spread until confirmed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_sync.client.guard import HELD_FILE, DeleteGuard, DeletionsHeld, GuardLimits, confirm
from trio_sync.client.index import StatKey
from trio_sync.core.offload import Offload
from trio_sync.protocol.paths import STATE_DIR_NAME

from .conftest import TOKEN, ServerHandle, eventually, in_sync, tree

Start = Callable[..., Any]
FILES = 30


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fill(root: Path) -> None:
    for i in range(FILES):
        write(root / f"docs/f{i:02d}.txt", f"file {i}")


def delete(root: Path, count: int) -> None:
    for i in range(count):
        (root / f"docs/f{i:02d}.txt").unlink()


def confirm_deletes(folder: Path) -> str:
    """`trio-sync confirm-deletes DIR`, as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "trio_sync", "confirm-deletes", str(folder)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


async def test_most_of_a_folder_deleted_is_held_until_confirmed(
    start_client: Start, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    fill(a)
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)
    delete(a, 20)  # 20 of 30: more than half
    await eventually(lambda: (a / STATE_DIR_NAME / HELD_FILE).exists())
    await trio.sleep(1.5)  # deletions a guard let through would have reached b by now
    assert len(tree(b)) == FILES
    said = confirm_deletes(a)
    assert "20 of 30" in said
    await in_sync(a, b)
    assert len(tree(b)) == FILES - 20
    assert not (a / STATE_DIR_NAME / HELD_FILE).exists()


async def test_a_few_deletions_flow_as_always(start_client: Start, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    fill(a)
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)
    delete(a, 9)  # fewer than ten files: never held, whatever the share
    await in_sync(a, b)
    assert len(tree(b)) == FILES - 9


async def test_putting_the_files_back_lets_the_guard_go(
    start_client: Start, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    fill(a)
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)
    shutil.move(a / "docs", tmp_path / "aside")  # the whole folder: an unmounted disk, say
    await eventually(lambda: (a / STATE_DIR_NAME / HELD_FILE).exists())
    assert len(tree(b)) == FILES
    shutil.move(tmp_path / "aside", a / "docs")
    await eventually(lambda: not (a / STATE_DIR_NAME / HELD_FILE).exists())
    write(a / "docs/new.txt", "syncing goes on")
    await in_sync(a, b)
    assert len(tree(b)) == FILES + 1


async def test_a_folder_renamed_or_moved_inside_is_not_a_mass_delete(
    start_client: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    fill(a)
    write(a / "other.txt", "stays")
    await start_client("a")
    await start_client("b")
    await in_sync(a, b)
    (a / "docs").rename(a / "docs 2026")  # every synced file but one: deleted at its old path
    await in_sync(a, b)
    (a / "archive").mkdir()
    (a / "docs 2026").rename(a / "archive" / "docs")
    await in_sync(a, b)
    assert sorted(tree(b)) == sorted(
        ["other.txt", *(f"archive/docs/f{i:02d}.txt" for i in range(FILES))]
    )
    assert not [r for r in caplog.records if "NOT deleting" in r.getMessage()]


async def test_the_thresholds_can_be_raised(start_client: Start, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    fill(a)
    await start_client("a", max_delete_fraction=1.0)
    await start_client("b")
    await in_sync(a, b)
    delete(a, FILES)
    await in_sync(a, b)
    assert tree(b) == {}


async def test_with_once_held_deletions_are_an_error_that_says_why(
    start_client: Start, tmp_path: Path, server: ServerHandle
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    fill(a)
    await start_client("b")
    client = await start_client("a")
    await in_sync(a, b)
    await client.stop()
    delete(a, 25)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    done = await trio.run_process(
        [sys.executable, "-m", "trio_sync", "client", str(a), "--server", server.url,
         "--token-file", str(token), "--name", "a", "--once"],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert b"deletions held back" in done.stderr + done.stdout
    assert len(tree(b)) == FILES


def test_confirm_deletes_on_a_folder_that_is_not_synced_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trio_sync", "confirm-deletes", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "not a synced folder" in done.stderr


async def test_a_confirmed_mass_delete_keeps_flowing_past_the_window(tmp_path: Path) -> None:
    """A confirmation covers a deletion that takes longer than the guard's window to send."""
    root, state = tmp_path / "root", tmp_path / "root" / STATE_DIR_NAME
    state.mkdir(parents=True)
    names = [f"f{i:02d}" for i in range(30)]
    async with Offload(1).running() as offload:
        synced = dict.fromkeys(names, StatKey(1, 0, 0, False))
        guard = DeleteGuard(root, state, lambda: synced, offload, GuardLimits(window=0.3))
        with pytest.raises(DeletionsHeld):
            await guard.allow(names[0])  # none of them exist: all 30 are gone
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guard.watch, _ignore)
            confirm(state)
            with trio.fail_after(5):
                while guard.reason is not None:  # noqa: ASYNC110 - the guard's own poll
                    await trio.sleep(0.05)
            for name in names:  # 1.5 s in all, five windows
                await guard.allow(name)
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert guard.reason is None


async def _ignore(paths: set[str]) -> None:
    pass


async def test_a_new_run_drops_the_record_of_an_earlier_hold(tmp_path: Path) -> None:
    """Files put back while no client ran: `status` must not go on saying deletions are held."""
    state = tmp_path / STATE_DIR_NAME
    state.mkdir()
    (state / HELD_FILE).write_text('{"reason": "from an earlier run"}')
    async with Offload(1).running() as offload:
        DeleteGuard(tmp_path, state, dict, offload, GuardLimits())
    assert not (state / HELD_FILE).exists()
