"""The one gate every path from the network (or from a folder we scan) goes through."""

from __future__ import annotations

import re
import unicodedata

from ..errors import InvalidPath

#: The client's state folder. Reserved on the wire so that no peer can write into another's state.
STATE_DIR_NAME = ".trio-sync"

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255

#: C0 and C1 controls (a terminal may act on U+009B), line and paragraph separators, and the
#: bidirectional controls that make `evil\u202etxt.exe` show as `evilexe.txt`.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def is_state_dir(name: str) -> bool:
    """Whether *name* is the state folder on some filesystem: on case-insensitive ones (vfat,
    exfat, ext4 casefold) `.TRIO-SYNC` is the same folder (casefold, not lower: the long s U+017F
    folds to `s` there), and vfat drops trailing dots and spaces."""
    return unicodedata.normalize("NFKC", name).casefold().rstrip(". ") == STATE_DIR_NAME


def check_path(path: str) -> str:
    """Return *path* if it is a safe relative wire path, else raise InvalidPath saying why.

    Wire paths are relative, `/`-separated, NFC-normalised UTF-8, with no empty, `.` or `..`
    component, no control characters and nothing under the reserved state folder.
    """
    if not isinstance(path, str) or not path:
        raise InvalidPath("path is empty")
    if _CONTROL.search(path):
        raise InvalidPath(f"path contains a control or bidirectional character: {path!r}")
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
    if is_state_dir(parts[0]):
        raise InvalidPath(f"path is inside the reserved {STATE_DIR_NAME} folder: {path!r}")
    return path


def is_valid_path(path: str) -> bool:
    try:
        check_path(path)
    except InvalidPath:
        return False
    return True
