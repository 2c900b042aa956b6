"""The runner's kernel: ipykernel, started as `python -m ipykernel_launcher` starts it, less its
debugger. ipykernel imports debugpy whenever it is installed (~0.07 s of CPU at every start, on the
run's critical path: the first stage waits for the kernel); a notebook executed headless is never
stepped through. JupyterLab's kernels are the ordinary ones, debugger included."""

import sys
from pathlib import Path

from lib import memory

if __name__ == "__main__":
    memory.tune()  # before ipykernel's threads (lib/memory.py)
    # As ipykernel_launcher: the working folder leaves sys.path while ipykernel loads (IPython puts
    # it back), so that a file there cannot shadow a module the kernel imports.
    if sys.path[0] == "" or Path(sys.path[0]) == Path.cwd():
        del sys.path[0]
    sys.modules["debugpy"] = None  # an import of it fails: ipykernel's debugger says it is unavailable
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()
