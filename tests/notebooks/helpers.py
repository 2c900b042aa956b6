"""Small helpers shared by the notebook tests: the snapshot, run records, executed notebooks, buckets."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pandas as pd

from lib import formats, runs, source, storage


def snapshot() -> list[dict]:
    """The 250 bundled REST Countries records (a fresh copy each call)."""
    return json.loads(source.snapshot_bytes())


def payload(records: list) -> bytes:
    return json.dumps(records, ensure_ascii=False).encode("utf-8")


def renamed(record: dict, common: str, **changes) -> dict:
    """A copy of a snapshot record under another name, with some fields changed."""
    out = copy.deepcopy(record)
    out["name"] = {"common": common, "official": f"Republic of {common}", "nativeName": {}}
    out.update(changes)
    return out


def by_name(records: list[dict]) -> dict[str, dict]:
    return {r["name"]["common"]: r for r in records}


def manifest(settings, run_id: str) -> dict:
    return json.loads((runs.run_dir(settings, run_id) / "manifest.json").read_text(encoding="utf-8"))


def executed(settings, run_id: str, stage: str) -> Path:
    return runs.run_dir(settings, run_id) / f"{stage}.ipynb"


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def cell_output(notebook: Path, needle: str) -> str:
    """The text an executed notebook shows under the first code cell whose source contains `needle`."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or needle not in _text(cell["source"]):
            continue
        texts = []
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                texts.append(_text(out["text"]))
            elif out["output_type"] == "error":
                texts.append(f"{out['ename']}: {out['evalue']}")
            elif "text/plain" in out.get("data", {}):
                texts.append(_text(out["data"]["text/plain"]))
        return "\n".join(texts)
    raise AssertionError(f"no code cell containing {needle!r} in {notebook}")


def counts_shown(notebook: Path) -> dict[str, int]:
    """The one-row counts table 02_clean shows after reading and validating, as {column: value}."""
    text = cell_output(notebook, "prepared.validated.counts")
    header, row = [line for line in text.splitlines() if line.strip()][:2]
    columns = ["raw objects", "records in", "clean", "quarantined", "superseded"]
    assert [c for c in columns if c in header] == columns, text
    values = row.split()[1:]  # the first value is the row index
    return dict(zip(columns, map(int, values)))


def keys_of_run(s3, bucket: str, run_id: str) -> list[str]:
    """Every key in `bucket` that belongs to `run_id` (the bucket is created when missing)."""
    storage.ensure_bucket(s3, bucket)
    return [o["key"] for o in storage.list_objects(s3, bucket) if f"/run_id={run_id}/" in o["key"]]


def read_object(s3, bucket: str, key: str) -> pd.DataFrame:
    """Any table object (quarantine, aggregates) as plain pandas reads it, by its format."""
    data, _ = storage.get_bytes(s3, bucket, key)
    if formats.of_key(key).name == "parquet":
        return pd.read_parquet(io.BytesIO(data))
    return pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[""])


def read_table(s3, bucket: str, key: str) -> pd.DataFrame:
    """A contract table object (silver, export, gold), typed, whatever its format."""
    return formats.of_key(key).decode(storage.get_bytes(s3, bucket, key)[0])


def table_exists(pg, schema: str, table: str) -> bool:
    with pg.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}"."{table}"',))
        return cur.fetchone()[0]


def scalar(pg, query, params=()):
    with pg.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchone()[0]
