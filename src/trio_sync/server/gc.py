"""History pruning and chunk garbage collection.

Versions replaced more than `keep_history` seconds ago are forgotten; then every chunk that no
remaining version uses, and that nobody stored or asked about within `grace` seconds, is deleted.

Safety against commits in flight: a commit checks that its chunks exist and records them in one
step under `commit_lock`, and each deletion batch decides and deletes under the same lock. So a
chunk is either recorded as used before its deletion is decided (and kept), or deleted before the
commit checks (and the commit gets "chunks_missing", so the client uploads it again). The grace
period keeps that second case rare: asking about a chunk refreshes its timestamp.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from .store import BlobStore, MetaStore

log = logging.getLogger("trio_sync.server")

BATCH = 1000


@dataclass(frozen=True, slots=True)
class Collected:
    versions_pruned: int
    chunks_deleted: int


async def collect_garbage(
    meta: MetaStore,
    blobs: BlobStore,
    commit_lock: trio.Lock,
    *,
    keep_history: float,
    grace: float,
    now: float | None = None,
) -> Collected:
    now = time.time() if now is None else now
    pruned = await meta.prune_history(now - keep_history)
    idle = await blobs.idle_since(now - grace)
    deleted = 0
    for i in range(0, len(idle), BATCH):
        batch = idle[i : i + BATCH]
        async with commit_lock:
            used = await meta.referenced(batch)
            deleted += await blobs.delete(
                [h for h in batch if h not in used], idle_since=now - grace
            )
    if pruned or deleted:
        log.info("garbage collection: %d old versions, %d chunks removed", pruned, deleted)
    return Collected(pruned, deleted)


async def run_periodically(
    meta: MetaStore,
    blobs: BlobStore,
    commit_lock: trio.Lock,
    *,
    every: float,
    keep_history: float,
    grace: float,
) -> None:
    while True:
        await trio.sleep(every)
        await collect_garbage(meta, blobs, commit_lock, keep_history=keep_history, grace=grace)
