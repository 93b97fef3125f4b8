"""Randomized, seeded convergence: clients edit, delete, rename and move while online or offline,
clients and the server restart; afterwards every folder is identical and nothing a user wrote is
lost unless that user (or another) saw it and replaced or deleted it.

Replay a failure with TRIO_SYNC_SEED=<seed>. More runs: TRIO_SYNC_CONVERGENCE_RUNS=<n>, or
`nox -s soak` (TRIO_SYNC_SOAK_SECONDS) which keeps drawing new seeds until its time is up.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import ClientHandle, ServerHandle, folders, in_sync, tree

RUNS = int(os.environ.get("TRIO_SYNC_CONVERGENCE_RUNS", "3"))
SOAK_SECONDS = float(os.environ.get("TRIO_SYNC_SOAK_SECONDS", "0"))
FIXED_SEED = os.environ.get("TRIO_SYNC_SEED")
OPS = int(os.environ.get("TRIO_SYNC_CONVERGENCE_OPS", "40"))

NAMES = ["f0", "f1", "f2.txt", "f3.txt"]
DIRS = ["d0", "d1", "d0/e0"]


@dataclass
class World:
    rng: random.Random
    server: ServerHandle
    start: Callable[..., Any]
    roots: dict[str, Path]
    clients: dict[str, ClientHandle | None] = field(default_factory=dict)
    written: set[bytes] = field(default_factory=set)
    superseded: set[bytes] = field(default_factory=set)
    counter: int = 0
    server_up: bool = True
    log: list[str] = field(default_factory=list)

    def fresh(self, who: str) -> bytes:
        self.counter += 1
        return f"{who}-{self.counter}\n".encode()

    def files(self, who: str) -> list[Path]:
        root = self.roots[who]
        return [
            Path(folder) / name
            for folder, dirs, names in os.walk(root)
            if ".trio-sync" not in Path(folder).relative_to(root).parts
            for name in names
        ]

    def dirs(self, who: str) -> list[Path]:
        root = self.roots[who]
        return [root / p for p in folders(root)]

    def random_path(self, who: str) -> Path:
        folder = self.rng.choice(["", *DIRS])
        return self.roots[who] / folder / self.rng.choice(NAMES)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _write(path: Path, data: bytes) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".~{path.name}.tmp"
        tmp.write_bytes(data)
        os.rename(tmp, path)  # as editors save: the old content is replaced in one step
    except (FileExistsError, NotADirectoryError, IsADirectoryError, FileNotFoundError):
        return False
    return True


async def step(world: World) -> None:
    rng = world.rng
    who = rng.choice(sorted(world.roots))
    op = rng.choices(
        ["create", "edit", "append", "delete", "rename", "move_dir", "mkdir", "rmdir",
         "toggle", "restart_client", "restart_server", "pause"],
        weights=[6, 5, 3, 3, 3, 1, 2, 1, 3, 1, 1, 4],
    )[0]  # fmt: skip
    world.log.append(f"{time.monotonic():.3f} {who}: {op}")
    files = world.files(who)
    if op == "create":
        target = world.random_path(who)
        old = _read(target)
        data = world.fresh(who)
        world.log.append(f"  {target.relative_to(world.roots[who])} {old!r} -> {data!r}")
        if _write(target, data):
            world.written.add(data)
            if old is not None:
                world.superseded.add(old)
    elif op in ("edit", "append") and files:
        target = rng.choice(files)
        old = _read(target)
        if old is None:
            return
        data = world.fresh(who) if op == "edit" else old + world.fresh(who)
        world.log.append(f"  {target.relative_to(world.roots[who])} {old!r} -> {data!r}")
        if _write(target, data):
            world.written.add(data)
            world.superseded.add(old)
    elif op == "delete" and files:
        target = rng.choice(files)
        old = _read(target)
        try:
            target.unlink()
        except (FileNotFoundError, IsADirectoryError):
            return
        world.log.append(f"  {target.relative_to(world.roots[who])} {old!r}")
        if old is not None:
            world.superseded.add(old)
    elif op == "rename" and files:
        source, target = rng.choice(files), world.random_path(who)
        world.log.append(
            f"  {source.relative_to(world.roots[who])} -> {target.relative_to(world.roots[who])}"
        )
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with suppress(OSError):
                os.rename(source, target)
    elif op == "move_dir" and world.dirs(who):
        source = rng.choice(world.dirs(who))
        target = world.roots[who] / f"moved{world.counter}"
        world.counter += 1
        with suppress(OSError):
            os.rename(source, target)
    elif op == "mkdir":
        (world.roots[who] / rng.choice(DIRS) / f"empty{rng.randrange(3)}").mkdir(
            parents=True, exist_ok=True
        )
    elif op == "rmdir" and world.dirs(who):
        with suppress(OSError):  # not empty: a user's rmdir would refuse too
            rng.choice(world.dirs(who)).rmdir()
    elif op == "toggle":
        handle = world.clients[who]
        if handle is None:
            world.clients[who] = await world.start(who, wait=False)
        else:
            await handle.stop()
            world.clients[who] = None
    elif op == "restart_client" and world.clients[who] is not None:
        handle = world.clients[who]
        assert handle is not None
        await handle.stop()
        world.clients[who] = await world.start(who, wait=False)
    elif op == "restart_server":
        await world.server.stop()
        await trio.sleep(rng.uniform(0, 0.3))
        await world.server.start()
    await trio.sleep(rng.uniform(0, 0.15) if op == "pause" else rng.uniform(0, 0.02))


async def run_scenario(
    seed: int, server: ServerHandle, start: Callable[..., Any], tmp_path: Path
) -> None:
    rng = random.Random(seed)
    names = [f"c{i}" for i in range(rng.randint(2, 4))]
    world = World(rng, server, start, {n: tmp_path / f"seed{seed}" / n for n in names})
    for name in names:
        world.clients[name] = await start(name, root=world.roots[name])
    world.start = lambda who, **kw: start(who, root=world.roots[who], **kw)
    for _ in range(OPS):
        await step(world)

    for name, handle in world.clients.items():
        if handle is None:
            world.clients[name] = await world.start(name, wait=False)
    roots = list(world.roots.values())
    try:
        await in_sync(*roots, timeout=60)
    except AssertionError as e:
        raise AssertionError(f"seed {seed} did not converge: {e}\nops: {world.log}") from None
    final = set(tree(roots[0]).values())
    lost = (world.written - world.superseded) - final
    assert not lost, f"seed {seed} lost versions {sorted(lost)}\nops:\n" + "\n".join(world.log)
    for handle in world.clients.values():
        if handle is not None:
            await handle.stop()
    shutil.rmtree(tmp_path / f"seed{seed}", ignore_errors=True)


def _seeds() -> list[int]:
    if FIXED_SEED is not None:
        return [int(FIXED_SEED)]
    base = random.SystemRandom().randrange(1 << 30)
    return [base + i for i in range(RUNS)]


@pytest.mark.parametrize("seed", _seeds())
async def test_random_histories_converge_without_loss(
    seed: int, server: ServerHandle, start_client: Callable[..., Any], tmp_path: Path
) -> None:
    print(f"seed {seed} (replay with TRIO_SYNC_SEED={seed})")
    await run_scenario(seed, server, start_client, tmp_path)


@pytest.mark.skipif(SOAK_SECONDS <= 0, reason="soak runs only with TRIO_SYNC_SOAK_SECONDS")
async def test_soak(server: ServerHandle, start_client: Callable[..., Any], tmp_path: Path) -> None:
    deadline = time.monotonic() + SOAK_SECONDS
    rng = random.SystemRandom()
    runs = 0
    while time.monotonic() < deadline:
        seed = rng.randrange(1 << 30)
        print(f"soak: seed {seed}", flush=True)
        await run_scenario(seed, server, start_client, tmp_path)
        runs += 1
    print(f"soak: {runs} scenarios converged")
