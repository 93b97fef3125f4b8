"""A folder moved as one operation, at both ends.

Path by path, a folder of N files that moves is N deletions and N creations at every client:
requests, commits, downloads placed from local content, fsyncs. As one operation it is one.

The mover: the watcher pairs the two ends of a folder's rename (inotify's cookie). If this
client holds the old folder exactly as the server has it (every path at or below it synced at
the server's current revision, none being worked on), it asks the server to move it
(`POST /move`): one transaction that creates every path at the new place and deletes the old
ones, refused if the server's folder is not the one expected. The index follows.

The others: the folder the server made names where it came from (`moved_from`). The events of
the move (that folder's, then every path's at and below both ends, the old folder's deletion
last) are held back from the workers until the move is whole; then the worker that takes the
new folder renames the local one, if it holds exactly what the index says was synced, and moves
the index entries with it.

Whatever is not so (a file changed here, a path being worked on, a folder in the way, an older
server) falls back to the look at each path, which is always right, only slower. The same
looks, after a move, confirm it: a stat each, shared (`Engine._still_synced`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from ..core.durable import fsync_dir
from ..core.renames import rename_noreplace
from ..errors import TrioSyncError
from ..protocol.models import DIR, MAX_MOVE, MAX_MOVE_CHUNKS, FileEntry, MoveRequest
from .index import BaseEntry, Index, StatKey
from .scanner import anchored, as_synced

#: A move whose events stopped coming before its end is let go of after this many seconds.
HOLD_SECONDS = 30.0

#: (path, is_dir) -> whether the ignore rules leave it out.
Ignored = Callable[[str, bool], bool]


def at_or_below(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


def _busy_at(busy: Collection[str], *folders: str) -> bool:
    return any(at_or_below(p, f) for p in busy for f in folders)


def plan_outgoing(
    source: str,
    target: str,
    index: Index,
    remote: Mapping[str, FileEntry],
    ignored: Ignored,
    busy: Collection[str],
) -> MoveRequest | None:
    """The move to ask the server for, now that folder *source* was renamed to *target* here;
    None unless every path at or below *source* is synced at the server's revision (so the
    move sends exactly what this client has), nothing is known at *target*, and no path at
    either end is being worked on or ignored."""
    base, folder = index.get(source), remote.get(source)
    if base is None or not base.is_dir or folder is None or folder.deleted or folder.kind != DIR:
        return None
    if folder.rev != base.rev or index.get(target) is not None:
        return None
    there = remote.get(target)
    if there is not None and not there.deleted:
        return None  # and so nothing live below it: the server keeps its tree so
    if ignored(source, True) or ignored(target, True) or _busy_at(busy, source, target):
        return None
    prefix, cut = source + "/", len(source) + 1
    expect = {"": folder.rev}
    chunks = 0
    for path, entry in remote.items():
        if entry.deleted or not path.startswith(prefix):
            continue
        synced = index.get(path)
        if synced is None or synced.rev != entry.rev:
            return None
        if ignored(f"{target}/{path[cut:]}", entry.kind == DIR):
            return None
        expect[path[cut:]] = entry.rev
        chunks += len(entry.chunks)
        if len(expect) > MAX_MOVE or chunks > MAX_MOVE_CHUNKS:
            return None  # too big to move as one
    for path in index.paths():
        if path.startswith(prefix) and path[cut:] not in expect:
            return None  # synced once, gone from the server since: not yet learned
        if at_or_below(path, target):
            return None
    return MoveRequest(source, target, expect)


def moved_bases(
    index: Index, source: str, target: str, entries: list[FileEntry]
) -> list[BaseEntry]:
    """The index entries at *target* after the server's move *entries*: each old path's, at its
    new path and revision (the files did not change, so neither did their stat)."""
    out = []
    for entry in entries:
        if entry.deleted or not at_or_below(entry.path, target):
            continue
        old = index.get(source + entry.path[len(target) :])
        if old is not None:
            out.append(replace(old, path=entry.path, rev=entry.rev))
    return out


@dataclass
class Move:
    """A folder moved on the server, as its events arrive."""

    source: str
    target: str
    #: Paths whose events arrived and wait for the move to be applied (or given up).
    held: set[str] = field(default_factory=set)
    #: The old folder's deletion, the move's last event, has arrived.
    complete: bool = False
    applying: bool = False
    started: float = 0.0


class HeldMoves:
    """Holds back the events of a folder moved by another client until it is whole: its
    worker needs all of them to decide, and no other worker may touch its paths meanwhile.
    The events of our own move are held until the index has followed it: a worker that took
    one before would find the files unknown at their new paths and read them all."""

    def __init__(self) -> None:
        self.move: Move | None = None

    def outgoing(self, source: str, target: str) -> tuple[Move, list[str]]:
        """Hold the events of the move we are asking for; and the paths to mark now."""
        released = self.release()
        self.move = Move(source, target, complete=True, applying=True)
        return self.move, released

    def take(self, entry: FileEntry, me: str) -> tuple[bool, list[str]]:
        """Whether *entry*'s path is held; and the paths to mark now."""
        move = self.move
        if entry.moved_from is not None and entry.kind == DIR and not entry.deleted:
            if move is not None and at_or_below(entry.path, move.target):
                move.held.add(entry.path)
                return True, []  # a folder within the move held (or ours)
            if entry.origin == me:
                return False, []  # ours, answered already: the index has followed it
            released = self.release()
            self.move = Move(
                entry.moved_from, entry.path, {entry.path}, started=trio.current_time()
            )
            return True, released
        if move is None:
            return False, []
        if at_or_below(entry.path, move.source) or at_or_below(entry.path, move.target):
            move.held.add(entry.path)
            if entry.path == move.source and entry.deleted and not move.complete:
                move.complete = True
                return True, [move.target]  # its worker applies the move
            return True, []
        if not move.complete:
            # A move's events come in one run: this one ended without its last.
            return False, self.release()
        return False, []

    def keeps(self, path: str) -> bool:
        """Whether a worker that took *path* must leave it to the move held now (it is marked
        again when the move is let go of): no look may act at either end meanwhile. A look
        that deleted a file of the old folder between the move's checks and its rename
        would make the file look deleted at the new place."""
        move = self.move
        if move is None or not (at_or_below(path, move.source) or at_or_below(path, move.target)):
            return False
        if path == move.target and move.complete and not move.applying:
            return False  # the worker that applies it
        move.held.add(path)
        return True

    def ready(self, path: str) -> Move | None:
        """The whole move whose new folder is *path*, if one waits to be applied."""
        move = self.move
        if move is None or not move.complete or move.applying or move.target != path:
            return None
        return move

    def finish(self, move: Move) -> list[str]:
        """Stop holding *move*'s paths; the ones held."""
        if self.move is not move:
            return []  # let go of already (a newer move, a reconnection)
        return self.release()

    def release(self) -> list[str]:
        """Stop holding anything; the paths that were held, to be looked at."""
        move, self.move = self.move, None
        return sorted(move.held) if move is not None else []

    def expired(self) -> list[str]:
        """Let go of a move that has waited too long for its events; its paths."""
        move = self.move
        if move is None or move.applying or trio.current_time() - move.started < HOLD_SECONDS:
            return []
        return self.release()


