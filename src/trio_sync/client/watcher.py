"""Local change notifications: inotify through watchfiles' Rust core, debounced into batches.

We drive `RustNotify` ourselves rather than `watchfiles.awatch` so that readiness is a value
(the watches exist before `task_status.started()`) and cancellation is bounded by a short poll.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from watchfiles._rust_notify import RustNotify

from ..protocol.paths import STATE_DIR_NAME

#: How long the watcher thread waits before checking for cancellation, in milliseconds.
POLL_MS = 250


async def watch(
    root: Path,
    on_change: Callable[[set[str]], Awaitable[None]],
    *,
    debounce_ms: int = 200,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call *on_change* with the wire paths (files or folders) that changed, batch by batch."""
    notify = await trio.to_thread.run_sync(
        lambda: RustNotify([str(root)], False, False, 300, True, True)
    )
    prefix = str(root) + os.sep
    state = STATE_DIR_NAME + "/"
    try:
        task_status.started()
        while True:
            raw = await trio.to_thread.run_sync(notify.watch, debounce_ms, 50, POLL_MS, None)
            if not isinstance(raw, set):
                continue  # "timeout": nothing happened
            paths = set()
            for _change, full in raw:
                if not full.startswith(prefix):
                    continue
                rel = full[len(prefix) :].replace(os.sep, "/")
                if rel == STATE_DIR_NAME or rel.startswith(state):
                    continue
                paths.add(rel)
            if paths:
                await on_change(paths)
    finally:
        notify.close()
