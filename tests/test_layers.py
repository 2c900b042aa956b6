"""The house rules of lib/, enforced: its layers import downward only (import-linter, with the
contract in pyproject.toml naming every module), no lib module imports another inside a function,
a lazy import is a heavy third-party package named below with its reason, and no module is long."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from lib.config import ROOT

LIB = ROOT / "lib"
MAX_LINES = 600
# Third-party packages a lib module may import inside a function, each for the reason given: they
# cost a process that does not need them (the runner, `run_pipeline.py runs`, a kernel's start).
LAZY = {
    "pyarrow": "~0.2 s and ~80 MiB, needed only where Arrow tables are made",
    "numpy": "comes with pyarrow or pandas; imported beside them",
    "pandas": "~0.4 s: the runner and the command line check names and read records without frames",
    "pandera": "~0.2 s, only where rows are typed against the contract (stage 2): the runner proves and publishes without it",
    "sqlalchemy": "~0.15 s, only for the notebooks' history previews",
    "matplotlib": "~0.5 s, only where a picture is drawn",
    "papermill": "~1 s with nbformat's schemas; only the runner executes notebooks",
    "nbclient": "papermill's executor, imported with it",
    "nbconvert": "~0.5 s, only where notebook pages are rendered",
    "nbformat": "only where executed notebooks are read",
    "jsonschema": "imported ahead of papermill without its URI grammar (lib/runner.py import_papermill)",
    "jupyter_core": "Jupyter's paths and async helpers, only where a kernel is started",
    "jupyter_client": "only where a kernel is started",
    "IPython": "only inside a kernel, to watch its cells",
    "openlineage": "~0.2 s with attrs, only where an event is built: not in a kernel of the runner's runs",
    "cryptography": "only when the embedded stack makes its keys and certificates",
    "psutil": "only when the stack looks for who holds its ports",
    "psycopg2": "only where the embedded stack administers PostgreSQL",
    "apprise": "~0.3 s, only when an alert is sent",
}


def lib_modules() -> list[str]:
    """Every module of lib, as a dotted name (packages by their own name)."""
    out = []
    for path in sorted(LIB.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function of this file, in line order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    found.update((node.lineno, alias.name) for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    found.add((node.lineno, ("." * node.level) + (node.module or "")))
    return sorted(found)


def test_the_layers_contract_holds():
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_layers_contract_names_every_lib_module():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")
    named = [m.strip() for row in layers["layers"] for m in row.replace(":", "|").split("|")]
    assert sorted(named) == sorted(m for m in lib_modules() if m not in ("lib", "lib.stages"))


def test_no_lib_module_imports_another_inside_a_function():
    found = [f"{path.relative_to(ROOT)}:{line}: {module}"
             for path in sorted(LIB.rglob("*.py")) for line, module in function_imports(path)
             if module.startswith(".") or module == "lib" or module.startswith("lib.")]
    assert found == [], "a lib module imported inside a function hides a cycle: move the responsibility"


def test_a_lazy_import_is_a_heavy_third_party_package_with_a_reason():
    found = [f"{path.relative_to(ROOT)}:{line}: {module}"
             for path in sorted(LIB.rglob("*.py")) for line, module in function_imports(path)
             if module.split(".")[0] not in LAZY and not module.startswith(("lib", "."))]
    assert found == [], "import these at the top of the module, or name the package in LAZY with a reason"


def test_no_lib_module_is_longer_than_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in LIB.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checks_find_what_they_look_for(tmp_path):
    """The AST walk sees an import in a nested function and a lambda, relative or absolute."""
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef f():\n    def g():\n        from lib import db\n    from . import x\n"
                      "h = lambda: __import__('x')\n\nclass C:\n    def m(self):\n        import json\n")
    assert function_imports(sample) == [(5, "lib"), (6, "."), (11, "json")]


def test_what_the_runner_runs_itself_imports_no_frames():
    """The runner's own process (the report pages, the publish, the record) imports no pandas,
    NumPy, pyarrow or pandera: the kernel has them; importing them again costs every run ~0.5 s of
    CPU and ~60 MiB."""
    code = ("import sys, lib.runner, lib.report, lib.publish, lib.record_store, lib.endings\n"
            "print(sorted(m for m in ('pandas', 'numpy', 'pyarrow', 'pandera') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_runners_pages_import_no_ipython(tmp_path):
    """The runner renders its pages (warmed up, then an executed stage notebook) without IPython's
    lexers: the stage notebooks are coloured by pygments' Python lexer (~0.15 s of CPU less a run)."""
    code = ("import json, sys, pathlib, lib.report\n"
            "lib.report._warm_up()\n"
            "nb = json.loads(pathlib.Path('notebooks/01_ingest.ipynb').read_text())\n"
            "nb['metadata']['language_info'] = {'name': 'python', 'pygments_lexer': 'ipython3'}\n"
            "page = pathlib.Path(sys.argv[1]) / '01_ingest.ipynb'\n"
            "page.write_text(json.dumps(nb))\n"
            "lib.report.notebook_page(page)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'IPython')[:3])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert (tmp_path / "01_ingest.html").stat().st_size > 0
