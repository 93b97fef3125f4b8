"""`trio-sync history` and `trio-sync restore`: what the server kept of a path, and bringing it
back as a new change that every client receives (docs/protocol.md, `GET /history`,
`POST /restore`). Both find the server from the synced folder the path is in."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

from .client.remote import connect
from .client.settings import load, synced_folder_of
from .config import ClientConfig
from .core.tls import parse_fingerprint
from .protocol.paths import STATE_DIR_NAME

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Where:
    """A path given on the command line, located: its synced folder, its wire path ("" for
    the folder itself), and the client settings saved there."""

    def __init__(self, path: Path) -> None:
        target = path.expanduser().absolute()
        folder = synced_folder_of(target)
        if folder is None:
            raise ValueError(
                f"{path} is not inside a synced folder (run `trio-sync client DIR --server URL`"
                " there once: it remembers the server)"
            )
        loaded = load(folder / STATE_DIR_NAME)
        if loaded is None:
            raise ValueError(f"the settings saved in {folder / STATE_DIR_NAME} cannot be read")
        saved, token = loaded
        rel = target.relative_to(folder).as_posix()
        self.folder = folder
        self.path = "" if rel == "." else unicodedata.normalize("NFC", rel)
        self.config = ClientConfig(
            root=folder,
            server_url=saved.server_url,
            token=token,
            name=saved.name,
            fingerprint=parse_fingerprint(saved.fingerprint) if saved.fingerprint else None,
            ca_cert=Path(saved.ca_cert) if saved.ca_cert else None,
        )


def parse_when(text: str, now: float | None = None) -> float:
    """A Unix time from ISO 8601 (`2026-12-01T10:00`, seconds optional; local time unless it
    carries an offset) or from an age (`90m`, `2h`, `3d`, `1w`, `30s`)."""
    now = time.time() if now is None else now
    match = _RELATIVE.match(text.strip())
    if match:
        return now - float(match[1]) * _UNITS[match[2]]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use 2026-12-01T10:00, with seconds or an offset if you"
            " like, or an age such as 90m, 2h, 3d)"
        ) from None
    return when.timestamp()  # a naive time is taken as local, as the user means it


async def show_history(where: Where, as_json: bool) -> int:
    async with connect(where.config) as remote:
        data = await remote.history(where.path)
    if as_json:
        print(json.dumps(data, indent=1))
        return 0
    versions: list[dict[str, Any]] = data["versions"]
    shown = where.path or str(where.folder)
    if versions:
        print(f"{'REV':>8}  {'WHEN':19}  {'SIZE':>12}  {'BY':20}  WHAT")
        for i, v in enumerate(versions):
            older = versions[i + 1] if i + 1 < len(versions) else None
            size = "" if v.get("deleted") or v.get("kind") == "dir" else str(v.get("size", ""))
            print(
                f"{v['rev']:>8}  {_local(v['committed_at']):19}  {size:>12}  "
                f"{v.get('origin', '')!s:20}  {_what(v, older)}"
            )
    deleted: list[dict[str, Any]] = data.get("deleted_below") or []
    if deleted:
        if versions:
            print()
        print(f"Deleted below {shown}, newest first:")
        print(f"{'REV':>8}  {'WHEN':19}  {'BY':20}  PATH")
        for v in deleted:
            by = str(v.get("origin", ""))
            moved = f" (renamed to {v['renamed_to']})" if v.get("renamed_to") else ""
            print(f"{v['rev']:>8}  {_local(v['committed_at']):19}  {by:20}  {v['path']}{moved}")
    if not versions and not deleted:
        print(f"the server has kept nothing of {shown}")
    return 0


def destination(where: Where, to: Path) -> str:
    """The wire path of `--to` *to*, which must be in the same synced folder."""
    try:
        rel = to.expanduser().absolute().relative_to(where.folder).as_posix()
    except ValueError:
        raise ValueError(f"--to must be inside {where.folder}") from None
    if rel == ".":
        raise ValueError("--to must name a path inside the synced folder, not the folder")
    return unicodedata.normalize("NFC", rel)


async def restore(
    where: Where, *, rev: int | None, before: float | None, to: str | None, as_json: bool
) -> int:
    async with connect(where.config) as remote:
        data = await remote.restore(where.path, rev=rev, before=before, to=to)
    if as_json:
        print(json.dumps(data, indent=1))
    else:
        for entry in data["restored"]:
            print(f"restored {entry.get('path')} (now rev {entry.get('rev')})")
        for failure in data.get("failed") or []:
            print(f"not restored: {failure.get('message')}", file=sys.stderr)
        print(
            f"{len(data['restored'])} restored, {data.get('unchanged', 0)} already as they were,"
            f" {len(data.get('failed') or [])} failed. Every client receives them as new changes;"
            " a newer local change on one is kept beside them as a conflict copy."
        )
    return 1 if data.get("failed") else 0


def _what(version: dict[str, Any], older: dict[str, Any] | None) -> str:
    folder = version.get("kind") == "dir"
    if version.get("renamed_to"):
        return f"renamed to {version['renamed_to']}"
    if version.get("renamed_from"):
        return f"renamed from {version['renamed_from']}"
    if version.get("deleted"):
        return "deleted"
    if ".sync-conflict-" in str(version.get("path", "")) and older is None:
        return "conflict copy"
    if older is None or older.get("deleted"):
        return "folder created" if folder else "created"
    return "folder" if folder else "changed"


def _local(when: float) -> str:
    return dt.datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S")
