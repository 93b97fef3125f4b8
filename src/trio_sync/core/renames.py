"""Renames that never destroy a file they were not meant to: renameat2(2) on Linux.

A plain rename replaces whatever holds the new name. Checking first ("is it still the file we
decided about?") leaves an instant between the check and the rename in which a user's save is
replaced unseen. `rename_noreplace` refuses instead, and `exchange` swaps two names in one step,
so that the caller can look at what it displaced and put it back if that was not the file it
checked. Both raise `RenameUnsupported` where the kernel or the filesystem lacks them; callers
fall back to check-then-rename there. Blocking: run them in a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


class RenameUnsupported(OSError):
    """This kernel, C library or filesystem cannot rename without replacing."""


def _find_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or not Linux
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _find_renameat2()


def _call(source: str | Path, target: str | Path, flags: int) -> None:
    if _renameat2 is None:
        raise RenameUnsupported(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        # EINVAL: the filesystem does not know the flag (for files, nothing else gives it).
        raise RenameUnsupported(code, os.strerror(code), os.fspath(target))
    raise OSError(code, os.strerror(code), os.fspath(source), None, os.fspath(target))


def rename_noreplace(source: str | Path, target: str | Path) -> None:
    """Rename *source* to *target*; FileExistsError if *target* exists (nothing is changed)."""
    _call(source, target, _RENAME_NOREPLACE)


def exchange(first: str | Path, second: str | Path) -> None:
    """Swap the two names in one step; both must exist (FileNotFoundError otherwise)."""
    _call(first, second, _RENAME_EXCHANGE)
