"""A run that starts after stage 1 reads the data of the latest published run (or of the run named by
`-p input_run=RUN_ID`), through the runner as through a notebook; with nothing to read, the preflight
says so before anything runs."""

from __future__ import annotations

from lib import publish, runs
from tests.e2e.test_faults import manifest


def test_stages_2_to_4_of_a_new_run_read_the_latest_published_run(run_pipeline, settings, unique):
    table, first = f"doors_{unique}", f"doors-{unique}"
    res = run_pipeline("--run-id", first, "-p", f"table={table}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert publish.latest_published(settings, table) == first

    res = run_pipeline("--stages", "2-4", "-p", "write_mode=replace", "-p", f"table={table}", timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    second = res.stdout.split("run ", 1)[1].split(" ", 1)[0]
    m = manifest(settings, second)
    assert m["status"] == "succeeded" and m["based_on"] == first
    raw = manifest(settings, first)["stages"]["01_ingest"]["objects"][0]["uri"]
    assert m["stages"]["02_clean"]["objects"][0]["inputs"] == [raw]  # it read the published run's bronze
    assert m["stages"]["03_load"]["details"]["mode"] == "replace"
    assert publish.latest_published(settings, table) == first  # no stage 5: nothing was published

    # Told which run to read: that run's data, whatever is published.
    res = run_pipeline("--stages", "3", "-p", f"input_run={second}", "-p", f"table={table}", timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    third = res.stdout.split("run ", 1)[1].split(" ", 1)[0]
    assert manifest(settings, third)["based_on"] == second


def test_a_new_run_after_stage_1_with_nothing_to_read_stops_at_the_preflight(run_pipeline, settings, unique):
    table, run_id = f"unpublished_{unique}", f"nothing-{unique}"
    res = run_pipeline("--run-id", run_id, "--stages", "2-4", "-p", f"table={table}", timeout=120)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Preflight failed, nothing was run" in res.stderr
    assert f"table {table} has none yet" in res.stderr and "-p input_run=RUN_ID" in res.stderr
    assert "Traceback" not in res.stderr
    assert not runs.run_dir(settings, run_id).exists()

    res = run_pipeline("--stages", "2", "-p", "input_run=no-such-run", timeout=120)
    assert res.returncode == 1 and "there is no run no-such-run" in res.stderr


def test_a_run_says_which_services_it_is_on_and_why(run_pipeline, unique):
    res = run_pipeline("--stages", "1", "--run-id", f"why-{unique}", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("on embedded SeaweedFS (embedded: MINIO_URL is not set) + embedded PostgreSQL (embedded: DB_HOST is "
            "not set)") in res.stdout
    assert "snapshot fallback off (SNAPSHOT_FALLBACK=false from the environment)" in res.stdout
