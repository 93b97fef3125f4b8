"""Nothing a client writes leaves its folder, even while a local user swaps a folder of it for a
symlink that points outside, as fast as the kernel allows (the security review's M2 probe)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from trio_sync.core.renames import exchange

from .conftest import eventually

FILES = 150


def _swap_until(stop: threading.Event, first: Path, second: Path) -> int:
    swaps = 0
    while not stop.is_set():
        exchange(first, second)
        swaps += 1
    return swaps


async def test_downloads_never_land_outside_the_folder_through_a_swapped_symlink(
    start_client: Callable[..., Any], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    a = await start_client("a")
    (a.root / "sub").mkdir()
    b = await start_client("b")
    await eventually(lambda: (b.root / "sub").is_dir())
    (b.root / "link").symlink_to(outside)  # a symlink is never synced, nor followed

    stop = threading.Event()
    async with trio.open_nursery() as nursery:
        swapping = trio.Event()
        result: list[int] = []

        async def swap() -> None:
            swapping.set()
            result.append(
                await trio.to_thread.run_sync(_swap_until, stop, b.root / "sub", b.root / "link")
            )

        nursery.start_soon(swap)
        await swapping.wait()
        try:
            for i in range(FILES):
                (a.root / "sub" / f"f{i}").write_bytes(f"file {i}".encode())
                if i % 10 == 0:
                    await trio.sleep(0.05)
            with trio.move_on_after(6):  # some are refused (their folder was the symlink)
                await eventually(lambda: _count(b.root) >= FILES, timeout=60)
        finally:
            stop.set()
    assert result[0] > 1000  # the race was really run
    assert os.listdir(outside) == []
    assert _count(b.root) >= 1  # and downloads did land, inside


def _count(root: Path) -> int:
    """Files named f<N> anywhere inside *root* (the swapped folder may have either name)."""
    return sum(
        1
        for folder, _, names in os.walk(root)  # os.walk does not follow the symlink
        for name in names
        if name.startswith("f") and ".trio-sync" not in folder
    )
