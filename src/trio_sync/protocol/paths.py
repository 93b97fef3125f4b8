"""The one gate every path from the network (or from a folder we scan) goes through."""

from __future__ import annotations

import re
import unicodedata

from ..errors import InvalidPath

#: The client's state folder. Reserved on the wire so that no peer can write into another's state.
STATE_DIR_NAME = ".trio-sync"

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_path(path: str) -> str:
    """Return *path* if it is a safe relative wire path, else raise InvalidPath saying why.

    Wire paths are relative, `/`-separated, NFC-normalised UTF-8, with no empty, `.` or `..`
    component, no control characters and nothing under the reserved state folder.
    """
    if not isinstance(path, str) or not path:
        raise InvalidPath("path is empty")
    if _CONTROL.search(path):
        raise InvalidPath(f"path contains a control character: {path!r}")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPath(f"path is not valid UTF-8: {path!r}") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidPath(f"path is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise InvalidPath(f"path is absolute: {path!r}")
    if unicodedata.normalize("NFC", path) != path:
        raise InvalidPath(f"path is not NFC-normalised: {path!r}")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidPath(f"path has an empty, '.' or '..' component: {path!r}")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise InvalidPath(f"path component longer than {MAX_COMPONENT_BYTES} bytes: {path!r}")
    if parts[0] == STATE_DIR_NAME:
        raise InvalidPath(f"path is inside the reserved {STATE_DIR_NAME} folder: {path!r}")
    return path


def is_valid_path(path: str) -> bool:
    try:
        check_path(path)
    except InvalidPath:
        return False
    return True
