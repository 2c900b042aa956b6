"""`make screenshots`: the README's and docs/review.md's pictures, from fresh runs: docs/index.png
(the run index), docs/report.png (a runner run's report) and docs/lab-report.png (the report of a
notebook run from JupyterLab), each in a 1,280 px wide window.

The runs are made for the pictures, in a folder of their own (your outputs/ is left alone), on the
stack `make run` uses: two runs of the runner, then stage 2 run as JupyterLab runs a notebook (its
kernel carries JPY_SESSION_NAME, so it is a `lab-…` run reading the latest published run)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a script beside the project: `tests` is not installed

from lib import registry, report, review, runs  # noqa: E402
from tests.browser import launch  # noqa: E402

WIDTH = 1280


def fresh_runs(outputs: Path) -> None:
    env = {**os.environ, "PIPELINE_OUTPUTS_DIR": str(outputs)}
    for _ in range(2):
        subprocess.run([sys.executable, "run_pipeline.py"], cwd=ROOT, env=env, check=True)
    notebook = registry.get("02_clean").notebook
    subprocess.run([str(Path(sys.executable).with_name("papermill")), str(notebook), str(outputs / "lab.ipynb"),
                    "--log-level", "WARNING"], cwd=ROOT, check=True,
                   env={**env, "JPY_SESSION_NAME": f"notebooks/{notebook.name}"})


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="medallion-screenshots-") as folder:
        outputs = Path(folder)
        fresh_runs(outputs)
        newest = review.summaries(outputs)
        runner_run = next(s["run_id"] for s in newest if s["origin"] == "runner")
        lab_run = next(s["run_id"] for s in newest if s["origin"] == "jupyterlab")
        pictures = {"index.png": report.write_index(outputs),
                    "report.png": report.write(runs.runs_dir(outputs) / runner_run),
                    "lab-report.png": report.write(runs.runs_dir(outputs) / lab_run)}
        with sync_playwright() as p:
            browser = launch(p)
            for target, source in pictures.items():
                page = browser.new_page(viewport={"width": WIDTH, "height": 900})
                page.goto(source.resolve().as_uri(), wait_until="load")
                wide = page.evaluate("document.documentElement.scrollWidth")
                if wide > WIDTH:
                    print(f"{source.name} is {wide} px wide, more than {WIDTH}", file=sys.stderr)
                page.screenshot(path=str(ROOT / "docs" / target), full_page=True)
                print(ROOT / "docs" / target)
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
