"""`make lab` as a user meets it: JupyterLab started by `run_pipeline.py lab` on the test stack and
driven in a real headless Chromium. The lab serves a scratch clone of the project (its git filters set
by `make git-filters`, the real .venv reachable), so what saving writes lands in the clone.

A stage notebook opened, run top to bottom (Run All Cells) and saved (Ctrl+S) leaves `git status`
clean and a complete `lab-…` run (manifest, report, index row, OpenLineage events); a second notebook
in the same lab starts a run of its own that reads the latest published run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from playwright.sync_api import sync_playwright

from lib import config, lineage, runs
from tests.browser import launch
from tests.conftest import ROOT

# Bounds of the waits (each ends as soon as what it waits for is there; they only bound a hang).
LAB_START_S = 90
NOTEBOOK_RUN_S = 300
SAVE_S = 30


def wait_for(what: str, ready: Callable[[], object], bound_s: float, detail: Callable[[], str] = lambda: ""):
    """Poll `ready` until it returns something true (returned); fail saying what never came."""
    deadline = time.monotonic() + bound_s
    while True:
        found = ready()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {bound_s:.0f} s. {detail()}")
        time.sleep(0.25)


def git(clone: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=clone, check=True, capture_output=True, text=True).stdout


def assert_git_clean(clone: Path) -> None:
    """`git status` in the clone lists nothing (the lab's save hook refreshes git's index beside it)."""
    wait_for("git status lists nothing", lambda: git(clone, "status", "--porcelain") == "", SAVE_S,
             lambda: f"git status: {git(clone, 'status', '--porcelain')!r}; "
                     f"git diff: {git(clone, 'diff', '--no-textconv')[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server started as `run_pipeline.py lab` starts it, serving `root`."""

    def __init__(self, root: Path, scratch: Path):
        self.root = root
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = scratch / "lab.log"
        home = scratch / "jupyter"  # settings, workspaces and runtime files of this lab only
        env = {**os.environ,
               # the kernels import the lib under test (the notebooks are the clone's)
               "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
               "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
               "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
               "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "run_pipeline.py"), "lab", "--no-browser", f"--port={self.port}",
                 "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                 f"--ServerApp.root_dir={root}"],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.kernels: dict[int, psutil.Process] = {}

    def log_tail(self, chars: int = 3000) -> str:
        return "JupyterLab's log ends: " + self.log.read_text(encoding="utf-8", errors="replace")[-chars:]

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            body = answer.read()
        return json.loads(body) if body else None

    def started(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {self.process.returncode}. {self.log_tail()}")
        try:
            return bool(self.api("status"))
        except OSError:
            return False

    def kernel_state(self, notebook: str) -> str | None:
        """The execution state of the kernel of `notebook` (a path under the root), None before it has one."""
        for session in self.api("sessions"):
            if session["path"] == notebook:
                self._note_kernels()
                return session["kernel"]["execution_state"]
        return None

    def _note_kernels(self) -> None:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            self.kernels.setdefault(child.pid, child)

    def stop(self) -> None:
        """Shut the server down with its kernels; whatever outlives it is killed."""
        if self.process.poll() is None:
            try:
                self._note_kernels()
                self.api("shutdown", method="POST")
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, psutil.Error):
                self.process.kill()
                self.process.wait(timeout=30)
        for process in self.kernels.values():
            try:
                if process.is_running():
                    process.kill()
            except psutil.Error:
                pass


@pytest.fixture
def lab(embedded, project_clone, tmp_path):
    server = Lab(project_clone, tmp_path)
    try:
        wait_for("JupyterLab answering", server.started, LAB_START_S, server.log_tail)
        yield server
    finally:
        server.stop()


@contextmanager
def evidence(page, lab: Lab, where: Path):
    """On failure: a screenshot of the page in the test's tmp folder, and the lab's log, in the report."""
    try:
        yield
    except BaseException as err:
        shot = where / "lab-failure.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
            err.add_note(f"screenshot: {shot}")
        except Exception as shot_err:  # noqa: BLE001 - the failure itself matters more
            err.add_note(f"no screenshot ({shot_err})")
        err.add_note(lab.log_tail())
        raise


CELL_STATE = """() => {
  const panel = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => !p.classList.contains('lm-mod-hidden'));
  if (!panel) return null;
  const cells = [...panel.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  const prompts = cells.map(c => (c.querySelector('.jp-InputArea-prompt') || {}).textContent || '');
  const last = cells[cells.length - 1];
  return {
    prompts,
    running: prompts.some(p => p.includes('*')),
    started: prompts.some(p => /\\d/.test(p)),
    lastOutputs: last ? last.querySelectorAll('.jp-OutputArea-output').length : 0,
    errors: [...panel.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
      .map(e => e.textContent.slice(0, 2000)),
  };
}"""


def saved_outputs(path: Path) -> int:
    """How many outputs the last code cell of the notebook on disk holds (what the lab saved)."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError):
        return 0
    code = [c for c in cells if c["cell_type"] == "code"]
    return len(code[-1].get("outputs", [])) if code else 0


def run_and_save(page, lab: Lab, notebook: str) -> None:
    """Open `notebook` in the lab, Run All Cells from the Run menu, wait until its kernel is idle and the
    last cell has output, then save it with Ctrl+S."""
    page.goto(f"{lab.url}/lab/tree/{notebook}?token={lab.token}")
    wait_for(f"{notebook}: its kernel started and idle", lambda: lab.kernel_state(notebook) == "idle",
             LAB_START_S, lab.log_tail)
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").first.click()
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

    def finished():
        state = page.evaluate(CELL_STATE)
        if state and state["started"] and not state["running"] and lab.kernel_state(notebook) == "idle":
            return state
        return None

    state = wait_for(f"{notebook}: every cell run", finished, NOTEBOOK_RUN_S,
                     lambda: f"cells: {page.evaluate(CELL_STATE)}")
    assert state["lastOutputs"] > 0, f"{notebook}: the last cell shows nothing; stderr: {state['errors']}"

    page.keyboard.press("Control+s")
    wait_for(f"{notebook}: saved with its outputs", lambda: saved_outputs(lab.root / notebook) > 0, SAVE_S)
    wait_for(f"{notebook}: no unsaved changes left",
             lambda: page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty").count() == 0, SAVE_S)


def lab_runs(outputs: Path) -> set[str]:
    folder = outputs / "runs"
    return {p.name for p in folder.iterdir() if p.name.startswith("lab-")} if folder.is_dir() else set()


def assert_complete_lab_run(settings, run_id: str, stage: str) -> dict:
    folder = runs.run_dir(settings, run_id)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["origin"] == "jupyterlab", manifest
    assert manifest["started"] and manifest["ended"] and manifest["ended"] >= manifest["started"], manifest
    assert manifest["requested_stages"] == [stage], manifest
    assert manifest["stages"][stage]["status"] == "succeeded", manifest["stages"]
    assert manifest["status"] == "succeeded" and manifest["published"] == []
    page = folder / "report.html"
    assert page.is_file() and run_id in page.read_text(encoding="utf-8")
    index = (settings.outputs_dir / "index.html").read_text(encoding="utf-8")
    assert f'href="runs/{run_id}/report.html"' in index
    kinds = [e["eventType"] for e in lineage.read_events(folder) if e["job"]["name"].endswith(stage)]
    assert kinds == ["START", "COMPLETE"], kinds
    return manifest


def test_a_stage_notebook_run_and_saved_in_the_lab_leaves_git_clean_and_a_complete_lab_run(
        run_pipeline, settings, lab, tmp_path, unique):
    # A published runner run first: what a notebook that does not start at stage 1 reads.
    base = f"labbase-{unique}"
    res = run_pipeline("--run-id", base)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    outputs = config.outputs_dir()
    before = lab_runs(outputs)

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            with evidence(page, lab, tmp_path):
                run_and_save(page, lab, "notebooks/01_ingest.ipynb")
                assert_git_clean(lab.root)

                ingest = lab_runs(outputs) - before
                assert len(ingest) == 1, ingest
                ingest_run = ingest.pop()
                assert_complete_lab_run(settings, ingest_run, "01_ingest")

                # Another notebook in the same lab: its kernel, its own run, reading the latest published run.
                run_and_save(page, lab, "notebooks/02_clean.ipynb")
                assert_git_clean(lab.root)
        finally:
            browser.close()

    clean = lab_runs(outputs) - before - {ingest_run}
    assert len(clean) == 1, clean
    clean_run = clean.pop()
    manifest = assert_complete_lab_run(settings, clean_run, "02_clean")
    assert manifest["based_on"] == base
    raw = json.loads((runs.run_dir(settings, base) / "manifest.json").read_text())["stages"]["01_ingest"]["objects"]
    assert manifest["stages"]["02_clean"]["objects"][0]["inputs"] == [raw[0]["uri"]]
