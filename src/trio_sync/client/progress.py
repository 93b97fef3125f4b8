"""What is moving now and what has moved: read by `trio-sync status` and shown to the user.

The transfer engine reports the bytes of big files as they go (`Progress.begin`/`advance`/
`end`); small files, most of a tree, are only counted when done (`Progress.count`), so that the
bookkeeping costs nothing per chunk where there are many. `show` turns this into progress bars on
a terminal, or into a plain log line now and then for a long transfer when the output is a
journal or a pipe.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as Bars
from rich.text import Text

log = logging.getLogger("trio_sync.client")

#: Transfers at least this big get a bar (or, without a terminal, a log line now and then).
SHOW_MIN = 4 * 1024 * 1024
#: At most this many bars at once (the oldest transfers); the others are summed up in a line.
MAX_BARS = 6
#: How often the bars are redrawn; how often a plain log line is written for a long transfer.
REDRAW_EVERY = 0.2
LOG_EVERY = 10.0

UP, DOWN, DELETED = "up", "down", "deleted"


@dataclass
class Moving:
    path: str
    direction: str
    total: int
    done: int = 0
    since: float = field(default_factory=trio.current_time)

    def rate(self) -> float:
        """Bytes per second since it began."""
        return self.done / max(trio.current_time() - self.since, 1e-3)

    def as_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "direction": self.direction,
            "done": min(self.done, self.total),
            "total": self.total,
            "rate": round(self.rate()),
        }


class Progress:
    def __init__(self) -> None:
        self.moving: dict[str, Moving] = {}
        #: Files and bytes moved since `reset`, by what happened to them.
        self.files: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._reset_at: float | None = None

    def begin(self, path: str, direction: str, total: int, done: int = 0) -> Moving:
        """A transfer of *path* starts; one already moving it the same way is carried on (an
        upload takes over from its early send, a download from its fetch-ahead)."""
        known = self.moving.get(path)
        if known is not None and known.direction == direction:
            known.total = total
            known.done = max(done, known.done)
            return known
        moving = self.moving[path] = Moving(path, direction, total, done)
        return moving

    def end(self, moving: Moving) -> None:
        if self.moving.get(moving.path) is moving:
            del self.moving[moving.path]

    def count(self, what: str, size: int) -> None:
        """A file was uploaded, downloaded or deleted (*what*: "up", "down", "deleted")."""
        self.files[what] += 1
        self.bytes[what] += size

    def reset(self) -> None:
        self.files.clear()
        self.bytes.clear()
        self._reset_at = trio.current_time()

    def summary(self) -> str:
        """What moved since `reset`, in one line; empty if nothing did."""
        parts = [
            f"{self.files[what]:,} {label} ({format_size(self.bytes[what])})"
            for what, label in ((UP, "up"), (DOWN, "down"))
            if self.files[what]
        ]
        if self.files[DELETED]:
            parts.append(f"{self.files[DELETED]:,} deleted")
        if not parts:
            return ""
        if self._reset_at is not None:
            parts[-1] += f" in {format_duration(trio.current_time() - self._reset_at)}"
        return ", ".join(parts)


async def show(progress: Progress, console: Console | None) -> None:
    """Show the big transfers until cancelled: as bars on *console* (a terminal), or without
    one as a log line every LOG_EVERY seconds for each that takes longer than that."""
    if console is None:
        while True:
            await trio.sleep(LOG_EVERY)
            for m in list(progress.moving.values()):
                if m.total >= SHOW_MIN and trio.current_time() - m.since >= LOG_EVERY:
                    log.info("%s", _line(m))
    bars = Bars(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    more = Text()  # the transfers beyond MAX_BARS, in one line
    shown: dict[str, tuple[Moving, TaskID]] = {}
    # Redrawn from this task, not from a thread of rich's own.
    live = Live(Group(bars, more), console=console, auto_refresh=False, transient=True)
    with live:
        while True:
            big = sorted(
                (m for m in progress.moving.values() if m.total >= SHOW_MIN),
                key=lambda m: m.since,
            )
            current = {m.path: m for m in big[:MAX_BARS]}
            rest = big[MAX_BARS:]
            more.plain = (
                f"  and {len(rest)} more, {format_size(sum(m.total - m.done for m in rest))} left"
                if rest
                else ""
            )
            for path, (moving, task) in list(shown.items()):
                if current.get(path) is not moving:
                    bars.remove_task(task)
                    del shown[path]
            for path, moving in current.items():
                if path not in shown:
                    arrow = "↑" if moving.direction == UP else "↓"
                    task = bars.add_task(f"{arrow} {path}", total=moving.total)
                    shown[path] = (moving, task)
                bars.update(shown[path][1], completed=min(moving.done, moving.total))
            live.refresh()
            await trio.sleep(REDRAW_EVERY)


def _line(m: Moving) -> str:
    rate = m.rate()
    left = (m.total - m.done) / rate if rate > 0 else math.inf
    return (
        f"{'uploading' if m.direction == UP else 'downloading'} {m.path}:"
        f" {format_size(m.done)} of {format_size(m.total)} ({100 * m.done // max(m.total, 1)}%),"
        f" {format_size(rate)}/s, about {format_duration(left)} left"
    )


def format_size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"
