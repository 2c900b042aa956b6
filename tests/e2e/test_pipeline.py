"""The whole pipeline through `run_pipeline.py`, as `make run` runs it: five notebooks, real services."""

from __future__ import annotations

import json

from lib import db_read, formats, registry, runs, storage


def manifest(settings, run_id):
    return json.loads((runs.run_dir(settings, run_id) / "manifest.json").read_text())


def test_full_run_reaches_every_layer_with_250_rows_and_runs_again(run_pipeline, settings, s3, pg, unique, api):
    table = f"e2e_{unique}"
    first = f"e2e-{unique}-1"
    res = run_pipeline("--run-id", first, "-p", f"table={table}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"run {first} SUCCEEDED" in res.stdout
    assert "run record:" in res.stdout and "manifest.json" in res.stdout

    m = manifest(settings, first)
    assert m["status"] == "succeeded"
    assert list(m["stages"]) == list(registry.NAMES)
    for stage, entry in m["stages"].items():
        assert entry["status"] == "succeeded", stage
        assert entry["rows_out"] == 250, stage
        executed = json.loads((runs.run_dir(settings, first) / f"{stage}.ipynb").read_text())
        # Each notebook ran as on a new kernel (the run's kernel is reset before each one).
        counts = [c.get("execution_count") for c in executed["cells"] if c["cell_type"] == "code"]
        assert counts == list(range(1, len(counts) + 1)), (stage, counts)
        for obj in entry["objects"]:
            if obj.get("role") != "database":
                assert len(obj["sha256"]) == 64 and obj["size"] > 0
    assert m["stack"]["object_store"]["kind"] == "embedded SeaweedFS"
    assert m["stack"]["cloud"]["kind"].startswith("emulated")
    assert m["stages"]["01_ingest"]["details"]["origin"] == "api"
    assert [r["status"] for r in m["reconciliation"]].count("MISMATCH") == 0

    # Every layer holds 250 countries.
    raw = m["stages"]["01_ingest"]["objects"][0]
    data, meta = storage.get_bytes(s3, raw["bucket"], raw["key"])
    assert len(json.loads(data)) == 250 and meta["run-id"] == first and meta["sha256"] == raw["sha256"]
    clean = m["stages"]["02_clean"]["objects"][0]
    assert len(formats.of_key(clean["key"]).decode(storage.get_bytes(s3, clean["bucket"], clean["key"])[0])) == 250
    assert len(db_read.current(pg, "public", table)) == 250
    export = m["stages"]["04_export"]["objects"][0]
    cloud = storage.cloud_client(settings.cloud)
    assert len(formats.CSV.decode(storage.get_bytes(cloud, export["bucket"], export["key"])[0])) == 250
    gold_obj = m["stages"]["05_gold"]["objects"][0]
    assert len(formats.of_key(gold_obj["key"]).decode(storage.get_bytes(s3, gold_obj["bucket"], gold_obj["key"])[0])) == 250
    # The API was asked with its 10 fields, once.
    assert len(api.requests) >= 1 and "fields=" in api.requests[-1]["path"]

    # The second run writes silver and gold in the other format: readers follow each key's format.
    other = next(f for f in formats.FORMATS if f != formats.DEFAULT_SILVER)
    second = f"e2e-{unique}-2"
    res = run_pipeline("--run-id", second, "-p", f"table={table}", "-p", f"silver_format={other}",
                       "-p", f"gold_format={other}")
    assert res.returncode == 0, res.stderr[-3000:]
    m2 = manifest(settings, second)
    assert m2["status"] == "succeeded"
    assert m2["stages"]["02_clean"]["objects"][0]["key"].endswith(f".{other}")
    assert m2["stages"]["05_gold"]["objects"][0]["key"].endswith(f".{other}")
    assert m2["stages"]["03_load"]["details"]["unchanged"] == 250
    assert m2["stages"]["05_gold"]["details"]["previous_run_id"] == first
    assert m2["stages"]["05_gold"]["details"]["changes"] == {"added": 0, "removed": 0, "changed": 0, "held": 0}
