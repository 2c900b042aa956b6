"""lib.runner: preflight against real services, and the summary lines a run ends with."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from lib import config, registry, runner
from lib import kernels as kernels_

ROOT = config.ROOT

ALL = list(registry.NAMES)
CLOSED_API = {"01_ingest": {"api_url": "http://127.0.0.1:9/v3.1/all?fields=name"}}


def test_summary_line_shows_rows_objects_snapshot_and_errors():
    ok = runner.summary_line("01_ingest", {"status": "succeeded", "duration_s": 1.5, "rows_in": 250,
                                             "rows_out": 250, "objects": [{"uri": "s3://raw/k"}],
                                             "details": {"origin": "snapshot"}})
    assert "rows 250 → 250" in ok and "s3://raw/k" in ok and "BUNDLED SNAPSHOT" in ok
    failed = runner.summary_line("03_load", {"status": "failed", "duration_s": 0.2, "error": "x" * 500})
    assert "failed" in failed and "x" * 200 in failed and "x" * 201 not in failed


def test_summary_line_escapes_control_characters_of_errors_and_keys():
    failed = runner.summary_line("02_clean", {"status": "failed", "duration_s": 0.2,
                                              "error": "cell [3]: ValueError: Evil\rLand\x1b[31m\u202eRed\nnext"})
    assert failed.endswith("ValueError: Evil\\rLand\\x1b[31m\\u202eRed\\nnext")
    ok = runner.summary_line("05_gold", {"status": "succeeded", "objects": [{"uri": "s3://gold/a\x1b]0;title\x07"}]})
    assert "s3://gold/a\\x1b]0;title\\x07" in ok


# --- preflight (real services) ----------------------------------------------------------------------

def test_preflight_with_every_service_up_finds_no_problem(settings):
    assert runner.preflight(settings, ALL, {}) == []


def test_preflight_names_an_unreachable_api_when_fallback_is_off(settings):
    off = dataclasses.replace(settings, snapshot_fallback=False)
    problems = runner.preflight(off, ["01_ingest"], CLOSED_API)
    assert len(problems) == 1 and "unreachable" in problems[0] and "fallback is off" in problems[0]
    on = dataclasses.replace(settings, snapshot_fallback=True)
    hints: dict = {}
    assert runner.preflight(on, ["01_ingest"], CLOSED_API, hints) == []
    # Stage 1 will not spend its retry budget on an API the preflight found unreachable.
    assert hints == {"01_ingest": {"max_attempts": 1}}


def test_preflight_gives_no_hint_for_a_reachable_api(settings):
    hints: dict = {}
    assert runner.preflight(settings, ["01_ingest"], {}, hints) == [] and hints == {}


def test_papermill_is_imported_without_the_iri_grammar_and_still_validates_notebooks():
    import subprocess
    import sys

    code = ("import sys; from lib import runner; pm = runner.import_papermill(); import nbformat; "
            "nb = nbformat.v4.new_notebook(); nb.cells.append(nbformat.v4.new_code_cell('1')); "
            "nbformat.validate(nb); nb.cells[0]['outputs'] = 'x'\n"
            "try:\n    nbformat.validate(nb)\nexcept nbformat.ValidationError:\n    print('invalid caught')\n"
            "print('rfc3987_syntax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["invalid", "caught", "False"]


def test_papermill_is_imported_without_pyarrow_which_stays_importable():
    import subprocess
    import sys

    code = ("import sys; from lib import runner; runner.import_papermill(); import papermill.iorw\n"
            "print('pyarrow' in sys.modules)\nimport pyarrow\nprint(pyarrow.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "pyarrow"]


def test_preflight_names_a_database_that_refuses_the_password(settings):
    db = dataclasses.replace(settings.db, password=config.Secret("not-the-password"))
    wrong = dataclasses.replace(settings, db=db)
    problems = runner.preflight(wrong, ["03_load"], {})
    assert len(problems) == 1 and problems[0].startswith("database:")
    assert "password authentication failed" in problems[0] and ":***@" in problems[0]
    assert "not-the-password" not in problems[0]


# --- the run's kernel (a real one) --------------------------------------------------------------------

def test_a_kernel_grown_past_the_limit_is_replaced_before_the_next_stage_and_a_small_one_is_kept(monkeypatch):
    kernels = kernels_.Kernels("python3", "kernel-test")
    try:
        first = kernels.take()
        assert first is not None and kernels.rss() > 0
        assert kernels.take() is first  # well under RECYCLE_MIB: the same kernel serves the next stage
        pid = first.provisioner.pid
        monkeypatch.setattr(kernels_, "RECYCLE_MIB", 0)  # as if the last stage had left it larger
        second = kernels.take()
        assert second is not None and second is not first and second.provisioner.pid != pid
        import psutil

        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        kernels.close()


def test_the_run_kernel_is_ipykernel_without_its_debugger_and_other_kernels_are_left_alone():
    from jupyter_core.utils import run_sync

    kernels = kernels_.Kernels("python3", "kernel-test")
    try:
        km = kernels.take()
        assert km is not None and km.kernel_spec.argv[1:3] == ["-m", "lib.kernel"]
        kc = km.client()
        kc.start_channels()
        try:
            reply = run_sync(kc.execute_interactive)(
                "import sys, ipykernel.debugger as d\n"
                "debugger = ('debugpy' in sys.modules and sys.modules['debugpy'] is not None, d._is_debugpy_available)",
                user_expressions={"out": "debugger", "lib": "'lib.stages' in sys.modules"}, timeout=60)
        finally:
            kc.stop_channels()
        found = reply["content"]["user_expressions"]
        assert found["out"]["data"]["text/plain"] == "(False, False)"
        assert found["lib"]["data"]["text/plain"] == "True"  # the preload ran
    finally:
        kernels.close()
    from jupyter_client.kernelspec import KernelSpec

    other = KernelSpec(argv=["python", "-m", "my_kernel", "-f", "{connection_file}"], language="python")
    kernels_.without_debugger(other)
    assert other.argv[1:3] == ["-m", "my_kernel"]
    kernels_.without_debugger(None)  # no spec (papermill's own kernel): nothing to do


def test_notebooks_run_one_after_another_on_the_run_kernel_through_one_client(tmp_path):
    """The first notebook connects to the run's kernel and checks it is ready (runner._until_ready,
    not jupyter_client's wait that ends by draining IOPub for 0.2 s); the next notebook keeps that
    client. Each notebook's outputs are its own, on a reset kernel."""
    import nbformat
    from jupyter_core.utils import run_sync
    from nbformat.v4 import new_code_cell, new_notebook

    papermill = runner.import_papermill()
    notebook = tmp_path / "in.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("x = 6 * 7"), new_code_cell("print(x)")]), notebook)
    kernels = kernels_.Kernels("python3", "kernel-test")
    try:
        km = kernels.take()
        assert km is not None and kernels.kc is None
        clients = []
        for n in (1, 2):
            out = tmp_path / f"out{n}.ipynb"
            papermill.execute_notebook(str(notebook), str(out), kernel_name="python3", progress_bar=False,
                                       engine_name=runner._engine_on_warm_kernel(), km=km, kernels=kernels)
            cells = nbformat.read(out, as_version=4).cells
            assert [c.execution_count for c in cells] == [1, 2]  # a reset kernel each time
            assert [o["text"] for o in cells[1].outputs] == ["42\n"]  # and only this cell's output
            clients.append(kernels.kc)
        assert clients[0] is not None and clients[0] is clients[1]
    finally:
        kernels.close()
    # A kernel that never answers is reported as such once the time given has passed.
    silent = kernels_.Kernels("python3", "kernel-test")
    try:
        km = silent.take()
        import signal

        run_sync(km.signal_kernel)(signal.SIGSTOP)
        kc = km.client()
        kc.start_channels()
        with pytest.raises(RuntimeError, match="didn't respond in 2 seconds"):
            run_sync(runner._until_ready)(kc, 2)
        kc.stop_channels()
        run_sync(km.signal_kernel)(signal.SIGCONT)
    finally:
        silent.close()


