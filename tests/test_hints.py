"""lib.hints: how a message spells a command of this project (tests/e2e/test_hints.py runs them)."""

from __future__ import annotations

import sys

from lib import hints


def project(tmp_path, monkeypatch):
    """A project folder with a `.venv`, as hints sees it."""
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    monkeypatch.setattr(hints, "_ROOT", tmp_path)
    return tmp_path


def test_a_hint_names_the_projects_venv_relative_to_the_project_folder(tmp_path, monkeypatch):
    root = project(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "executable", str(root / ".venv" / "bin" / "python"))
    assert hints.command("--resume", "r-1") == ".venv/bin/python run_pipeline.py --resume r-1"


def test_another_python_is_named_by_its_full_path_never_as_a_bare_python(tmp_path, monkeypatch):
    project(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "executable", "/opt/worker venv/bin/python3")
    assert hints.command("stack", "up") == "'/opt/worker venv/bin/python3' run_pipeline.py stack up"


def test_arguments_are_quoted_for_the_shell():
    assert hints.command("-p", "history_country=Côte d'Ivoire", python=".venv/bin/python") == \
        ".venv/bin/python run_pipeline.py -p 'history_country=Côte d'\"'\"'Ivoire'"


def test_a_python_without_the_packages_is_told_the_command_to_run_instead(tmp_path, monkeypatch):
    root = project(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    line = hints.missing_packages(ModuleNotFoundError("no", name="dotenv"), ["runs", "--json"])
    assert line == (f"run_pipeline.py: /usr/bin/python3 lacks the project's packages (no module named 'dotenv'); "
                    f"from {root} run: .venv/bin/python run_pipeline.py runs --json")
    (root / ".venv" / "bin" / "python").unlink()  # no .venv yet: make creates it
    line = hints.missing_packages(ModuleNotFoundError("no", name="dotenv"), ["--stages", "2-4"])
    assert line.endswith("run: make .venv/.installed && .venv/bin/python run_pipeline.py --stages 2-4")
