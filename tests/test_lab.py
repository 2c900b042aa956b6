"""lib/lab.py: JupyterLab's command line (an option the user gives replaces the project's default),
and the save hook, in a real clone with the project's git filters: a stage notebook saved with its
outputs and the kernel's metadata is not listed by `git status`; a real change still is, unstaged."""

from __future__ import annotations

import json
import subprocess

from lib import config, lab

NOTEBOOK = "notebooks/01_ingest.ipynb"


def git(clone, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=clone, check=True, capture_output=True, text=True).stdout


def save_as_the_lab_does(path, edit=None) -> None:
    """The notebook as JupyterLab saves it after Run All: outputs, counts, the kernel's language_info."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    for n, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["execution_count"] = n + 1
        cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": [f"output of cell {n + 1}\n"]}]
    nb["metadata"]["language_info"] = {
        "codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py", "mimetype": "text/x-python",
        "name": "python", "nbconvert_exporter": "python", "pygments_lexer": "ipython3", "version": "3.11.7"}
    if edit:
        edit(nb)
    path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def test_the_lab_gets_the_project_defaults_and_any_option_replaces_its_default():
    args = lab.arguments([])
    assert f"--ServerApp.root_dir={config.ROOT}" in args and "--ServerApp.ip=127.0.0.1" in args
    assert "--LabApp.default_url=/lab/tree/notebooks" in args
    assert f"--ContentsManager.post_save_hook={lab.SAVE_HOOK}" in args

    given = ["--ip=0.0.0.0", "--notebook-dir", "/srv/x", "--port=8899"]
    args = lab.arguments(given)
    assert args[-len(given):] == given
    assert not [a for a in args[:-len(given)] if a.startswith(("--ServerApp.ip", "--ServerApp.root_dir"))]
    assert "--LabApp.default_url=/lab/tree/notebooks" in args


def test_a_notebook_saved_with_outputs_leaves_git_status_clean_and_a_real_change_listed_unstaged(project_clone):
    path = project_clone / NOTEBOOK
    save_as_the_lab_does(path)
    # What git stores is unchanged (the filter), but git lists the file: its size changed.
    assert git(project_clone, "status", "--porcelain") == f" M {NOTEBOOK}\n"

    lab.indexed_if_unchanged(path)
    assert git(project_clone, "status", "--porcelain") == ""
    assert git(project_clone, "diff", "--cached") == ""

    # A real change (a cell's source) is shown, and nothing is staged.
    save_as_the_lab_does(path, edit=lambda nb: nb["cells"][-1]["source"].append("\n# changed"))
    lab.indexed_if_unchanged(path)
    assert git(project_clone, "status", "--porcelain") == f" M {NOTEBOOK}\n"
    assert git(project_clone, "diff", "--cached") == ""


def test_the_save_hook_leaves_alone_a_notebook_git_does_not_track(project_clone, tmp_path):
    outside = tmp_path / "elsewhere" / "scratch.ipynb"
    outside.parent.mkdir()
    outside.write_text("{}", encoding="utf-8")
    lab.indexed_if_unchanged(outside)  # not in a git work tree: no error

    untracked = project_clone / "notebooks" / "scratch.ipynb"
    untracked.write_text("{}", encoding="utf-8")
    lab.indexed_if_unchanged(untracked)
    assert git(project_clone, "status", "--porcelain") == "?? notebooks/scratch.ipynb\n"
