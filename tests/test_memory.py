"""The allocator setting the CLI applies at start."""

from __future__ import annotations

import platform

import pytest

from trio_sync.memory import limit_allocator_arenas


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_glibc_accepts_the_arena_limit() -> None:
    assert limit_allocator_arenas()
