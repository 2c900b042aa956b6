"""What `run_pipeline.py lab` adds to JupyterLab: its command line, and a save hook that keeps `git
status` true.

JupyterLab saves a notebook with its outputs and the kernel's metadata; the git filter (`make
git-filters`: nbstripout) drops both, so what git stores of a stage notebook run and saved in the lab
is the committed file byte for byte. Git's status would still list the file: a tracked file whose
size differs from the size the index recorded counts as modified without its content being read.
So after each save `indexed_if_unchanged` asks git what the file cleans to and, when that is exactly
the content in the index, refreshes the file's index entry: nothing is staged, and a real change is
left for `git status` to show. It runs beside the lab (`after_save`): the clean filter is a Python
process, and a save does not wait for it.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from pathlib import Path

from lib import config

log = logging.getLogger(__name__)

GIT_TIMEOUT_S = 60  # the clean filter runs in it (a Python process)
SAVE_HOOK = f"{__name__}.after_save"
_ONE_AT_A_TIME = threading.Lock()  # two saves in a row: the second waits for the first's git


def arguments(argv: list[str]) -> list[str]:
    """JupyterLab's command line: the project's defaults, less those `argv` sets itself (JupyterLab
    refuses an option given twice), then `argv`."""
    defaults = {  # the option's spellings: its value
        ("--ServerApp.root_dir", "--notebook-dir", "--ServerApp.notebook_dir"): str(config.ROOT),
        ("--ServerApp.ip", "--ip"): "127.0.0.1",
        ("--LabApp.default_url",): "/lab/tree/notebooks",
        ("--ContentsManager.post_save_hook", "--FileContentsManager.post_save_hook"): SAVE_HOOK,
    }
    given = {arg.split("=", 1)[0] for arg in argv}
    chosen = [f"{spellings[0]}={value}" for spellings, value in defaults.items() if given.isdisjoint(spellings)]
    return chosen + argv


def after_save(model: dict, os_path: str, contents_manager=None, **_) -> None:
    """JupyterLab's post-save hook: `indexed_if_unchanged` for a saved notebook, in the background."""
    if model.get("type") == "notebook":
        threading.Thread(target=indexed_if_unchanged, args=(Path(os_path),), name="git index refresh",
                         daemon=True).start()


def indexed_if_unchanged(path: Path) -> None:
    """When notebook `path` is tracked by git and its cleaned content is what the index holds, refresh
    its index entry (`git update-index`), so that `git status` does not list it. Anything else (not
    in a git work tree, untracked, in a merge, a real change, git busy) is left as it is; nothing is
    raised."""
    with _ONE_AT_A_TIME:
        try:
            listed = _git(path.parent, "ls-files", "-z", "--stage", "--", path.name).split("\0")
            entries = [e for e in listed if e]
            if len(entries) != 1:
                return  # untracked, or unmerged
            meta, name = entries[0].split("\t", 1)
            _mode, blob, stage = meta.split()
            if stage != "0" or name != path.name:
                return
            if _git(path.parent, "hash-object", "--", path.name).strip() == blob:
                _git(path.parent, "update-index", "--", path.name)
        except (OSError, subprocess.SubprocessError) as err:
            log.debug("git's index entry of %s not refreshed: %s", path, err)


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True, text=True,
                          timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL).stdout
