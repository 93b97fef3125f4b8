"""The allocator and cycle-collector settings the CLI applies at start."""

from __future__ import annotations

import gc
import platform
from collections.abc import Iterator

import pytest

from trio_sync.memory import GC_YOUNG_THRESHOLD, limit_allocator_arenas, relax_cycle_collector


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_glibc_accepts_the_arena_limit() -> None:
    assert limit_allocator_arenas()


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restore_gc")
def test_the_cycle_collector_runs_less_often_and_skips_start_up_objects() -> None:
    _young, middle, old = gc.get_threshold()
    relax_cycle_collector()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, middle, old)
    assert gc.get_freeze_count() > 0
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1  # cycles made later are still collected
