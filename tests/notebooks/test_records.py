"""Run records nobody can rewrite: stage notebooks executed outside the runner (plain papermill, and
nbclient with the environment JupyterLab gives its kernels) start their own runs, never write into a
run the runner recorded, and every manifest is exactly what its stage records and attempts say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import papermill
import pytest

from lib import hints, lineage, registry, runs
from tests.notebooks.helpers import manifest

ROOT = Path(__file__).resolve().parents[2]


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder, byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_papermill(stage: str, out: Path, **parameters) -> None:
    """`papermill notebooks/<stage>.ipynb out.ipynb -p …`, as a user types it (no runner)."""
    papermill.execute_notebook(str(registry.get(stage).notebook), str(out), parameters=parameters,
                               cwd=str(ROOT), progress_bar=False, kernel_name="python3")


def run_like_jupyterlab(stage: str, **parameters) -> nbformat.NotebookNode:
    """Execute a stage notebook with nbclient and no runner, its kernel started with the environment
    a JupyterLab session gives it (JPY_SESSION_NAME)."""
    nb = nbformat.read(registry.get(stage).notebook, as_version=4)
    assignments = "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    nb.cells.insert(1, nbformat.v4.new_code_cell(assignments))  # as a user editing the parameters cell
    saved = os.environ.get("JPY_SESSION_NAME")
    os.environ["JPY_SESSION_NAME"] = f"notebooks/{stage}.ipynb"
    try:
        nbclient.NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}},
                                timeout=600).execute()
    finally:
        if saved is None:
            os.environ.pop("JPY_SESSION_NAME", None)
        else:
            os.environ["JPY_SESSION_NAME"] = saved
    return nb


def printed_run_id(nb) -> str:
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and "run id:" in out.get("text", ""):
                return out["text"].split("run id:", 1)[1].split()[0]
    raise AssertionError("the notebook printed no run id")


def assert_derived(settings, run_id: str) -> dict:
    """The saved manifest's stages are exactly what the stage records and their attempts say."""
    saved = manifest(settings, run_id)
    assert saved["stages"] == runs.derive_stages(settings, run_id)
    for stage, entry in saved["stages"].items():
        attempts = runs.attempt_paths(settings, run_id, stage)
        assert [a["record"] for a in entry["attempts"]] == [f"stages/{p.name}" for p in attempts]
    return saved


