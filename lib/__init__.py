"""countries-medallion: the shared library behind the stage notebooks (one module per concern)."""

import os
import sys

# Arrow's jemalloc pool, not its default mimalloc one, where the wheels have it (Linux): mimalloc keeps
# the pages a large step freed (some 100-300 MiB of a kernel after a million rows), jemalloc hands
# them back. Read by pyarrow when it first allocates; a setting of one's own is left alone.
if sys.platform.startswith("linux"):
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
