"""The watcher: one inotify watch per real folder, never through a symlink (review L6)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from trio_sync.client.watcher import Changes, watch


def inotify_watches() -> int:
    """How many inotify watches this process holds, as the kernel reports them."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                count += sum(line.startswith("inotify wd:") for line in info)
        except OSError:
            continue
    return count


class Seen:
    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.folders: set[str] = set()
        self.batches: list[Changes] = []
        self.overflows = 0
        self._changed = trio.Event()

    async def on_change(self, changes: Changes) -> None:
        assert changes.folders <= changes.paths
        assert changes.finished <= changes.paths - changes.folders
        self.paths |= changes.paths
        self.folders |= changes.folders
        self.batches.append(changes)
        self._changed.set()

    async def on_overflow(self) -> None:
        self.overflows += 1
        self._changed.set()

    async def until(self, path: str) -> None:
        with trio.fail_after(5):
            while path not in self.paths:
                self._changed = trio.Event()
                await self._changed.wait()

    async def until_overflow(self) -> None:
        with trio.fail_after(5):
            while not self.overflows:
                self._changed = trio.Event()
                await self._changed.wait()

    async def quiet(self) -> None:
        """Wait until a batch that was coming would have come."""
        await trio.sleep(0.5)


@asynccontextmanager
async def watching(root: Path) -> AsyncIterator[Seen]:
    seen = Seen()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: watch(
                root,
                seen.on_change,
                on_overflow=seen.on_overflow,
                debounce_ms=50,
                task_status=task_status,
            )
        )
        yield seen
        nursery.cancel_scope.cancel()


async def test_a_symlinked_folder_is_neither_watched_nor_reported(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    for i in range(30):
        (outside / f"d{i}").mkdir(parents=True)
    (root / "link").symlink_to(outside)
    before = inotify_watches()
    async with watching(root) as seen:
        assert inotify_watches() - before == 3  # the root, a, a/b; nothing behind the link
        (outside / "d7" / "secret").write_text("x")
        (root / "a" / "b" / "f").write_text("x")
        await seen.until("a/b/f")
        await seen.quiet()
        assert not any(p.startswith("link/") for p in seen.paths), seen.paths
    assert inotify_watches() == before  # everything is released on the way out


async def test_a_new_tree_is_reported_by_its_top_and_then_watched(tmp_path: Path) -> None:
    async with watching(tmp_path) as seen:
        (tmp_path / "x" / "y" / "z").mkdir(parents=True)
        (tmp_path / "x" / "y" / "z" / "early").write_text("x")
        await seen.until("x")  # the caller walks it: what came before the watch is found so
        assert "x" in seen.folders
        await seen.quiet()
        (tmp_path / "x" / "y" / "z" / "late").write_text("x")
        await seen.until("x/y/z/late")


async def test_a_folder_moved_inside_is_followed_under_its_new_name(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    async with watching(tmp_path) as seen:
        (tmp_path / "a").rename(tmp_path / "c")
        await seen.until("c")
        assert "a" in seen.paths
        # The two ends are paired: the client can send the rename as one.
        assert [m for batch in seen.batches for m in batch.moves] == [("a", "c")]
        await seen.quiet()
        seen.paths.clear()
        (tmp_path / "c" / "b" / "new").write_text("x")
        await seen.until("c/b/new")
        await seen.quiet()
        assert not any(p.startswith("a/") for p in seen.paths), seen.paths


async def test_a_folder_moved_out_is_no_longer_watched(tmp_path: Path) -> None:
    root, away = tmp_path / "root", tmp_path / "away"
    (root / "a" / "b").mkdir(parents=True)
    before = inotify_watches()
    async with watching(root) as seen:
        (root / "a").rename(away)
        (root / "file").write_text("x")
        (root / "file").rename(root / "renamed")
        await seen.until("a")
        await seen.until("renamed")
        await seen.quiet()
        # Moved out (no other end) and a file's rename: neither is a folder's move.
        assert not [m for batch in seen.batches for m in batch.moves]
        assert inotify_watches() - before == 1
        (away / "b" / "f").write_text("x")
        (root / "g").write_text("x")
        await seen.until("g")
        await seen.quiet()
        assert not any(p.startswith("a/") for p in seen.paths), seen.paths


async def test_the_state_folder_is_not_reported_in_any_case(tmp_path: Path) -> None:
    (tmp_path / ".trio-sync").mkdir()
    async with watching(tmp_path) as seen:
        (tmp_path / ".trio-sync" / "index.db").write_text("x")
        (tmp_path / ".TRIO-SYNC").mkdir(exist_ok=True)  # the same folder on vfat or casefold
        (tmp_path / "visible").write_text("x")
        await seen.until("visible")
        await seen.quiet()
        assert seen.paths == {"visible"}


async def test_events_the_kernel_dropped_ask_for_a_full_rescan(tmp_path: Path) -> None:
    queue = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())  # noqa: ASYNC240
    async with watching(tmp_path) as seen:
        # No checkpoint in this loop: the watcher cannot read, the kernel's queue overflows.
        for i in range(queue // 2 + 10):
            fd = os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_WRONLY)
            os.close(fd)
        await seen.until_overflow()


def test_a_wide_tree_is_watched_with_few_descriptors(tmp_path: Path) -> None:
    """Watching 2,000 sibling folders under a limit of 256 open files."""
    for i in range(2000):
        (tmp_path / "wide" / f"d{i}").mkdir(parents=True)
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from trio_sync.client.watcher import _Inotify, _watch_tree\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
        "inotify = _Inotify()\n"
        "_watch_tree(inotify, Path(sys.argv[1]), '')\n"
        "print(len(inotify.folders))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2002"]  # the root, wide, and its 2,000 folders


async def test_a_file_is_finished_once_closed_after_writing_or_renamed_into_place(
    tmp_path: Path,
) -> None:
    async with watching(tmp_path) as seen:
        with open(tmp_path / "open.log", "wb") as f:  # noqa: ASYNC230 - a writer that stays
            f.write(b"first")
            f.flush()
            await seen.until("open.log")
            await seen.quiet()
            assert not any("open.log" in b.finished for b in seen.batches)  # still open
            seen.paths.clear()
            f.write(b"second")
        await seen.until("open.log")
        assert "open.log" in seen.batches[-1].finished  # the close after the write

        # An editor's save: the target is finished by the rename, the temp file is gone.
        (tmp_path / ".doc.swp").write_bytes(b"v2")
        os.rename(tmp_path / ".doc.swp", tmp_path / "doc")
        await seen.until("doc")
        await seen.quiet()
        last = seen.batches[-1]
        assert "doc" in last.finished
        assert ".doc.swp" not in last.finished

        # Written again after the close, and not closed yet: not finished any more.
        seen.paths.clear()
        with open(tmp_path / "doc", "ab") as f:  # noqa: ASYNC230
            f.write(b"more")
            f.flush()
            await seen.until("doc")
            assert "doc" not in seen.batches[-1].finished
