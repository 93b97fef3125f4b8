"""Putting downloaded files in place: checked, renamed, and durable before the index says so.

A download is written to a temp file in the state folder. Placing it checks that the target is
still what the decision was made about, renames the temp file over it, and makes the content and
the rename durable. Only then may the index record it: an index entry for a file whose rename a
crash undid would make the file look deleted locally, and that deletion would be sent on.

Files under 8 MiB (all but the resumable downloads) are placed in batches by `Landing`. Their
temp files are written unsynced; one syncfs(2) puts a whole batch on disk, the renames follow,
and a second syncfs makes the renames durable, so content is on disk before a name points at it.
An fsync per file and per folder cost client B 3.5 to 6 s of the 14 to 20 s that 10,000 files
of 4 KiB took end to end (docs/benchmarks.md). Where syncfs is missing or not sure to be as good
as fsync (`core.durable.group_syncer`), each file and its folder are fsynced as before.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from ..core.durable import fsync_dir, synced_around
from ..core.offload import Offload
from ..core.renames import RenameUnsupported, exchange, rename_noreplace
from ..errors import LocalChanged
from .batching import Batcher, Pending
from .conflicts import move_aside
from .index import StatKey
from .scanner import LocalFile, anchored, stat_key

#: Files placed by one batch at most.
MAX_BATCH = 256


def check_unchanged(target: Path, expected: LocalFile | None, path: str) -> None:
    """Refuse to replace or remove anything but the exact item the decision was made about."""
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        if expected is None:
            return
        raise LocalChanged(f"{path}: vanished locally") from None
    if expected is not None and expected.is_dir:
        if not stat.S_ISDIR(st.st_mode) or st.st_ino != expected.stat.inode:
            raise LocalChanged(f"{path}: changed locally meanwhile")
        return
    if expected is None or not stat.S_ISREG(st.st_mode) or stat_key(st) != expected.stat:
        raise LocalChanged(f"{path}: changed locally meanwhile")


def place(
    root: Path,
    tmp: Path,
    path: str,
    expected: LocalFile | None,
    *,
    sync: bool,
    client: str,
) -> StatKey:
    """Rename *tmp* to *path* if that is still *expected*; returns the placed file's stat. With
    *sync*, the folder is fsynced; the caller must have fsynced *tmp* already. A user's file
    that must be moved aside gets a conflict name with *client* in it. Blocking."""
    with anchored(root, path, create=True) as target:  # never through a swapped-in symlink
        check_unchanged(target, expected, path)
        # Taken from the temp file: a rename keeps inode, size and mtime, and a stat of the
        # target after it could be of a file the user saved in between, which the index would
        # then trust.
        ours = stat_key(os.lstat(tmp))
        try:
            swap_in(tmp, target, expected, path, ours, partial(_keep, target, path, client))
        except RenameUnsupported:
            os.rename(tmp, target)  # the check above is all this filesystem allows
        if sync:
            fsync_dir(target.parent)
    return ours


def _keep(target: Path, path: str, client: str, found: Path) -> str:
    """Keep *found*, a user's file, as a conflict copy next to *target*."""
    return move_aside(found, path, client, folder=target.parent)


def swap_in(
    tmp: Path,
    target: Path,
    expected: LocalFile | None,
    path: str,
    ours: StatKey,
    keep: Callable[[Path], str],
) -> None:
    """Put *tmp* at *target* without ever replacing a file the user saved after the check."""
    if expected is None:
        try:
            rename_noreplace(tmp, target)
        except FileExistsError:
            raise LocalChanged(f"{path}: created locally meanwhile") from None
        return
    try:
        exchange(tmp, target)
    except FileNotFoundError:
        raise LocalChanged(f"{path}: vanished locally") from None
    # *tmp* now holds what had the name: the file we checked, or a save that came in between.
    try:
        check_unchanged(tmp, expected, path)
    except LocalChanged:
        _give_back(tmp, target, ours, keep)
        raise
    os.unlink(tmp)  # the version we decided to replace: the server has it


def _give_back(tmp: Path, target: Path, ours: StatKey, keep: Callable[[Path], str]) -> None:
    """Undo an exchange that displaced a user's save, leaving our file at *tmp* (the caller
    removes it). A save that took the name in the instant between is kept aside, never lost."""
    try:
        exchange(tmp, target)
    except FileNotFoundError:  # our file was removed from the name meanwhile
        try:
            rename_noreplace(tmp, target)
        except FileExistsError:
            keep(tmp)
        return
    with contextlib.suppress(FileNotFoundError):
        if os.lstat(tmp).st_ino != ours.inode:
            keep(tmp)  # yet another save replaced our file: it is the user's too


@dataclass(frozen=True, slots=True)
class _Arrival:
    tmp: Path
    path: str
    expected: LocalFile | None


@dataclass(frozen=True, slots=True)
class LandingStatistics:
    files: int
    batches: int


class Landing:
    """Places finished small downloads in batches (see the module docstring). Run `run` in the
    nursery that owns the workers."""

    def __init__(
        self,
        root: Path,
        tmp_dir: Path,
        offload: Offload,
        *,
        syncfs: Callable[[int], None] | None,
        client: str,
    ):
        """*syncfs*: `core.durable.group_syncer(tmp_dir)`, or None to fsync each file."""
        self._root = root
        self._tmp_dir = tmp_dir
        self._offload = offload
        self._syncfs = syncfs
        self._client = client
        # One batch at a time: files that arrive meanwhile make up the next one.
        self._batcher: Batcher[_Arrival, StatKey] = Batcher(
            self._land, max_items=MAX_BATCH, parallel=1
        )
        self._files = 0
        self._batches = 0

    @property
    def wants_synced_files(self) -> bool:
        """Whether a temp file must be fsynced before it is handed to `place`."""
        return self._syncfs is None

    def statistics(self) -> LandingStatistics:
        return LandingStatistics(files=self._files, batches=self._batches)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._batcher.run(task_status=task_status)

    async def place(self, tmp: Path, path: str, expected: LocalFile | None) -> StatKey:
        """Rename the finished temp file *tmp* (in the state folder) to *path*, if that is still
        *expected* (None: absent), durably. The caller removes *tmp* if this fails."""
        return await self._batcher.call(_Arrival(tmp, path, expected))

    async def _land(self, batch: list[Pending[_Arrival, StatKey]]) -> None:
        results = await self._offload.run_sync(self._land_all, [p.item for p in batch])
        self._files += len(batch)
        self._batches += 1
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                pending.fail(result)
            else:
                pending.resolve(result)

    def _land_all(self, arrivals: list[_Arrival]) -> list[StatKey | Exception]:
        """Place each file; one failing (changed locally, say) does not stop the others."""
        results: list[StatKey | Exception] = []
        each = self._syncfs is None  # no syncfs here: fsync each file's folder as it lands
        batch: AbstractContextManager[object] = (
            nullcontext() if self._syncfs is None else synced_around(self._syncfs, self._tmp_dir)
        )
        with batch:  # syncfs: every file's content first, then all the renames
            for a in arrivals:
                try:
                    results.append(
                        place(self._root, a.tmp, a.path, a.expected, sync=each, client=self._client)
                    )
                except Exception as e:
                    results.append(e)
        return results
