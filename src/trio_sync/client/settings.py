"""What a client remembers about its server, in its state folder: after one run with `--server`
and a token, `trio-sync client DIR` alone starts it again, and `trio-sync history` / `restore`
find the server from any path inside DIR. The token is kept apart, owner-only, never printed."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..protocol.paths import STATE_DIR_NAME

SETTINGS_FILE = "settings.json"
TOKEN_FILE = "token"


@dataclass(frozen=True, slots=True)
class Saved:
    server_url: str
    name: str
    fingerprint: str | None = None
    ca_cert: str | None = None
    allow_insecure_http: bool = False


def save(state_dir: Path, saved: Saved, token: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    _write(state_dir / TOKEN_FILE, token + "\n")
    _write(state_dir / SETTINGS_FILE, json.dumps(asdict(saved), indent=1) + "\n")


def load(state_dir: Path) -> tuple[Saved, str] | None:
    """The saved settings and token, or None if there are none (or they are unreadable)."""
    try:
        raw = json.loads((state_dir / SETTINGS_FILE).read_text(encoding="utf-8"))
        token = (state_dir / TOKEN_FILE).read_text(encoding="utf-8").strip()
        saved = Saved(**raw)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(saved.server_url, str) or not isinstance(saved.name, str) or not token:
        return None
    return saved, token


def synced_folder_of(path: Path) -> Path | None:
    """The synced folder *path* is in (or is): the nearest folder at or above it with saved
    settings."""
    path = path.absolute()
    for folder in (path, *path.parents):
        if (folder / STATE_DIR_NAME / SETTINGS_FILE).is_file():
            return folder
    return None


def _write(path: Path, text: str) -> None:
    """Replace *path* with *text*, owner-only, in one rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
