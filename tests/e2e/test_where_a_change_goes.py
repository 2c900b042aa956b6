"""The README's "Where a change goes", proven row by row: each test makes the change in a scratch copy
of the project (only the files the row names), then runs the affected stages through that copy's
`run_pipeline.py` on the test stack (the kernels are separate processes: only a real change in the
files reaches them), and checks what the change should have done."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from psycopg2 import sql

from lib import config, layout, storage
from tests.scratch import copy_project
from tests.sinks import HttpSink

ROOT = config.ROOT
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_row(change: str) -> str:
    """The files a row of the README's table names (the test checks it edits only those)."""
    found = re.search(rf"^\| {re.escape(change)} \| (.*) \|$", README, re.M)
    assert found, f"the README has no row {change!r}"
    return found.group(1)


class Scratch:
    """A copy of the project's tracked files; edits are checked to apply exactly once."""

    def __init__(self, path: Path, outputs: Path):
        self.path, self.outputs = path, outputs
        self.touched: set[str] = set()

    def edit(self, rel: str, old: str, new: str) -> None:
        file = self.path / rel
        text = file.read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{rel}: expected one {old!r}"
        file.write_text(text.replace(old, new), encoding="utf-8")
        self.touched.add(rel)

    def append(self, rel: str, text: str) -> None:
        with open(self.path / rel, "a", encoding="utf-8") as f:
            f.write(text)
        self.touched.add(rel)

    def notebook_cell(self, rel: str, after: str, source: str) -> None:
        """A code cell inserted after the first cell whose source contains `after`."""
        file = self.path / rel
        nb = json.loads(file.read_text(encoding="utf-8"))
        at = next(i for i, c in enumerate(nb["cells"]) if after in "".join(c["source"]))
        nb["cells"].insert(at + 1, {"cell_type": "code", "execution_count": None, "id": f"added{at}",
                                    "metadata": {}, "outputs": [], "source": source.splitlines(keepends=True)})
        file.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        self.touched.add(rel)

    def env(self, extra: dict | None = None) -> dict:
        return {**os.environ, "PYTHONPATH": str(self.path), "PIPELINE_OUTPUTS_DIR": str(self.outputs), **(extra or {})}

    def python(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=self.path, env=self.env(), capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(self.path / "run_pipeline.py"), *args], cwd=self.path,
                              env=self.env(env), capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)

    def manifest(self, run_id: str) -> dict:
        return json.loads((self.outputs / "runs" / run_id / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture
def scratch(tmp_path, embedded) -> Scratch:
    return Scratch(copy_project(tmp_path / "project"), tmp_path / "outputs")


def succeeded(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def stage_record(scratch: Scratch, run_id: str, stage: str) -> dict:
    return json.loads((scratch.outputs / "runs" / run_id / "stages" / f"{stage}.json").read_text(encoding="utf-8"))


def object_keys(scratch: Scratch, run_id: str, stage: str) -> list[str]:
    return [a["key"] for a in stage_record(scratch, run_id, stage)["artifacts"] if "key" in a]


def test_add_a_derived_column(scratch, settings, s3, pg, unique):
    assert "`lib/contract.py`" in readme_row("add a field (a new contract column)")
    table, first, second = f"col_{unique}", f"col-a-{unique}", f"col-b-{unique}"
    succeeded(scratch.run("--run-id", first, "-p", f"table={table}"))  # the table as it was
    scratch.edit("lib/contract.py", '''           value("timezones", []), rule="timezones"),
)''', '''           value("timezones", []), rule="timezones"),
    Column("language_count", "bigint", True, "how many languages",
           derived("languages", "number of `languages`", lambda r: len(r.get("languages") or {}))),
)''')
    doc = scratch.python("-m", "lib.contract")
    assert "| `language_count` | bigint | yes | number of `languages` | how many languages |" in doc.stdout
    succeeded(scratch.run("--run-id", second, "-p", f"table={table}"))
    with pg.cursor() as cur:
        cur.execute(sql.SQL("SELECT language_count FROM {} WHERE name_common = 'Switzerland'").format(
            sql.Identifier(table)))
        assert cur.fetchone() == (4,)  # the existing table got the column at the next load
    gold_key = next(k for k in object_keys(scratch, second, "05_gold") if layout.is_gold_table(k))
    data, _ = storage.get_bytes(s3, settings.gold_bucket, gold_key)
    assert "language_count" in pq.read_schema(io.BytesIO(data)).names
    details = stage_record(scratch, second, "05_gold")["details"]
    assert details["previous_run_id"] == first and sum(details["changes"].values()) > 0


def test_add_a_gold_aggregate(scratch, unique):
    assert "`lib/aggregates.py`" in readme_row("add a gold aggregate")
    scratch.append("lib/aggregates.py", '''

@aggregate
def countries_per_region(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.groupby("region").size().rename("countries").reset_index()
''')
    scratch.notebook_cell("notebooks/05_gold.ipynb", 'golden.aggregates["by_subregion"]',
                          'golden.aggregates["countries_per_region"]')
    run_id = f"agg-{unique}"
    succeeded(scratch.run("--run-id", run_id, "-p", f"table=agg_{unique}"))
    assert f"aggregates/run_id={run_id}/countries_per_region.parquet" in object_keys(scratch, run_id, "05_gold")
    page = (scratch.outputs / "runs" / run_id / "05_gold.ipynb").read_text(encoding="utf-8")
    assert "Oceania" in page and "countries_per_region" in page


def test_change_the_default_silver_and_gold_format(scratch, unique):
    assert "`DEFAULT_SILVER`" in readme_row("change the default silver (or gold) format")
    scratch.edit("lib/formats.py", 'DEFAULT_SILVER = "parquet"', 'DEFAULT_SILVER = "csv"')
    scratch.edit("lib/formats.py", 'DEFAULT_GOLD = "parquet"', 'DEFAULT_GOLD = "csv"')
    run_id = f"fmt-{unique}"
    succeeded(scratch.run("--run-id", run_id, "-p", f"table=fmt_{unique}"))
    assert any(k.endswith("/capitals_clean.csv") for k in object_keys(scratch, run_id, "02_clean"))
    assert any(layout.is_gold_table(k) and k.endswith(".csv") for k in object_keys(scratch, run_id, "05_gold"))


def test_add_a_file_format(scratch, settings, s3, unique):
    assert "`lib/formats.py`" in readme_row("add a file format")
    assert "`lib/stages/parameters.py`" not in README.split("add a file format")[1].split("\n")[0]
    scratch.edit("lib/formats.py", '''FORMATS = {''', '''def jsonl_encode(frame: pd.DataFrame) -> bytes:
    return frame.to_json(orient="records", lines=True, force_ascii=False).encode("utf-8")


def jsonl_read(data: bytes) -> pd.DataFrame:
    import pandas as pd

    return pd.read_json(io.BytesIO(data), orient="records", lines=True, dtype=False)


FORMATS = {
    "jsonl": Format("jsonl", "jsonl", "application/jsonl", jsonl_encode, jsonl_read),''')
    run_id = f"jsonl-{unique}"
    succeeded(scratch.run("--run-id", run_id, "-p", f"table=jsonl_{unique}", "-p", "silver_format=jsonl",
                          "-p", "gold_format=jsonl"))
    clean_key = next(k for k in object_keys(scratch, run_id, "02_clean") if layout.is_clean(k))
    gold_key = next(k for k in object_keys(scratch, run_id, "05_gold") if layout.is_gold_table(k))
    assert clean_key.endswith(".jsonl") and gold_key.endswith(".jsonl")
    rows = storage.get_bytes(s3, settings.gold_bucket, gold_key)[0].decode().splitlines()
    assert len(rows) == 250 and json.loads(rows[0])["name_common"]


def test_add_a_stage(scratch, unique):
    files = readme_row("add a stage")
    assert all(f in files for f in ("`notebooks/`", "`lib/registry.py`", "`lib/stages/<name>.py`",
                                    "`lib/stages/parameters.py`"))
    scratch.edit("lib/registry.py", '''    GOLD = ("gold", "gold")''', '''    GOLD = ("gold", "gold")
    SUMMARY = ("summary", "summary")''')
    scratch.edit("lib/registry.py", '''          reconciles=True),
)''', '''          reconciles=True),
    Stage(6, "06_summary", "gold → a one-line summary", frozenset({"store"}),
          reads=(Layer.GOLD,), writes=(Layer.SUMMARY,)),
)''')
    scratch.edit("lib/stages/parameters.py", '''    "gold": {''', '''    "summary": {
        "run_id": RUN_ID,
    },
    "gold": {''')
    (scratch.path / "lib/stages/summary.py").write_text('''"""Stage 6: gold → a one-line summary of the run's gold table."""

from __future__ import annotations

import json

from lib import layout, storage
from lib.registry import Layer
from lib.stages.context import StageRun


def run(stage: StageRun) -> dict:
    gold = stage.previous_record(Layer.GOLD)
    table = next(a for a in gold["artifacts"] if layout.is_gold_table(a["key"]))
    summary = {"run_id": stage.run_id, "gold_rows": table["rows"]}
    s3 = storage.client(stage.settings.store)
    artifact = storage.put_bytes(s3, stage.settings.gold_bucket, f"summary/run_id={stage.run_id}/summary.json",
                                 json.dumps(summary).encode(), metadata=stage.meta(), rows=1,
                                 content_type="application/json", inputs=[f"s3://{table['bucket']}/{table['key']}"])
    stage.record.output(artifact)
    stage.record.update(rows_in=table["rows"], rows_out=1)
    return summary
''', encoding="utf-8")
    nb = json.loads((scratch.path / "notebooks/05_gold.ipynb").read_text(encoding="utf-8"))
    nb["cells"] = [
        {"cell_type": "code", "execution_count": None, "id": "p", "metadata": {"tags": ["parameters"]}, "outputs": [],
         "source": ['run_id: str = ""  # empty: the latest run in outputs/runs']},
        {"cell_type": "code", "execution_count": None, "id": "b", "metadata": {}, "outputs": [],
         "source": ["from lib.stages import context, summary\n", 'stage = context.begin("06_summary", globals())\n',
                    "summary.run(stage)"]},
        {"cell_type": "code", "execution_count": None, "id": "f", "metadata": {}, "outputs": [],
         "source": ["stage.finish()"]},
    ]
    (scratch.path / "notebooks/06_summary.ipynb").write_text(json.dumps(nb, indent=1) + "\n", encoding="utf-8")
    run_id = f"six-{unique}"
    res = scratch.run("--run-id", run_id, "-p", f"table=six_{unique}")
    succeeded(res)
    assert "06_summary" in res.stdout
    manifest = scratch.manifest(run_id)
    assert manifest["stages"]["06_summary"]["status"] == "succeeded"
    report = (scratch.outputs / "runs" / run_id / "report.html").read_text(encoding="utf-8")
    assert ">summary</text>" in report  # the lineage picture has the new stage's column
    index = (scratch.outputs / "index.html").read_text(encoding="utf-8")
    assert "summary" in index


def test_move_where_objects_are_written(scratch, run_pipeline, settings, s3, unique):
    assert "`lib/layout.py`" in readme_row("move where objects are written")
    table, first, second = f"move_{unique}", f"move-a-{unique}", f"move-b-{unique}"
    succeeded(scratch.run("--run-id", first, "-p", f"table={table}"))  # written where they were
    scratch.edit("lib/layout.py", 'DATASET = "countries"', 'DATASET = "nations"')
    succeeded(scratch.run("--run-id", second, "-p", f"table={table}"))
    keys = object_keys(scratch, second, "05_gold")
    assert any(k.startswith("nations/") for k in keys) and not any(k.startswith("countries/") for k in keys)
    details = stage_record(scratch, second, "05_gold")["details"]
    # The change report still compares with the run before the move: nothing changed in the data.
    assert details["previous_run_id"] == first
    assert details["changes"] == {"added": 0, "removed": 0, "changed": 0, "held": 0}


def test_a_new_setting_or_secret(scratch, unique):
    files = readme_row("a new setting or secret")
    assert "`lib/config.py`" in files and "`.env.example`" in files
    scratch.edit("lib/config.py", "SECRET_SETTINGS = (", 'SECRET_SETTINGS = ("SAMPLE_TOKEN", ')
    scratch.edit("lib/config.py", '''    state_dir: Path
''', '''    state_dir: Path
    sample_token: Secret = Secret("")
''')
    scratch.edit("lib/config.py", '''        why=_why(env, fallback),
    )''', '''        why=_why(env, fallback),
        sample_token=Secret(env.get("SAMPLE_TOKEN", "")),
    )''')
    scratch.append(".env.example", "\n# A sample secret (masked everywhere)\nSAMPLE_TOKEN=\n")
    scratch.notebook_cell("notebooks/01_ingest.ipynb", "context.begin(",
                          'import logging\nlogging.getLogger("lib").warning("token %s", '
                          'stage.settings.sample_token.reveal())\nprint(stage.settings.sample_token)')
    sentinel = f"sentinel-{unique}-token"
    run_id = f"secret-{unique}"
    succeeded(scratch.run("--run-id", run_id, "--stages", "1", env={"SAMPLE_TOKEN": sentinel}))
    logs = Path(os.environ["PIPELINE_LOGS_DIR"])
    written = [p for where in (scratch.outputs, logs) for p in where.rglob("*") if p.is_file()]
    assert written and not [p for p in written if sentinel in p.read_text(encoding="utf-8", errors="replace")]
    notebook = (scratch.outputs / "runs" / run_id / "01_ingest.ipynb").read_text(encoding="utf-8")
    assert "token ***" in notebook and "Secret('***')" in notebook


def test_a_new_parameter_check(scratch, unique):
    assert "`lib/stages/parameters.py`" in readme_row("a new parameter check")
    scratch.edit("lib/stages/parameters.py",
                 '''"history_country": Parameter(str, "France", "a country whose recorded versions are shown"),''',
                 '''"history_country": Parameter(str, "France", "a country whose recorded versions are shown",
                                     lambda v: v if v.strip() else params.bad("history_country is empty")),''')
    res = scratch.run("--run-id", f"check-{unique}", "--stages", "3", "-p", "history_country= ")
    assert res.returncode == 2 and "history_country is empty" in res.stderr
    assert not (scratch.outputs / "runs" / f"check-{unique}").exists()  # refused before anything ran


def test_a_new_alert_condition(scratch, unique):
    assert "`reasons()` in `lib/alerts.py`" in readme_row("a new alert condition")
    scratch.edit("lib/alerts.py", '''    found = []
    stages = manifest.get("stages", {})''', '''    found = []
    stages = manifest.get("stages", {})
    gold = (stages.get("05_gold") or {}).get("details", {})
    if gold.get("gold_rows") is not None and gold["gold_rows"] < 1000:
        found.append(f"gold has only {gold['gold_rows']} rows")''')
    sink = HttpSink()
    try:
        run_id = f"alert-{unique}"
        succeeded(scratch.run("--run-id", run_id, "-p", f"table=alert_{unique}",
                              env={"ALERT_URLS": f"json://127.0.0.1:{sink.port}/hook"}))
        assert len(sink.posts) == 1 and "gold has only 250 rows" in sink.posts[0]["json"]["message"]
    finally:
        sink.close()
