"""The mass-delete guard: a deletion of most of a folder does not spread until confirmed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from trio_sync.client.guard import HELD_FILE
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