def test_notebooks_outside_the_runner_never_rewrite_a_runner_run(run_pipeline, settings, pg, tmp_path, unique):
    table, run_id = f"t_{unique}", f"rec-{unique}"
    res = run_pipeline("--run-id", run_id, "--stages", "1-5", "-p", f"table={table}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    folder = runs.run_dir(settings, run_id)
    before = files_of(folder)
    assert manifest(settings, run_id)["origin"] == "runner"

    # Naming the runner's run from papermill is refused, with how to re-run the stage properly.
    with pytest.raises(papermill.PapermillExecutionError) as refused:
        run_papermill("02_clean", tmp_path / "named.ipynb", run_id=run_id)
    assert refused.value.ename == "RecordClosed"
    assert hints.command("--stages", "2", "--run-id", run_id) in refused.value.evalue
    assert files_of(folder) == before

    # 03_load with its defaults: its own run, reading the latest published run's silver (the runner's).
    run_papermill("03_load", tmp_path / "load.ipynb", table=table)
    assert files_of(folder) == before  # not one byte of the runner's record changed
    own = runs.latest_run_id(settings)
    assert own.startswith("papermill-") and own != run_id
    mine = assert_complete(settings, own, ["03_load"])
    assert mine["origin"] == "papermill" and mine["based_on"] == run_id
    assert mine["status"] == "succeeded"
    load = mine["stages"]["03_load"]
    clean_uri = manifest(settings, run_id)["stages"]["02_clean"]["objects"][0]["uri"]
    assert load["objects"][0]["inputs"] == [clean_uri]  # it read the runner run's silver
    assert load["details"]["unchanged"] == 250 and load["details"]["batch_rows"] == 250


def assert_complete(settings, run_id: str, stages: list[str]) -> dict:
    """A run outside the runner has the record a runner run has, written by its last cell: start and
    end, its stages, lineage events (a START and an end for each stage attempt), its report and a
    linked row in the index."""
    saved = assert_derived(settings, run_id)
    assert saved["started"] and saved["ended"] and saved["ended"] >= saved["started"]
    assert saved["requested_stages"] == stages and list(saved["stages"]) == stages
    events = lineage.read_events(runs.run_dir(settings, run_id))
    for stage in stages:
        kinds = [e["eventType"] for e in events if e["job"]["name"].endswith(stage)]
        assert kinds[0] == "START" and kinds[-1] in ("COMPLETE", "FAIL"), kinds
    page = (runs.run_dir(settings, run_id) / "report.html").read_text(encoding="utf-8")
    assert run_id in page and "None s" not in page
    index = (settings.outputs_dir / "index.html").read_text(encoding="utf-8")
    assert f'href="runs/{run_id}/report.html"' in index
    return saved


def test_manifest_and_stage_records_agree_for_runner_papermill_and_jupyterlab_runs(
        run_pipeline, settings, tmp_path, unique):
    table, run_id = f"t_{unique}", f"agree-{unique}"
    # The runner: a stage executed again is kept as an attempt, its notebook too.
    for _ in range(2):
        res = run_pipeline("--run-id", run_id, "--stages", "1-2")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    saved = assert_derived(settings, run_id)
    assert saved["origin"] == "runner" and saved["status"] == "succeeded"
    for stage in ("01_ingest", "02_clean"):
        [attempt] = saved["stages"][stage]["attempts"]
        assert attempt["status"] == "succeeded" and attempt["notebook"] == f"{stage}.attempt1.ipynb"
        assert (runs.run_dir(settings, run_id) / attempt["notebook"]).exists()
        assert saved["stages"][stage]["origin"] == "runner"

    # Plain papermill: every execution starts its own papermill-… run; 02 reads 01's run when told so.
    run_papermill("01_ingest", tmp_path / "01.ipynb")
    first = runs.latest_run_id(settings)
    assert first.startswith("papermill-")
    assert_complete(settings, first, ["01_ingest"])
    run_papermill("02_clean", tmp_path / "02a.ipynb", input_run=first)
    own = runs.latest_run_id(settings)
    assert own.startswith("papermill-") and own != first
    run_papermill("02_clean", tmp_path / "02b.ipynb", run_id=own, min_records=200)  # again, in that run
    saved = assert_complete(settings, own, ["02_clean"])
    assert saved["origin"] == "papermill" and saved["based_on"] == first and saved["status"] == "succeeded"
    assert [a["status"] for a in saved["stages"]["02_clean"]["attempts"]] == ["succeeded"]
    assert saved["stages"]["02_clean"]["details"]["clean_rows"] == 250
    # A cell that fails outside the runner is recorded as failed: stage 4 without a load to export.
    with pytest.raises(papermill.PapermillExecutionError):
        run_papermill("04_export", tmp_path / "04.ipynb", run_id=own, table=table)
    saved = assert_complete(settings, own, ["02_clean", "04_export"])
    assert saved["stages"]["04_export"]["status"] == "failed" and saved["status"] == "failed"
    assert "03_load" in saved["stages"]["04_export"]["error"]

    # JupyterLab (nbclient, a session's environment, no runner): a lab-… run.
    nb = run_like_jupyterlab("01_ingest")
    lab = printed_run_id(nb)
    assert lab.startswith("lab-")
    saved = assert_complete(settings, lab, ["01_ingest"])
    assert saved["origin"] == "jupyterlab" and saved["notebook_session"] == "notebooks/01_ingest.ipynb"
    assert saved["stages"]["01_ingest"]["status"] == "succeeded"
    assert saved["stages"]["01_ingest"]["details"]["records"] == 250


def test_plain_papermill_on_the_command_line_leaves_its_own_complete_record(run_pipeline, settings, tmp_path,
                                                                           unique):
    """`papermill notebooks/02_clean.ipynb out.ipynb`, typed as the docs show it: its own papermill-…
    run reading the latest published run, a complete record linked from the index, and not one byte
    of any other run's folder changed."""
    published = f"pub-{unique}"
    res = run_pipeline("--run-id", published)
    assert res.returncode == 0, res.stderr[-3000:]
    assert run_pipeline("runs").returncode == 0  # runs earlier tests killed are marked abandoned now, not meanwhile
    base = runs.runs_dir(settings)
    before = {p.name: files_of(p) for p in base.iterdir() if p.is_dir()}
    papermill_cli = Path(sys.executable).with_name("papermill")
    done = subprocess.run([str(papermill_cli), "notebooks/02_clean.ipynb", str(tmp_path / "out.ipynb")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    new = sorted(set(p.name for p in base.iterdir() if p.is_dir()) - set(before))
    assert len(new) == 1 and new[0].startswith("papermill-"), new
    saved = assert_complete(settings, new[0], ["02_clean"])
    assert saved["based_on"] == published and saved["status"] == "succeeded"
    assert {name: files_of(base / name) for name in before} == before
