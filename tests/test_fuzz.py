"""Random input against a live server: every route, odd JSON, frames, paths, headers. Whatever
comes in, the answer is a 4xx or a 2xx, never a 500, and nothing is logged as a failure.

Bounded here; `nox -s fuzz` runs longer (TRIO_SYNC_FUZZ_EXAMPLES examples per test).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_sync.protocol.frames import ENCODINGS

from .conftest import TOKEN

EXAMPLES = int(os.environ.get("TRIO_SYNC_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
HEADERS = {"Authorization": f"Bearer {TOKEN}", "X-Trio-Sync-Client": "fuzz"}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.sampled_from(["", ".", "..", "a/../b", ".trio-sync/x", "\u202e", "x" * 300, "0" * 64])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
chunk_lists = st.lists(
    st.tuples(st.sampled_from(["0" * 64, "f" * 64, "xyz", ""]), st.integers(-1, 2**22)).map(list),
    max_size=4,
)
commits = st.fixed_dictionaries(
    {},
    optional={
        "path": scalars,
        "base_rev": scalars,
        "deleted": scalars,
        "kind": st.sampled_from(["file", "dir", "other"]) | scalars,
        "hash": scalars,
        "size": scalars,
        "chunks": chunk_lists | json_values,
        "executable": scalars,
        "mtime_ns": scalars,
    },
)
routes = st.sampled_from(["/commit", "/commits", "/announce", "/chunks/missing", "/chunks/fetch"])


@dataclass
class Server:
    url: str
    log: Path

    def failures(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("fuzz")
    log = home / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "trio_sync", "server", "--data-dir", str(home / "data"),
             "--port", "0", "--token", TOKEN],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while (match := re.search(r"--server (http://\S+)", log.read_text())) is None:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield Server(match[1], log)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=30) as c:
        yield c


def _answered(response: httpx.Response, server: Server) -> None:
    assert response.status_code < 500, response.text
    assert not server.failures(), server.failures()[:5]


@FUZZ
@given(
    route=routes,
    body=json_values | commits | st.builds(lambda c: {"commits": c}, st.lists(commits, max_size=3)),
)
def test_json_routes_answer_odd_bodies_with_a_4xx(
    server: Server, client: httpx.Client, route: str, body: Any
) -> None:
    # json.dumps, not httpx's json=: it writes NaN and Infinity too, as a careless peer would.
    _answered(client.post(route, content=json.dumps(body)), server)


@FUZZ
@given(body=st.binary(max_size=300))
def test_raw_bodies_as_json_or_frames_answer_with_a_4xx(
    server: Server, client: httpx.Client, body: bytes
) -> None:
    for route in ("/commit", "/chunks", "/announce"):
        _answered(client.post(route, content=body), server)


frames = st.lists(
    st.tuples(
        st.sampled_from(["0" * 64, "a" * 63, "A" * 64, "zz"]),
        st.sampled_from([*ENCODINGS, "gzip", ""]),
        st.integers(-5, 50),
        st.binary(max_size=60),
    ),
    max_size=4,
)


@FUZZ
@given(pieces=frames)
def test_chunk_frames_answer_with_a_4xx_or_list_what_they_refused(
    server: Server, client: httpx.Client, pieces: list[tuple[str, str, int, bytes]]
) -> None:
    body = b"".join(f"{h} {e} {n}\n".encode() + data for h, e, n, data in pieces)
    _answered(client.post("/chunks", content=body), server)


@FUZZ
@given(
    path=st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=80),
    query=st.text(max_size=30),
    header=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30),
)
def test_urls_and_headers_answer_with_a_4xx(
    server: Server, client: httpx.Client, path: str, query: str, header: str
) -> None:
    headers = {"X-Trio-Sync-Client": header or "x", "Last-Event-ID": header}
    for method, url in [("PUT", f"/chunks/{path}"), ("GET", f"/chunks/{path}"), ("GET", "/info")]:
        response = client.request(
            method, url, params={"cursor": query}, content=b"x", headers=headers
        )
        _answered(response, server)
    with client.stream("GET", "/sync", params={"cursor": query}, headers=headers) as stream:
        _answered(stream, server)
