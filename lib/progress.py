"""Progress of a run while it happens, on stderr: the embedded services starting ("starting PostgreSQL …
ready in 0.8 s"), each stage starting and ending with its duration, and the cell a long stage is on.

On a terminal the cell is a live line redrawn in place; without one (cron, CI, a pipe) plain lines are
printed, and a cell is mentioned only once it has run for `SLOW_CELL_SECONDS`. Stages are followed
through a papermill engine that wraps the standard one (nbclient), made the default by `install()`.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from lib import config, stack
from lib.runner import import_papermill

import_papermill()  # papermill without the grammar jsonschema would build at import (lib/runner.py)
from papermill.engines import NBClientEngine, papermill_engines  # noqa: E402

SLOW_CELL_SECONDS = 10.0
LABELS = {"object_store": "SeaweedFS (object store)", "database": "PostgreSQL"}


class Progress:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lock = threading.Lock()
        self.stage: str | None = None
        self.cell: tuple[int, int, float] | None = None  # (number, of, started)
        self.stage_started = 0.0
        self.announced = False
        self.ticker: threading.Thread | None = None
        self.drawn = False

    def line(self, text: str) -> None:
        with self.lock:
            if self.drawn:
                self.stream.write("\r\033[K")
                self.drawn = False
            self.stream.write(text + "\n")
            self.stream.flush()

    # --- services ---
    def service(self, name: str, start) -> None:
        """Run `start()` for one service, saying what it is and how long it took."""
        label = LABELS.get(name, name)
        began = time.monotonic()
        if self.live:
            with self.lock:
                self.stream.write(f"starting {label} …")
                self.stream.flush()
                self.drawn = True
        try:
            start()
        except BaseException:
            self.line(f"starting {label} … FAILED after {time.monotonic() - began:.1f} s")
            raise
        self.line(f"starting {label} … ready in {time.monotonic() - began:.1f} s")

    # --- stages ---
    def stage_start(self, stage: str, cells: int) -> None:
        self.stage, self.stage_started, self.cell = stage, time.monotonic(), None
        self.line(f"{stage}: started ({cells} cells)")
        if self.ticker is None:
            self.ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self.ticker.start()

    def cell_start(self, number: int, total: int) -> None:
        self.cell, self.announced = (number, total, time.monotonic()), False

    def stage_end(self, stage: str, failed_cell: int | None) -> None:
        seconds = time.monotonic() - self.stage_started
        self.stage, self.cell = None, None
        if failed_cell is None:
            self.line(f"{stage}: done in {seconds:.1f} s")
        else:
            self.line(f"{stage}: FAILED in cell [{failed_cell}] after {seconds:.1f} s")

    def _tick(self) -> None:
        while True:
            time.sleep(0.5)
            stage, cell = self.stage, self.cell
            if stage is None or cell is None:
                continue
            number, total, began = cell
            running = time.monotonic() - began
            if self.live:
                with self.lock:
                    self.stream.write(f"\r\033[K{stage}: cell {number}/{total} · "
                                      f"{time.monotonic() - self.stage_started:.0f} s")
                    self.stream.flush()
                    self.drawn = True
            elif running >= SLOW_CELL_SECONDS and not self.announced:
                self.announced = True
                self.line(f"{stage}: cell {number}/{total} still running after {running:.0f} s")


CURRENT = Progress()


def _failed_cell(nb) -> int | None:
    for cell in nb.cells:
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return cell.get("execution_count")
    return None


class ProgressEngine(NBClientEngine):
    """nbclient, telling `CURRENT` when a stage starts and ends and which cell it is on."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
        stage = Path(nb_man.output_path or "notebook").stem if isinstance(nb_man.output_path, (str, Path)) else "notebook"
        code = [i for i, c in enumerate(nb_man.nb.cells) if c.cell_type == "code"]
        original = nb_man.cell_start

        def cell_start(cell, cell_index=None, **kw):
            if cell_index in code:
                CURRENT.cell_start(code.index(cell_index) + 1, len(code))
            return original(cell, cell_index, **kw)

        nb_man.cell_start = cell_start
        CURRENT.stage_start(stage, len(code))
        failed = None
        try:
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)
        except BaseException:
            failed = CURRENT.cell[0] if CURRENT.cell else 0
            raise
        finally:
            failed = failed if failed is not None else _failed_cell(nb_man.nb)
            CURRENT.stage_end(stage, failed)


def install(stream=None) -> Progress:
    """Report progress of every notebook papermill runs in this process (its default engine)."""
    global CURRENT
    if stream is not None:
        CURRENT = Progress(stream)
    papermill_engines.register(None, ProgressEngine)
    papermill_engines.register("progress", ProgressEngine)
    return CURRENT


def start_stack(env: dict[str, str]) -> None:
    """Start the embedded services this configuration relies on, one by one, saying how long each took
    (a running one is reused and says so)."""
    needed = [s for s, embedded in (("object_store", config.uses_embedded_store(env)),
                                    ("database", config.uses_embedded_db(env))) if embedded]
    if not needed:
        return
    sdir = config.state_dir(env)
    state = stack.status(sdir)
    for service in needed:
        if state.get(service, {}).get("running"):
            CURRENT.line(f"{LABELS[service]}: running already")
            continue
        CURRENT.service(service, lambda service=service: stack.up(sdir, (service,)))
