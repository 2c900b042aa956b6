"""Every command the README and docs/ show is run, as a reader would paste it: a document's commands
one after another, in the order they appear, in one bash session in a fresh scratch copy of the project
(tests/scratch.py: the suite's venvs linked, so make installs nothing), with its own embedded stack
(its `.state/`, on ports of this suite's worker, started by the first command that needs it and stopped at
the end), its own `outputs/` and `logs/`, and the suite's API server and environment otherwise. A
command that exits non-zero fails the test. What counts as a command, the placeholders and what is not
run: docs/testing.md, "Writing a command in the docs"."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from lib import stack
from tests.conftest import DOCS_PORT_BASE, NESTED_SUITE_PORT_BASE, ROOT
from tests.scratch import new_project

DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
SHELL_TAGS = {"bash", "sh", "shell"}
COMMAND = re.compile(r"(make|python3?|\.venv[\w-]*/bin/\S+)(\s|$)")
RUN_ID = re.compile(r"RUN_ID|<id>|<run_id>")
A_OR_B = re.compile(r"(?<=\s)[AB](?=\s|$)")
# The documented commands that are not run, each with its reason; a command starting with one of these
# is not run, nor are the commands after it in its code block (they may need it).
NOT_RUN = {
    "make test": "the suite itself",
    "make lab": "starts JupyterLab, which serves until it is stopped; tests/e2e/test_jupyterlab.py starts it as "
                "`run_pipeline.py lab` does and drives it",
    "make bench": "measures for minutes on a private stack of its own; tests/test_bench.py runs the benchmark small",
    "make airflow-venv": "installs Apache Airflow with pip (minutes); `make test` makes it before the suite runs",
    ".venv-airflow/bin/airflow dags test": "a whole DAG run through Airflow (a minute); tests/e2e/test_airflow.py "
                                           "runs `airflow dags test countries_medallion` on the suite's stack",
    "docker compose": "needs a Docker engine; tests/e2e/test_compose_path.py plays its services",
    "docker build": "needs a Docker engine; tests/test_dockerfile.py checks the Dockerfile with hadolint",
    "docker run": "needs a Docker engine and the image; tests/test_dockerfile.py checks its entrypoint",
    "kubectl ": "needs a Kubernetes cluster; tests/test_dockerfile.py checks the DAG example beside it",
    "aws ": "needs AWS credentials, and the secrets it reads",
}
PROJECT_VARS = ("PIPELINE_STATE_DIR", "PIPELINE_OUTPUTS_DIR", "PIPELINE_LOGS_DIR",  # the copy's own folders
                "MAKEFLAGS", "MFLAGS", "MAKELEVEL",  # a terminal, not a recipe of `make test`
                "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")  # nor a worker of it


@dataclass(frozen=True)
class Command:
    text: str
    line: int
    block: int  # the code block it is in (each table cell's command is a block of its own)


def complete(text: str) -> bool:
    """Whether bash reads `text` as whole commands (no open quote, `\\`, parenthesis or loop)."""
    return not text.endswith("\\") and subprocess.run(["bash", "-n"], input=text, capture_output=True,
                                                       text=True).returncode == 0


def shell_commands(body: list[tuple[int, str]], block: int) -> list[Command]:
    found, pending, start = [], [], 0
    for number, line in body:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        start = start if pending else number
        pending.append(line)
        if complete("\n".join(pending)):
            found.append(Command("\n".join(pending), start, block))
            pending = []
    assert not pending, f"line {start}: a command that never ends: {pending}"
    return found


def documented(markdown: str) -> tuple[list[Command], list[int]]:
    """The commands of a Markdown document, in order, and the lines of untagged code blocks that hold
    a command (which the convention refuses)."""
    lines, commands, untagged, block, i = markdown.splitlines(), [], [], 0, 0
    while i < len(lines):
        fence = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence.group(1)))
            body, tag, block = list(enumerate(lines[i + 1:end], start=i + 2)), fence.group(2), block + 1
            if tag in SHELL_TAGS:
                commands += shell_commands(body, block)
            elif tag == "console":
                commands += [Command(text[2:], n, block) for n, text in body if text.startswith("$ ")]
            elif not tag and any(COMMAND.match(t.strip()) or t.startswith("$ ") for _, t in body):
                untagged.append(i + 1)
            i = end + 1
            continue
        if lines[i].lstrip().startswith("|"):
            for span in re.findall(r"`([^`]+)`", lines[i]):
                if COMMAND.match(span):
                    block += 1
                    commands.append(Command(span, i + 1, block))
        i += 1
    return commands, untagged


def not_run(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


def read(document: str) -> str:
    return (ROOT / document).read_text(encoding="utf-8")


class Shell:
    """One bash session in a folder: each command runs as if pasted into the same terminal (what one
    exports or sets, the next sees); its output and exit code come back."""

    def __init__(self, cwd: Path, env: dict):
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, command: str, timeout: float = 900) -> tuple[int, str]:
        mark = f"--{uuid.uuid4().hex}--"
        self.proc.stdin.write(f"{{\n{command}\n}} < /dev/null\nprintf '\\n{mark} %d\\n' $?\n")
        self.proc.stdin.flush()
        out = []
        while (line := self.lines.get(timeout=timeout)) is not None:
            if line.startswith(mark):
                return int(line.split()[1]), "".join(out)
            out.append(line)
        return -1, "".join(out) + "\n(the shell ended)"

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


class Reader:
    """A scratch copy of the project and a shell in it, running one document's commands."""

    def __init__(self, document: str):
        self.document, self.project = document, new_project()
        env = {k: v for k, v in os.environ.items() if k not in PROJECT_VARS}
        env.update(PIPELINE_STACK_PORT_BASE=str(DOCS_PORT_BASE),
                   TEST_STACK_PORT_BASE=str(NESTED_SUITE_PORT_BASE),  # a documented pytest command's ports
                   PYTHONPATH=str(self.project))  # the venv's editable install points at the suite's checkout
        self.shell = Shell(self.project, env)

    def runs(self) -> list[dict]:
        found = [json.loads(p.read_text(encoding="utf-8")) for p in self.project.glob("outputs/runs/*/manifest.json")]
        return sorted(found, key=lambda m: m.get("started") or "")

    def needing(self, count: int, proven: bool) -> list[str]:
        """The ids of the newest `count` runs (published ones only, when `proven`), making runs first
        when the document made too few."""
        for _ in range(count + 1):
            chosen = [m["run_id"] for m in self.runs() if m.get("published") or not proven]
            if len(chosen) >= count:
                return chosen[-count:]
            self.run_ok("make run", " (a run for the placeholders)")
        raise AssertionError(f"{self.document}: `make run` left no published run in {self.project}/outputs")

    def substitute(self, command: str) -> str:
        if RUN_ID.search(command):
            command = RUN_ID.sub(self.needing(1, proven=True)[0], command)
        if A_OR_B.search(command):
            a, b = self.needing(2, proven=False)
            command = A_OR_B.sub(lambda m: {"A": a, "B": b}[m.group(0)], command)
        return command

    def run_ok(self, command: str, where: str) -> None:
        code, out = self.shell.run(command)
        assert code == 0, f"{self.document}{where}: `{command}` exited {code}:\n{out[-5000:]}"

    def close(self) -> None:
        self.shell.close()
        if (self.project / ".state" / "stack.json").exists():
            stack.down(self.project / ".state")
        shutil.rmtree(self.project.parent, ignore_errors=True)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_a_document_shows_runs(document):
    commands, untagged = documented(read(document))
    assert not untagged, (f"{document}: the code blocks at lines {untagged} hold commands but have no tag: "
                          "tag them `bash` (run by this test) or `text` (shown only)")
    runnable, stopped = [], set()
    for command in commands:
        if command.block in stopped or not_run(command.text):
            stopped.add(command.block)
        else:
            runnable.append(command)
    if not runnable:
        return
    reader = Reader(document)
    try:
        for command in runnable:
            reader.run_ok(reader.substitute(command.text), f":{command.line}")
    finally:
        reader.close()


