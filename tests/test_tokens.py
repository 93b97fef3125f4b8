"""One token per client: stored hashed, named, added and revoked while the server runs; wrong
tokens are limited per address."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from trio_sync.server.auth import (
    FAILURE_WINDOW,
    FAILURES_ALLOWED,
    STREAMS_PER_TOKEN,
    Authenticator,
)
from trio_sync.server.tokens import SHARED, TOKENS_DB, TokenStore, digest

from .conftest import TOKEN, ServerHandle


def test_tokens_are_stored_hashed_in_a_private_file(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path)
    token = store.add("laptop")
    store.close()
    assert len(token) >= 40
    assert token.startswith("tsync_")  # never read as an option on a command line
    assert (tmp_path / TOKENS_DB).stat().st_mode & 0o777 == 0o600
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert token.encode() not in stored
    assert digest(token).encode() in stored or (tmp_path / f"{TOKENS_DB}-wal").exists()
    with sqlite3.connect(tmp_path / TOKENS_DB) as conn:
        assert conn.execute("SELECT digest FROM tokens").fetchall() == [(digest(token),)]


def test_an_older_token_file_becomes_the_shared_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("the-old-shared-token\n")
    store = TokenStore.open(tmp_path)
    assert store.take_in_legacy(tmp_path)
    assert not (tmp_path / "token").exists()  # no plain text left behind
    (info,) = store.list()
    assert (info.name, info.shared) == (SHARED, True)
    assert store.by_digest()[digest("the-old-shared-token")].name == SHARED
    store.close()


async def _status(server: ServerHandle, token: str, name: str = "x") -> int:
    headers = {"Authorization": f"Bearer {token}", "X-Trio-Sync-Client": name}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as client:
        return (await client.get("/info")).status_code


async def test_a_named_token_names_its_client_whatever_its_header_says(
    server: ServerHandle,
) -> None:
    store = TokenStore.open(server.data_dir)
    token = store.add("laptop")
    store.close()
    headers = {"Authorization": f"Bearer {token}", "X-Trio-Sync-Client": "desktop"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as client:
        assert (await client.get("/info")).status_code == 200  # at once, not after a poll
        async with client.stream("GET", "/sync") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: hello"):
                    break
            info = (await client.get("/info")).json()
    assert info["clients"] == ["laptop"]  # not the header's "desktop"


async def test_a_revoked_token_is_refused_and_its_stream_ends(server: ServerHandle) -> None:
    store = TokenStore.open(server.data_dir)
    token = store.add("laptop")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as client:
        async with client.stream("GET", "/sync") as stream:
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("event: hello"):
                    break
            assert store.revoke("laptop")
            with trio.fail_after(2):  # "within a second", with room for a loaded machine
                async for _ in lines:
                    pass  # the server ends the stream
        assert (await client.get("/info")).status_code == 401
    store.close()


async def test_wrong_tokens_are_limited_per_address(server: ServerHandle) -> None:
    codes = [await _status(server, f"wrong-{i}") for i in range(FAILURES_ALLOWED + 2)]
    assert codes[:FAILURES_ALLOWED] == [401] * FAILURES_ALLOWED
    assert codes[FAILURES_ALLOWED:] == [429, 429]
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/info", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 429  # even the right token must wait: no guessing on
    assert 0 < int(response.headers["Retry-After"]) <= 60


async def test_a_token_holds_a_bounded_number_of_streams(server: ServerHandle) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Trio-Sync-Client": "greedy"}
    opened = trio.Semaphore(0)
    client = httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10)

    async def hold() -> None:
        async with client.stream("GET", "/sync") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: hello"):
                    opened.release()
            await trio.sleep_forever()

    async with client, trio.open_nursery() as nursery:
        for _ in range(STREAMS_PER_TOKEN):
            nursery.start_soon(hold)
        for _ in range(STREAMS_PER_TOKEN):
            await opened.acquire()
        extra = await client.get("/sync")
        assert extra.status_code == 429
        nursery.cancel_scope.cancel()


async def test_a_client_takes_its_name_from_its_token(
    server: ServerHandle, start_client: Callable[..., Any]
) -> None:
    """Conflict copies and logs carry the name the server knows the client by."""
    store = TokenStore.open(server.data_dir)
    token = store.add("laptop")
    store.close()
    client = await start_client("desktop", token=token)
    assert client.engine.name == "laptop"
    shared = await start_client("other")  # the shared token: the client's own name stays
    assert shared.engine.name == "other"


async def test_failures_of_addresses_that_went_away_are_forgotten(autojump_clock: Any) -> None:
    """A peer with many addresses must not grow the failure table for ever."""
    auth = Authenticator(None)
    for i in range(100):
        auth.failed(f"2001:db8::{i}")
    async with trio.open_nursery() as nursery:
        await nursery.start(auth.watch)
        await trio.sleep(FAILURE_WINDOW + 1)
        nursery.cancel_scope.cancel()
    assert auth.retry_after("2001:db8::1") is None
    assert not auth._failures
