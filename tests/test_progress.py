"""Progress of big transfers: the plain log lines, the bars on a terminal, the summary."""

from __future__ import annotations

import io
import logging
import re

import pytest
import trio
import trio.testing
from rich.console import Console

from trio_sync.client.progress import (
    DOWN,
    LOG_EVERY,
    MAX_BARS,
    SHOW_MIN,
    UP,
    Progress,
    show,
)

MiB = 1024 * 1024


async def test_without_a_terminal_a_long_transfer_is_logged_now_and_then(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    progress = Progress()
    big = progress.begin("videos/big.mkv", UP, 100 * MiB)
    small = progress.begin("notes.md", DOWN, SHOW_MIN - 1)  # too small to be worth a line
    async with trio.open_nursery() as nursery:
        nursery.start_soon(show, progress, None)
        await trio.sleep(1)
        for _ in range(9):  # at 1, 3.5, 6, ... 21 s: never at the same moment as a line
            big.done += 4 * MiB
            small.done += 1
            await trio.sleep(LOG_EVERY / 4)
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "uploading videos/big.mkv: 16.0 MiB of 100.0 MiB (16%), 1.6 MiB/s, about 52 s left",
        "uploading videos/big.mkv: 32.0 MiB of 100.0 MiB (32%), 1.6 MiB/s, about 42 s left",
    ]


async def test_on_a_terminal_bars_show_bytes_rate_and_time_left() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    progress = Progress()
    big = progress.begin("big.bin", DOWN, 64 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(show, progress, console)
        for _ in range(8):
            await trio.sleep(0.1)
            big.done += 4 * MiB
        progress.end(big)
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    drawn = out.getvalue()
    assert "↓ big.bin" in drawn
    assert "more" not in drawn
    assert re.search(r"[1-9]\d?\.0/64\.0 MiB", drawn)  # bytes done of the total
    assert re.search(r"\d MB/s", drawn)  # the rate
    assert re.search(r"0:00:\d\d", drawn)  # the time left


async def test_the_summary_counts_what_moved() -> None:
    progress = Progress()
    assert progress.summary() == ""
    progress.reset()
    progress.count(UP, 3 * MiB)
    progress.count(UP, MiB)
    progress.count(DOWN, 512)
    progress.count("deleted", 0)
    assert progress.summary().startswith("2 up (4.0 MiB), 1 down (512 bytes), 1 deleted in ")


async def test_many_big_transfers_show_a_few_bars_and_a_line_for_the_rest() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    progress = Progress()
    for i in range(MAX_BARS + 4):
        progress.begin(f"photo-{i:02d}.jpg", UP, 8 * MiB)
        await trio.sleep(0.001)  # each begins a moment after the last
    async with trio.open_nursery() as nursery:
        nursery.start_soon(show, progress, console)
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    drawn = out.getvalue()
    assert f"↑ photo-{MAX_BARS - 1:02d}.jpg" in drawn  # the oldest ones have bars
    assert f"photo-{MAX_BARS:02d}.jpg" not in drawn
    assert "and 4 more, 32.0 MiB left" in drawn
