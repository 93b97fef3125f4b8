"""Holds back a mass deletion before it reaches the server.

A deletion on one machine (an unmounted disk, a wiped folder, a script gone wrong) must not
spread to every other folder. Before this client sends a deletion it asks the guard, which
looks at how many of the files last synced are gone from the folder now (a survey: one lstat
each, at most once a second while deletions flow) plus those deleted within the last minute.
A file that is missing at its path but is in the folder under another name (the same inode,
size and modification time: it was renamed or moved, a folder with it) is not gone: renaming a
big folder deletes every old path, and loses nothing.
Past a threshold (more than half of the synced files, more than 1,000 files, or the folder
itself gone or replaced) no deletion is sent until the user confirms with
`trio-sync confirm-deletes DIR`, which leaves a file in the state folder, or the files come back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from ..core.offload import Offload
from ..errors import TrioSyncError
from ..protocol.paths import is_state_dir
from .index import StatKey

log = logging.getLogger("trio_sync.client")

#: Left in the state folder by `trio-sync confirm-deletes`; valid this long after it was made.
CONFIRM_FILE = "confirm-deletes"
CONFIRM_VALID_SECONDS = 3600.0
#: What the guard holds and why, for the user and for `trio-sync confirm-deletes`.
HELD_FILE = "held-deletes.json"
#: How long a survey's answer is used, and how often a held guard looks whether it may let go.
SURVEY_EVERY = 1.0
CHECK_HELD_EVERY = 0.5


class DeletionsHeld(TrioSyncError):
    """This deletion is held back by the mass-delete guard."""


@dataclass(frozen=True, slots=True)
class GuardLimits:
    #: Hold when more than this share of the synced files would be deleted...
    fraction: float = 0.5
    #: ...(but not for fewer files than this: deleting 3 of a folder's 4 files is ordinary)...
    min_files: int = 10
    #: ...or more than this many files, whatever the share.
    max_files: int = 1000
    #: Deletions sent within this many seconds count together.
    window: float = 60.0


@dataclass(frozen=True, slots=True)
class Survey:
    files: int  # synced files (the index), plus those deleted within the window
    gone: int  # of them, missing from the folder now, plus those deleted within the window
    folder_gone: bool  # the synced folder is missing or is another folder than at start
    examples: tuple[str, ...]
    #: Synced files missing at their path now, and those of them moved within the folder.
    missing: frozenset[str] = frozenset()
    moved: frozenset[str] = frozenset()


class DeleteGuard:
    def __init__(
        self,
        root: Path,
        state_dir: Path,
        synced_files: Callable[[], dict[str, StatKey]],
        offload: Offload,
        limits: GuardLimits,
    ) -> None:
        """Blocking (a stat, and the record of an earlier run's hold is dropped: this run looks
        afresh)."""
        self._root = root
        self._state_dir = state_dir
        self._synced_files = synced_files
        self._offload = offload
        self.limits = limits
        self._identity = _identity(root)
        _remove(state_dir / HELD_FILE)
        self._sent: deque[float] = deque()
        self._survey: tuple[float, Survey] | None = None
        self._confirmed_until = -1.0
        #: Why deletions are held, while they are; and which.
        self.reason: str | None = None
        self.held: set[str] = set()
        self._tripped = trio.Event()
        self._surveying = trio.Lock()

    async def allow(self, path: str, *, count: bool = True) -> None:
        """Return if *path*'s deletion may be sent now; else DeletionsHeld. A folder's deletion
        (*count* False) is only held while the guard holds, never counted."""
        now = trio.current_time()
        if self.reason is None and count and now >= self._confirmed_until:
            survey = await self._surveyed(now)
            if path not in survey.missing:  # older than this deletion
                survey = await self._surveyed(now, fresh=True)
            count = path not in survey.moved  # a rename's old name: nothing is lost
            reason = self._too_many(survey) if count else None
            if reason is not None and self.reason is None:
                if await self._offload.run_sync(self._take_confirmation):
                    log.warning("deletions confirmed with confirm-deletes: sending them")
                    self._confirmed_until = now + self.limits.window
                else:
                    self._hold(reason, survey)
        if self.reason is not None:
            self.held.add(path)
            raise DeletionsHeld(f"{path}: deletion held back ({self.reason})")
        if count:
            self._sent.append(now)
            if now < self._confirmed_until:  # a confirmed deletion still going: keep it going
                self._confirmed_until = now + self.limits.window

    async def watch(self, release: Callable[[set[str]], Awaitable[None]]) -> None:
        """While deletions are held, let them go when the user confirms or when the files are
        back below the thresholds; *release* gets the held paths to look at again."""
        while True:
            await self._tripped.wait()
            await trio.sleep(CHECK_HELD_EVERY)
            confirmed = await self._offload.run_sync(self._take_confirmation)
            if confirmed:
                log.warning("deletions confirmed with confirm-deletes: sending them")
                self._confirmed_until = trio.current_time() + self.limits.window
            else:
                survey = await self._surveyed(trio.current_time(), fresh=True)
                if self._too_many(survey) is not None:
                    continue
                log.info("the files are back: no deletions are held any more")
            held, self.held, self.reason = self.held, set(), None
            self._tripped = trio.Event()
            await self._offload.run_sync(_remove, self._state_dir / HELD_FILE)
            await release(held)

    def _too_many(self, survey: Survey) -> str | None:
        limits = self.limits
        if survey.folder_gone:
            return "the synced folder is gone or was replaced (an unmounted disk?)"
        gone = f"{survey.gone} of {survey.files} synced files are gone"
        if survey.gone > limits.max_files:
            return f"{gone}, more than {limits.max_files}"
        if survey.gone >= limits.min_files and survey.gone > limits.fraction * survey.files:
            return f"{gone}, more than {round(100 * limits.fraction)}%"
        return None

    async def _surveyed(self, now: float, *, fresh: bool = False) -> Survey:
        while self._sent and self._sent[0] < now - self.limits.window:
            self._sent.popleft()
        async with self._surveying:  # a burst of deletions asks at once: one survey for all
            if not fresh and self._survey is not None and now - self._survey[0] < SURVEY_EVERY:
                survey = self._survey[1]
            else:
                survey = await self._offload.run_sync(self._count, self._synced_files())
                self._survey = (trio.current_time(), survey)
        recent = len(self._sent)
        return replace(survey, files=survey.files + recent, gone=survey.gone + recent)

    def _count(self, files: dict[str, StatKey]) -> Survey:
        if _identity(self._root) != self._identity:
            return Survey(len(files), len(files), True, ())
        root = os.fspath(self._root)
        missing = {p: key for p, key in files.items() if not os.path.lexists(f"{root}/{p}")}
        # Looking for them elsewhere reads every folder: only when they might be too many.
        moved = _moved(self._root, missing) if len(missing) >= self.limits.min_files else set()
        gone = [p for p in missing if p not in moved]
        return Survey(
            len(files) - len(moved), len(gone), False, tuple(gone[:5]),
            frozenset(missing), frozenset(moved),
        )  # fmt: skip

    def _hold(self, reason: str, survey: Survey) -> None:
        self.reason = reason
        self._tripped.set()
        log.error(
            "NOT deleting on the server: %s. Nothing has been deleted anywhere else. If you meant"
            " it, run `trio-sync confirm-deletes %s`; if not, put the files back (or"
            " `trio-sync restore`), and syncing goes on by itself",
            reason, self._root,
        )  # fmt: skip
        record = {
            "reason": reason,
            "since": time.time(),
            "gone": survey.gone,
            "files": survey.files,
            "examples": list(survey.examples),
        }
        try:
            (self._state_dir / HELD_FILE).write_text(json.dumps(record))
        except OSError as e:
            log.warning("cannot record the held deletions in %s: %s", self._state_dir, e)

    def _take_confirmation(self) -> bool:
        """Whether the user confirmed recently; a confirmation is used once."""
        path = self._state_dir / CONFIRM_FILE
        try:
            made = path.stat().st_mtime
        except FileNotFoundError:
            return False
        _remove(path)
        return time.time() - made < CONFIRM_VALID_SECONDS


def confirm(state_dir: Path) -> dict[str, object] | None:
    """Confirm the held deletions of the folder whose state folder is *state_dir* (what
    `trio-sync confirm-deletes` does). Returns what was held, if a client recorded it."""
    path = state_dir / CONFIRM_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.close(fd)
    os.utime(path)
    try:
        held: dict[str, object] = json.loads((state_dir / HELD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return held


def _moved(root: Path, missing: dict[str, StatKey]) -> set[str]:
    """Those of the *missing* files that are in the folder under another name: a file with the
    same inode, size and modification time (a rename keeps all three). Blocking."""
    by_inode: dict[int, list[tuple[str, StatKey]]] = {}
    for path, key in missing.items():
        by_inode.setdefault(key.inode, []).append((path, key))
    moved: set[str] = set()
    top = os.fspath(root)
    folders = [top]
    while folders and by_inode:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # gone meanwhile, or not readable: what is in it does not count
        for entry in entries:
            if folder == top and is_state_dir(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
                continue
            candidates = by_inode.get(entry.inode())
            if not candidates:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            for path, key in candidates:
                if (st.st_size, st.st_mtime_ns) == (key.size, key.mtime_ns):
                    moved.add(path)
                    candidates.remove((path, key))
                    break
            if not candidates:
                del by_inode[entry.inode()]
    return moved


def _identity(root: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(root)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
