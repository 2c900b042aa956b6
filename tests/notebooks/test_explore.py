"""The exploration notebook runs top to bottom and shows every layer of a run: its rows come from the
objects the run's record lists and the table as of the run, read with the pipeline's settings."""

from __future__ import annotations

from pathlib import Path

import papermill

from lib import config, explore, runs
from lib.registry import Layer
from tests.notebooks.helpers import manifest

ROOT = Path(__file__).resolve().parents[2]


def shown_rows(cell) -> int:
    """The rows of the table a cell displayed (its text/html output), 0 when it showed none."""
    for out in cell.get("outputs", []):
        html = out.get("data", {}).get("text/html", "")
        if "<table" in "".join(html):
            body = "".join(html).split("<tbody>", 1)[-1]
            return body.count("<tr")
    return 0


def test_the_exploration_notebook_shows_every_layer_of_the_latest_published_run(run_pipeline, settings, tmp_path,
                                                                                 unique):
    run_id = f"explore-{unique}"
    res = run_pipeline("--run-id", run_id)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "explore.ipynb"
    nb = papermill.execute_notebook(str(explore.NOTEBOOK), str(out), parameters={"rows": 3}, cwd=str(ROOT),
                                    kernel_name="python3", progress_bar=False)
    text = "".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", ""))
                   for c in nb.cells for o in c.get("outputs", []))
    assert f"run {run_id}: succeeded" in text  # empty run_id: the latest published run
    layers = {c.source.split("explore.read(run, ")[1].split(")")[0].strip("\"'"): c for c in nb.cells
              if c.cell_type == "code" and "explore.read(run, " in c.source}
    assert set(layers) == {layer.value for layer in explore.LAYERS}
    for layer, cell in layers.items():
        expected = 0 if layer == Layer.QUARANTINE.value else 3
        assert shown_rows(cell) == expected, (layer, cell.get("outputs"))
    assert text.count("250 rows") == 3  # silver, the table as of the run, gold
    assert manifest(settings, run_id)["status"] == "succeeded"


def test_explore_reads_each_layer_as_the_run_recorded_it(run_pipeline, settings, unique):
    run_id = f"layers-{unique}"
    res = run_pipeline("--run-id", run_id, "-p", f"table=explore_{unique}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = explore.open_run(config.settings(), run_id)
    assert len(explore.read(run, "raw")) == 250 and "name" in explore.read(run, "raw")
    for layer in ("clean", "table", "cloud", "gold"):
        assert len(explore.read(run, layer)) == 250, layer
    assert explore.read(run, "quarantine").empty
    # A run that never got to a layer says so; a run that does not exist too.
    partial = f"partial-{unique}"
    assert run_pipeline("--run-id", partial, "--stages", "1").returncode == 0
    try:
        explore.read(explore.open_run(settings, partial), "gold")
    except explore.ExploreError as err:
        assert "05_gold did not succeed" in str(err)
    else:
        raise AssertionError("a run without gold showed gold")
    try:
        explore.open_run(settings, f"nope-{unique}")
    except explore.ExploreError as err:
        assert f"no run nope-{unique} in {runs.runs_dir(settings)}" in str(err)
    else:
        raise AssertionError("a missing run was opened")
