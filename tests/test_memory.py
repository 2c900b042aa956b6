"""The C heap of a pipeline process (lib/memory.py), each case in a Python of its own: glibc's settings
are per process, and the first allocations decide what the heap keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lib import config, memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap: Linux only")

# Prints what `tune` set (when asked to tune), the arenas glibc made for eight threads allocating at
# once, and how much of 80 MiB of freed 2 MiB blocks the process still holds without a malloc_trim
# when a smaller block was allocated after them.
PROBE = r"""
import ctypes, json, os, sys, tempfile, threading
import psutil
from lib import memory
tuned = memory.tune() if sys.argv[1] == "tune" else {}
libc = ctypes.CDLL("libc.so.6")
libc.fdopen.restype = ctypes.c_void_p
libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fflush.argtypes = [ctypes.c_void_p]

together = threading.Barrier(8)
def allocate():
    together.wait()
    kept = [bytearray(600) for _ in range(20_000)]  # past pymalloc's sizes: glibc's malloc
threads = [threading.Thread(target=allocate) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
with tempfile.TemporaryFile() as f:
    out = libc.fdopen(os.dup(f.fileno()), b"w")
    libc.malloc_info(0, out)
    libc.fflush(out)
    f.seek(0)
    arenas = f.read().decode().count("<heap nr=")

me = psutil.Process()
large = b"x" * (4 << 20)  # written, so resident (calloc's fresh pages would not be)
del large  # a large block freed: glibc's default then serves blocks below 4 MiB from the heap
blocks = [b"x" * (2 << 20) for _ in range(40)]
pin = b"x" * (512 << 10)  # after them on the heap: its top cannot be trimmed below it
held = me.memory_info().rss
del blocks
kept = max(0, me.memory_info().rss - (held - (80 << 20)))
print(json.dumps({"tuned": tuned, "arenas": arenas, "kept_mib": kept >> 20}))
"""


def probe(how: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, how], cwd=config.ROOT, capture_output=True, text=True,
                         check=True, env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env})
    return json.loads(out.stdout)


def test_a_tuned_process_has_two_arenas_and_gives_large_blocks_back_as_they_are_freed():
    default, tuned = probe("default"), probe("tune")
    assert tuned["tuned"] == {"MALLOC_ARENA_MAX": 2, "MALLOC_MMAP_THRESHOLD_": 1 << 20}
    # glibc's defaults, for comparison: an arena for each thread, and the freed blocks held
    assert default["arenas"] > 2 and default["kept_mib"] >= 60, default
    # (a block may still be served from a free stretch of the heap: seen once in 12, 19 of the 80 MiB)
    assert tuned["arenas"] <= 2 and tuned["kept_mib"] <= 30, tuned


def test_the_environment_settings_stand():
    given = probe("tune", MALLOC_ARENA_MAX="4")
    assert given["tuned"] == {"MALLOC_MMAP_THRESHOLD_": 1 << 20}
    assert 2 < given["arenas"] <= 4


def test_release_hands_back_what_a_stage_freed():
    """What the runner runs after resetting the kernel between notebooks: heap blocks a stage freed go
    back to the system, so the next stage starts from the kernel's own size."""
    import psutil

    from lib.memory import release

    me = psutil.Process()
    blocks, kept = [], []
    for i in range(100_000):  # ~200 MB of C-heap blocks (each past pymalloc's size), a few kept between them
        blocks.append(bytes(2000))
        if i % 100 == 0:
            kept.append(bytes(2000))
    del blocks  # freed, but held by the heap: the kept blocks pin its top
    freed = me.memory_info().rss
    release()
    assert me.memory_info().rss < freed - 100 * 2**20


# Frees the pages of 800 Arrow arrays of 256 KiB, then prints what the process still holds of them
# (MiB of anonymous RSS) once it is down to 20 MiB or DEADLINE seconds have passed.
ARROW_PROBE = r"""
import sys, time
import lib, pyarrow as pa, pyarrow.compute as pc, numpy as np
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) >> 10
one = pa.array(np.arange(32_768, dtype=np.int64))
start = anon()
arrays = [pc.add(one, i) for i in range(800)]
del arrays
deadline = time.monotonic() + float(sys.argv[1])
while anon() > start + 20 and time.monotonic() < deadline:
    time.sleep(0.05)
print(anon() - start)
"""


@pytest.mark.parametrize("conf", [None, "dirty_decay_ms:-1,muzzy_decay_ms:-1"], ids=["lib", "never-decay"])
def test_arrow_hands_freed_pages_back_to_the_system(conf):
    """With lib's setting, the pages Arrow freed leave the process (its RSS) within
    ARROW_JEMALLOC_CONF's 100 ms (waited for up to 5 s). The contrast shows that it is the pool's
    decay, read from JE_ARROW_MALLOC_CONF, that hands them back: set never to decay, the pool keeps
    them. (Arrow's own setting hands them back over a second or more, at a pace the system decides,
    so it makes no steady contrast.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ARROW_", "JE_ARROW"))}
    if conf is not None:
        env["JE_ARROW_MALLOC_CONF"] = conf
    out = subprocess.run([sys.executable, "-c", ARROW_PROBE, "5" if conf is None else "1"], cwd=config.ROOT,
                         capture_output=True, text=True, check=True, env=env)
    kept = int(out.stdout)
    if conf is None:
        assert memory.ARROW_JEMALLOC_CONF and kept <= 20, kept
    else:
        assert kept >= 40, kept
