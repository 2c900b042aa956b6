"""The committed stage notebooks are clean sources: no outputs, no execution counts, one
`parameters` cell whose every line is a typed, commented parameter (what papermill and
`run_pipeline.py -p` rely on), and the metadata JupyterLab writes when it saves them, less what the
git filter drops (`make git-filters`), so that saving one in the lab changes nothing git sees."""

from __future__ import annotations

import ast
import io
import json
import tokenize

import nbformat
import papermill
import pytest
from jupyter_client.kernelspec import KernelSpecManager

from lib import explore, registry

NOTEBOOKS = sorted(registry.NOTEBOOKS.glob("*.ipynb"))


def source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_every_stage_has_its_notebook_and_the_only_other_is_the_exploration_one():
    assert [p.stem for p in NOTEBOOKS if p != explore.NOTEBOOK] == list(registry.NAMES)
    assert explore.NOTEBOOK in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs_and_with_one_typed_commented_parameters_cell(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for n, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {n} has outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {n} has an execution count"
        else:
            assert "outputs" not in cell and "execution_count" not in cell, f"{path.name} cell {n}"

    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged parameters"
    cell = tagged[0]
    assert cell["cell_type"] == "code"
    text = source(cell)
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, f"{path.name}: empty parameters cell"

    statements = ast.parse(text).body
    assert len(statements) == len(lines), f"{path.name}: one parameter per line"
    comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                if tok.type == tokenize.COMMENT and tok.string.lstrip("#").strip()}
    for statement in statements:
        line = text.splitlines()[statement.lineno - 1]
        assert isinstance(statement, ast.AnnAssign) and statement.value is not None, \
            f"{path.name}: {line!r} is not `name: type = value`"
        assert isinstance(statement.target, ast.Name), f"{path.name}: {line!r}"
        assert statement.lineno in comments, f"{path.name}: {line!r} has no comment"

    # papermill reads the same: every parameter typed and explained; run_id first.
    declared = papermill.inspect_notebook(str(path))
    assert list(declared) == [s.target.id for s in statements]
    assert list(declared)[0] == "run_id"
    for name, info in declared.items():
        assert info["inferred_type_name"] in ("str", "int", "float", "bool"), (path.name, name, info)
        assert info["help"].strip(), (path.name, name)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_as_the_lab_saves_it_through_the_git_filter(path):
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    # The kernelspec the lab writes (papermill and the runner start it by its name); the kernel's
    # language_info (Python's version among it) is dropped by the filter.
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert nb["metadata"] == {"kernelspec": {"display_name": spec.display_name, "language": spec.language,
                                             "name": "python3"}}, path.name
    node = nbformat.reads(text, as_version=4)
    nbformat.validate(node)  # a kernelspec names its display_name
    assert papermill.utils.nb_kernel_name(node) == "python3"  # what papermill without -k starts
    # Written as nbformat (and so nbstripout) writes a notebook, byte for byte.
    assert text == json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n", path.name