def test_what_counts_as_a_command():
    commands, untagged = documented("""\
```bash
make run    # a comment stays
# a comment line is dropped
mkdir -p a && (for s in x y; do
  echo "$s"; done)
.venv/bin/python run_pipeline.py \\
    runs
```

```text
make run
```

```console
$ make stack-status
{"running": true}
```

```
make bench
```

| command | what |
| --- | --- |
| `make lab` / `--all` | `lib/contract.py`, `python -m lib.contract`, `.venv-airflow/` |
""")
    assert [(c.text, c.line) for c in commands] == [
        ("make run    # a comment stays", 2), ('mkdir -p a && (for s in x y; do\n  echo "$s"; done)', 4),
        (".venv/bin/python run_pipeline.py \\\n    runs", 6), ("make stack-status", 15), ("make lab", 25),
        ("python -m lib.contract", 25)]
    assert len({c.block for c in commands[:3]}) == 1 and commands[3].block != commands[4].block != commands[5].block
    assert untagged == [19]


def test_every_command_not_run_is_shown_somewhere():
    """The list of commands not run stays closed: an entry no document shows any more goes."""
    shown = [c.text for d in DOCUMENTS for c in documented(read(d))[0]]
    assert [start for start in NOT_RUN if not any(c.startswith(start) for c in shown)] == []


def test_the_commands_not_run_are_listed_for_doc_writers():
    testing = read("docs/testing.md")
    assert [start for start in NOT_RUN if f"`{start.strip()}`" not in testing] == []