@dataclass(frozen=True)
class LocalMove:
    """What applying a move here takes: the synced paths below the old folder, each with the
    stat it was synced with (None for a folder), and the index entries before and after."""

    checks: list[tuple[str, StatKey | None]]
    removed: list[str]
    added: list[BaseEntry]


def plan_incoming(
    move: Move,
    index: Index,
    remote: Mapping[str, FileEntry],
    ignored: Ignored,
    busy: Collection[str],
) -> LocalMove | None:
    """How to apply *move* here by renaming the folder; None unless every path the index has at
    or below the old folder arrived at the new one with the same content, nothing is known at
    the new one, and nothing at either end is being worked on or ignored at the new place."""
    source, target = move.source, move.target
    base, there = index.get(source), remote.get(target)
    if base is None or not base.is_dir or there is None or there.deleted:
        return None
    gone = remote.get(source)
    if there.moved_from != source or gone is None or not gone.deleted:
        return None
    if ignored(target, True) or _busy_at(busy, source, target):
        return None
    checks: list[tuple[str, StatKey | None]] = []
    removed: list[str] = []
    added = [replace(base, path=target, rev=there.rev)]
    prefix, cut = source + "/", len(source)
    for path in index.paths():
        if at_or_below(path, target):
            return None
        if not path.startswith(prefix):
            continue
        synced = index.get(path)
        new = target + path[cut:]
        arrived = remote.get(new)
        if synced is None or arrived is None or arrived.deleted or arrived.kind != synced.kind:
            return None
        if arrived.hash != synced.hash or arrived.executable != synced.executable:
            return None
        if ignored(new, synced.is_dir):
            return None
        checks.append((path, None if synced.is_dir else synced.stat_key))
        removed.append(path)
        added.append(replace(synced, path=new, rev=arrived.rev))
    removed.append(source)
    return LocalMove(checks, removed, added)


def rename_folder(
    root: Path, source: str, target: str, checks: list[tuple[str, StatKey | None]]
) -> bool:
    """Rename folder *source* to *target* if every path of *checks* is as it was synced, and
    make the rename durable; False (nothing changed) if something differs or is in the way.
    Blocking."""
    if not all(as_synced(root, path, key) for path, key in checks):
        return False
    try:
        with anchored(root, source) as old, anchored(root, target) as new:
            if not stat.S_ISDIR(os.lstat(old).st_mode):
                return False
            rename_noreplace(old, new)  # never over something that appeared there meanwhile
            # A failure from here on leaves the folder moved but says False: the look at each
            # path that follows finds it where it is (and adopts it, as the server has it).
            fsync_dir(new.parent)
            if old.parent != new.parent:
                fsync_dir(old.parent)
    except (OSError, TrioSyncError):
        return False
    return True
