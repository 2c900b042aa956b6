"""The memory of a pipeline process: Arrow's pool, the C heap as it is set up at the start, and
handing back what a stage freed. glibc and Arrow's jemalloc only where they are (Linux); elsewhere
these are no-ops.

Arrow's jemalloc pool, not its default mimalloc one: mimalloc keeps the pages a large step freed
(some 100-300 MiB of a kernel after a million rows), jemalloc hands them back.

glibc's defaults suit short programs, not a kernel that runs five stages of 100,000 rows:
- every thread that allocates may get an arena of its own (up to 8 per core): the transfer threads of
  boto3, the readers and writers of the pipes, ipykernel's own; each keeps what it freed;
- the size from which a block is mapped on its own rises each time such a block is freed (up to
  32 MiB), so that after the first large frame its buffers come from the heap, and the heap's top is
  pinned by whatever small object was allocated after them.

Measured on a 100,000-record run (the runner and its kernel, peak RSS): 585 MiB with the defaults,
516 MiB with two arenas and blocks of 1 MiB or more always mapped; stage 2 alone, run in one
process, peaked 64 MiB lower and kept 50 MiB less once it was over.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

ARROW_POOL = "jemalloc"
# Arrow's jemalloc (read when it first allocates): freed pages handed back to the system within
# 100 ms. Its own settings keep them a second, then only mark them free (MADV_FREE), which the
# system takes back only when it runs short: until then they count in the process's RSS. A stage
# that decodes a column a batch at a time kept some 60 MiB of them at the change report's peak (a
# rerun of 100,000 records into a million rows).
ARROW_JEMALLOC_CONF = "dirty_decay_ms:100,muzzy_decay_ms:0"
ARENAS = 2  # malloc arenas of a process (the main one and one for all its threads)
MAPPED_FROM = 1 << 20  # blocks this large or larger are mapped, and unmapped when freed

# mallopt's parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# ...and the environment variables that set them before a process starts, which stand when given.
_ENVIRONMENT = {"MALLOC_ARENA_MAX": (_M_ARENA_MAX, ARENAS), "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, MAPPED_FROM)}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, for one)
        return None


def choose_arrow_pool() -> None:
    """ARROW_POOL for pyarrow, and ARROW_JEMALLOC_CONF for its jemalloc, which read
    ARROW_DEFAULT_MEMORY_POOL and JE_ARROW_MALLOC_CONF when they first allocate (so at `import lib`,
    lib/__init__.py); a setting of one's own is left alone."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", ARROW_POOL)
        os.environ.setdefault("JE_ARROW_MALLOC_CONF", ARROW_JEMALLOC_CONF)


def tune() -> dict[str, int]:
    """Set the heap up as above, unless the environment sets it (MALLOC_ARENA_MAX,
    MALLOC_MMAP_THRESHOLD_): at a process's start, before its threads, or later, when the arenas that
    threads already made stay. Returns what was set, by environment variable name."""
    libc = _libc()
    done = {}
    if libc is None:
        return done
    for name, (param, value) in _ENVIRONMENT.items():
        if name not in os.environ and libc.mallopt(param, value) == 1:
            done[name] = value
    return done


def release() -> None:
    """Hand back to the system the memory a stage freed: Arrow's pool (which keeps freed pages for
    reuse) and the C heap's free top and holes (malloc_trim). A kernel that runs the stages one after
    another then starts each from its own size, not from the last stage's peak."""
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(OSError):
            libc.malloc_trim(0)
