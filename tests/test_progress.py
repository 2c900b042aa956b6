"""lib.progress: the lines a run prints while it goes, from a real papermill execution."""

from __future__ import annotations

import io
import time

import nbformat
import papermill
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from papermill.engines import NBClientEngine, papermill_engines

from lib import progress


@pytest.fixture
def shown(monkeypatch):
    """Progress into a buffer (not a terminal: plain lines), the engine installed for this test only."""
    stream = io.StringIO()
    monkeypatch.setattr(progress, "SLOW_CELL_SECONDS", 0.6)
    progress.install(stream)
    yield stream
    papermill_engines.register(None, NBClientEngine)
    progress.CURRENT = progress.Progress()


def notebook(tmp_path, *sources) -> str:
    path = tmp_path / "in.ipynb"
    nb = new_notebook(cells=[new_markdown_cell("# title"), *(new_code_cell(s) for s in sources)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return str(path)


def test_a_stage_says_when_it_starts_ends_and_which_slow_cell_it_is_on(tmp_path, shown):
    papermill.execute_notebook(notebook(tmp_path, "x = 1", "import time; time.sleep(1.5)"),
                               str(tmp_path / "02_clean.ipynb"), kernel_name="python3", progress_bar=False)
    lines = shown.getvalue().splitlines()
    assert lines[0] == "02_clean: started (2 cells)"
    assert "02_clean: cell 2/2 still running after 1 s" in lines
    assert lines[-1].startswith("02_clean: done in ") and lines[-1].endswith(" s")
    assert "\r" not in shown.getvalue()  # no live line without a terminal


def test_a_failing_cell_is_named(tmp_path, shown):
    with pytest.raises(papermill.PapermillExecutionError):
        papermill.execute_notebook(notebook(tmp_path, "x = 1", "1 / 0", "y = 2"), str(tmp_path / "03_load.ipynb"),
                                   kernel_name="python3", progress_bar=False)
    assert shown.getvalue().splitlines()[-1].startswith("03_load: FAILED in cell [2] after ")


def test_starting_a_service_says_how_long_it_took(shown):
    progress.CURRENT.service("database", lambda: None)
    assert shown.getvalue().startswith("starting PostgreSQL … ready in ")

    def broken():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        progress.CURRENT.service("object_store", broken)
    assert "starting SeaweedFS (object store) … FAILED after " in shown.getvalue()


def test_on_a_terminal_the_cell_is_a_live_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    live = progress.Progress(Terminal())
    live.stage_start("05_gold", 3)
    live.cell_start(2, 3)
    for _ in range(50):  # the ticker redraws twice a second
        if "\r\033[K05_gold: cell 2/3" in live.stream.getvalue():
            break
        time.sleep(0.1)
    live.stage_end("05_gold", None)
    text = live.stream.getvalue()
    assert text.startswith("05_gold: started (3 cells)\n")
    assert "\r\033[K05_gold: cell 2/3 · " in text and "\r\033[K05_gold: done in " in text
