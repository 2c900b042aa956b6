"""countries-medallion: the shared library behind the stage notebooks (one module per concern)."""

from lib import memory

# Before anything imports pyarrow: Arrow's pool is chosen when it first allocates (lib/memory.py).
memory.choose_arrow_pool()
