"""Process-wide allocator settings that keep peak memory flat; called once by the CLI.

Chunks are allocated and freed by a few threads at a time. glibc gives each thread an arena of
its own and keeps freed blocks in it, so peak RSS grows with the number of threads that ever
touched a chunk; measured on the mixed benchmark, client A peaked at 160 MiB with the default and
124 MiB with two arenas. Outside glibc this does nothing.

Python's cycle collector runs every 700 container allocations by default; syncing small files
allocates a few hundred per file, most of them short-lived and free of cycles, so it ran several
times per file and spent 3-6% of a client's CPU (perf, 10,000 files of 4 KiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

#: mallopt's parameter numbers (glibc malloc.h).
_M_ARENA_MAX = -8
#: Two arenas: the Trio thread and the blocking threads share the rest.
ARENAS = 2
#: Container allocations between two young-generation collections (Python's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def limit_allocator_arenas() -> bool:
    """Ask glibc for at most ARENAS malloc arenas; True if it agreed. Call before threads start."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, ARENAS))


def relax_cycle_collector() -> None:
    """Collect cycles less often, and never walk what start-up allocated (modules, classes)."""
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