def test_the_run_kernel_draws_the_index_trends_and_the_index_shows_them(tmp_path):
    from lib import report, runs

    runs.write_json(runs.manifest_path(tmp_path, "r-1"), {
        "run_id": "r-1", "status": "succeeded", "started": "2026-11-28T10:00:00+00:00",
        "ended": "2026-11-28T10:00:09+00:00", "requested_stages": ["01_ingest"],
        "stages": {"01_ingest": {"status": "succeeded", "duration_s": 1.2, "rows_out": 250}}})
    kernels = kernels_.Kernels("python3", "kernel-test")
    try:
        assert kernels.take() is not None
        assert kernels.draw_trends(tmp_path)() is None  # not connected yet: the caller draws them
        kernels.kc = kernels.km.client()
        kernels.kc.start_channels()
        pictures = kernels.draw_trends(tmp_path)()
        assert pictures == {"rows": "trend-rows.png", "durations": "trend-durations.png", "regions": None}
        assert (tmp_path / "trend-rows.png").read_bytes()[:4] == b"\x89PNG"
        page = report.write_index(tmp_path, pictures).read_text()
        assert 'src="trend-durations.png"' in page and "No run has these figures yet" in page
        (tmp_path / "a-file").write_text("not a folder")
        assert kernels.draw_trends(tmp_path / "a-file" / "outputs")() is None  # the kernel's error: the caller draws
    finally:
        kernels.close()


def test_the_run_kernel_starts_before_papermill_and_the_services_clients_are_imported():
    """run_pipeline.py starts the run's kernel with what it has imported by then (lib/kernels.py and
    the modules that read its arguments), so that the kernel boots while the runner imports the rest:
    none of that rest may come in with them."""
    code = ("import sys\nimport run_pipeline\n"
            "heavy = sorted(m for m in ('papermill', 'nbclient', 'nbconvert', 'boto3', 'botocore', 'psycopg2', "
            "'sqlalchemy', 'pandas', 'pyarrow', 'requests', 'lib.runner', 'lib.record_store', 'lib.storage') "
            "if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "run_pipeline.import_the_rest()\nassert 'lib.runner' in sys.modules and run_pipeline.runner.preflight\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_kernel_specs_are_found_where_jupyter_looks_without_importing_ipython(tmp_path):
    """The runner finds the kernel (the venv's python3, or one in $IPYTHONDIR/kernels) without the
    IPython import jupyter_client's default costs."""
    spec_dir = tmp_path / "ipython" / "kernels" / "medallion-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": ["python", "-m", "ipykernel_launcher", "-f",
                                                               "{connection_file}"],
                                                      "display_name": "test", "language": "python"}))
    code = ("import sys\nfrom lib import kernels\nspecs = kernels.kernel_specs()\n"
            "assert specs.get_kernel_spec('python3').language == 'python'\n"
            "assert specs.get_kernel_spec('medallion-test').display_name == 'test'\n"
            "assert 'IPython' not in sys.modules, 'IPython was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")})
    assert done.returncode == 0, done.stderr
