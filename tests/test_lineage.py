"""lib.lineage: OpenLineage events of real runs, checked against the OpenLineage spec's JSON schema
(tests/openlineage_spec/, see its README) and against the manifest's lineage; the HTTP transport
against a real local server that receives the events, as a Marquez server would, and against servers
that refuse, hang, answer slowly or fail, which must never hold a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from lib import contract, lineage, outbox, registry, runs
from tests.sinks import MISBEHAVING, HttpSink, Misbehaving, closed_port, timed

SPEC = Path(__file__).parent / "openlineage_spec"
CORE = "https://openlineage.io/spec/2-0-2/OpenLineage.json"


@pytest.fixture(scope="module")
def schemas() -> Registry:
    resources = []
    for path in SPEC.glob("*.json"):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


def spec_errors(event: dict, schemas: Registry) -> list[str]:
    """Errors of the event against the RunEvent schema, and of each facet against its own schema
    (found by its _schemaURL; a facet whose schema is not vendored is an error too)."""
    def check(instance, ref):
        validator = Draft202012Validator({"$ref": ref}, registry=schemas,
                                         format_checker=Draft202012Validator.FORMAT_CHECKER)
        return [f"{ref}: {e.message} at {list(e.absolute_path)}" for e in validator.iter_errors(instance)]

    errors = check(event, f"{CORE}#/$defs/RunEvent")
    facet_groups = [event["run"].get("facets", {}), event["job"].get("facets", {})]
    for ds in event.get("inputs", []) + event.get("outputs", []):
        facet_groups += [ds.get("facets", {}), ds.get("inputFacets", {}), ds.get("outputFacets", {})]
    for facets in facet_groups:
        for name, facet in facets.items():
            url = facet["_schemaURL"]
            base = url.split("#")[0]
            if not (SPEC / base.rsplit("/", 1)[1]).exists():
                errors.append(f"facet {name}: schema {url} not vendored")
                continue
            errors += check({name: facet}, base)
    return errors


def as_dataset(uri: str) -> tuple[str, str]:
    return lineage.dataset_name(uri)


# --- naming ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, expected", [
    ("s3://raw/countries/ingest_date=2026-11-28/run_id=r/countries.json",
     ("s3://raw", "countries/ingest_date=2026-11-28/run_id=r/countries.json")),
    ("postgresql://127.0.0.1:18335/countries/public.capitals_clean",
     ("postgres://127.0.0.1:18335", "countries.public.capitals_clean")),
    ("https://restcountries.com/v3.1/all?fields=name,area", ("https://restcountries.com", "/v3.1/all")),
    ("https://***@restcountries.com:8443/v3.1/all?fields=name&apikey=***", ("https://restcountries.com:8443", "/v3.1/all")),
    ("http://reader:pw@[::1]:8080/v3.1/all", ("http://[::1]:8080", "/v3.1/all")),
])
def test_dataset_names_follow_the_openlineage_conventions(uri, expected):
    assert lineage.dataset_name(uri) == expected


def test_the_bundled_snapshot_is_a_local_file_dataset():
    ns, name = lineage.dataset_name("bundled snapshot lib/data/countries_v3.1.json")
    assert ns == "file" and name.endswith("lib/data/countries_v3.1.json") and Path(name).is_file()


# --- a real run ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def marquez():
    """A real HTTP server standing in for a lineage service: it takes POST /api/v1/lineage."""
    sink = HttpSink(status=201)
    yield sink
    sink.close()


def test_a_full_run_emits_spec_valid_events_matching_the_manifest(run_pipeline, settings, unique, schemas,
                                                                  marquez):
    run_id, table = f"ol-{unique}", f"ol_{unique}"
    before = len(marquez.posts)
    res = run_pipeline("--run-id", run_id, "-p", f"table={table}",
                       env={"OPENLINEAGE_URL": f"http://127.0.0.1:{marquez.port}"})
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = runs.read_json(runs.manifest_path(settings, run_id))
    events = lineage.read_events(runs.run_dir(settings, run_id))

    # Two events per stage, START then COMPLETE, each valid against the spec and its facets' schemas.
    assert [(e["job"]["name"].rsplit(".", 1)[1], e["eventType"]) for e in events] == [
        (s, t) for s in registry.NAMES for t in ("START", "COMPLETE")]
    for event in events:
        assert spec_errors(event, schemas) == []
    assert {e["job"]["namespace"] for e in events} == {lineage.DEFAULT_NAMESPACE}
    parents = {e["run"]["facets"]["parent"]["run"]["runId"] for e in events}
    assert parents == {lineage.run_uuid(run_id)}
    for start, end in zip(events[::2], events[1::2]):
        assert start["run"]["runId"] == end["run"]["runId"]
    assert len({e["run"]["runId"] for e in events}) == len(registry.NAMES)

    # The datasets are the manifest's: each stage's objects are its outputs, their inputs its inputs.
    edges = set()
    for stage, end in zip(registry.NAMES, events[1::2]):
        entry = manifest["stages"][stage]
        outputs = {(o["namespace"], o["name"]): o for o in end["outputs"]}
        assert set(outputs) == {as_dataset(o["uri"]) for o in entry["objects"]}, stage
        assert {(i["namespace"], i["name"]) for i in end["inputs"]} == {
            as_dataset(src) for o in entry["objects"] for src in o["inputs"]}, stage
        for obj in entry["objects"]:
            out = outputs[as_dataset(obj["uri"])]
            assert out["outputFacets"]["outputStatistics"]["rowCount"] == obj["rows"]
            edges |= {(stage, as_dataset(src), as_dataset(obj["uri"])) for src in obj["inputs"]}
    assert edges == {(e["stage"], as_dataset(e["from"]), as_dataset(e["to"])) for e in manifest["lineage"]}

    # The contract's columns on the datasets that hold its rows: clean CSV, table, export, gold table.
    with_schema = [(e["job"]["name"].rsplit(".", 1)[1], o["namespace"], o["name"]) for e in events[1::2]
                   for o in e["outputs"] if "schema" in o["facets"]]
    assert [w[0] for w in with_schema] == ["02_clean", "03_load", "04_export", "05_gold"]
    assert ("postgres://127.0.0.1:%d" % settings.db.port, f"{settings.db.name}.public.{table}") in \
        [w[1:] for w in with_schema]
    for e in events[1::2]:
        for o in e["outputs"]:
            if "schema" in o["facets"]:
                assert [f["name"] for f in o["facets"]["schema"]["fields"]] == contract.COLUMNS

    # The same events reached the HTTP transport, in order, and the record says so.
    received = [p for p in marquez.posts[before:]]
    assert all(p["path"] == "/api/v1/lineage" for p in received)
    assert [p["json"] for p in received] == events
    [sent] = manifest["side_channels"]
    assert sent["what"] == lineage.WHAT and sent["destination"] == f"http://127.0.0.1:{marquez.port}/api/v1/lineage"
    assert sent["delivered"] == len(events) and sent["not_delivered"] == [] and sent["error"] is None


def test_a_failed_stage_emits_fail_with_its_error_and_a_dead_lineage_server_changes_nothing(
        run_pipeline, settings, unique, schemas):
    run_id = f"olfail-{unique}"
    dead = f"http://127.0.0.1:{closed_port()}"
    base = f"base-{unique}"  # a run for stage 4 to read from: a new run after stage 1 needs one
    runs.RunRecord.open(settings, base, ["01_ingest"], {}).finish("failed")
    res = run_pipeline("--stages", "4", "--run-id", run_id, "-p", f"table=missing_{unique}", "-p", f"input_run={base}",
                       env={"OPENLINEAGE__TRANSPORT__TYPE": "http", "OPENLINEAGE__TRANSPORT__URL": dead,
                            "OPENLINEAGE__TRANSPORT__RETRY": '{"total": 0}'})
    assert res.returncode == 1, res.stderr[-3000:]  # the stage's failure, nothing else
    assert "stage 04_export FAILED" in res.stderr
    # Said once for the run, naming the events the service missed; the record says it too.
    assert res.stderr.count("OpenLineage event") == 1
    assert (f"2 of 2 OpenLineage events to {dead}/api/v1/lineage were not delivered (the run's outcome is "
            "unchanged): ConnectionError: Connection refused; not delivered: START countries_medallion.04_export, "
            "FAIL countries_medallion.04_export") in res.stderr
    [missed] = runs.read_json(runs.manifest_path(settings, run_id))["side_channels"]
    assert missed["delivered"] == 0 and missed["not_delivered"] == ["START countries_medallion.04_export",
                                                                    "FAIL countries_medallion.04_export"]
    events = lineage.read_events(runs.run_dir(settings, run_id))
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    for event in events:
        assert spec_errors(event, schemas) == []
    fail = events[1]
    assert "does not exist" in fail["run"]["facets"]["errorMessage"]["message"]
    assert fail["outputs"] == [] and fail["inputs"] == []


def test_openlineage_disabled_writes_no_events(run_pipeline, settings, unique):
    run_id = f"oloff-{unique}"
    res = run_pipeline("--stages", "1", "--run-id", run_id, env={"OPENLINEAGE_DISABLED": "true"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert lineage.read_events(runs.run_dir(settings, run_id)) == []


def test_the_http_transport_alone_reaches_a_real_server(marquez, tmp_path, monkeypatch):
    """emit() with only the client's standard settings (an openlineage.yml) sends to the server and the file."""
    config = tmp_path / "openlineage.yml"
    config.write_text(f"transport:\n  type: http\n  url: http://127.0.0.1:{marquez.port}\n"
                      "  endpoint: api/v1/lineage\n  auth:\n    type: api_key\n    apiKey: test-key\n")
    monkeypatch.setenv("OPENLINEAGE_CONFIG", str(config))
    for name in ("OPENLINEAGE_URL", "OPENLINEAGE_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    before = len(marquez.posts)
    entry = {"attempts": [], "started": runs.now()}
    sent = lineage.emit(tmp_path / "run", lineage.stage_event("r1", "01_ingest", entry, "START"))
    assert sent == 2  # written to the file, queued for the server
    [outcome] = outbox.flush_all()
    assert outcome.delivered == ["START countries_medallion.01_ingest"]
    post = marquez.posts[before]
    assert post["headers"]["Authorization"] == "Bearer test-key"
    assert post["json"] == lineage.read_events(tmp_path / "run")[0]
    assert post["json"]["eventType"] == "START"


def test_the_spec_check_finds_what_is_wrong_in_an_event(schemas):
    from openlineage.client.serde import Serde

    entry = {"attempts": [], "started": runs.now(), "ended": runs.now(), "status": "failed", "error": "boom"}
    event = json.loads(Serde.to_json(lineage.stage_event("r1", "03_load", entry, "FAIL")))
    assert spec_errors(event, schemas) == []
    del event["producer"]
    event["run"]["runId"] = "not-a-uuid"
    event["run"]["facets"]["errorMessage"]["message"] = 42
    errors = "\n".join(spec_errors(event, schemas))
    assert "'producer' is a required property" in errors
    assert "'not-a-uuid' is not a 'uuid'" in errors
    assert "42 is not of type 'string'" in errors


def test_an_upper_case_export_has_upper_case_names_in_its_schema_facet():
    key = "exports/capitals_clean/run_id=r1/capitals_clean.csv"
    entry = {"details": {"key": key, "column_case": "upper"},
             "objects": [{"uri": f"s3://cloud/{key}", "key": key, "rows": 250, "size": 9,
                          "inputs": ["postgresql://127.0.0.1:5432/countries/public.capitals_clean"]}]}
    _, outputs = lineage.datasets(entry)
    names = [f.name for f in outputs[0].facets["schema"].fields]
    assert names == [c.upper() for c in contract.COLUMNS]
    entry["details"]["column_case"] = "lower"
    assert [f.name for f in lineage.datasets(entry)[1][0].facets["schema"].fields] == contract.COLUMNS


# --- a lineage service that refuses, hangs, answers slowly or fails never holds a run -------------------

SLACK_S = 0.5  # beyond the budget: the synchronous file copy of ten events, on a busy machine


def _only_the_url(monkeypatch, url: str) -> None:
    for name in ("OPENLINEAGE_CONFIG", "OPENLINEAGE_DISABLED", "OPENLINEAGE__TRANSPORT__TYPE",
                 "OPENLINEAGE__TRANSPORT__URL", "OPENLINEAGE__TRANSPORT__RETRY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENLINEAGE_URL", url)


def _a_run_ends(run_dir: Path) -> list[outbox.Outcome]:
    """The runner's lineage hooks for every stage (START, then COMPLETE), then its end of run."""
    record = SimpleNamespace(dir=run_dir, run_id="r1", data={"stages": {}})
    for stage in registry.NAMES:
        record.data["stages"][stage] = {"attempts": [], "started": runs.now()}
        lineage.stage_started(record, stage)
        record.data["stages"][stage].update(status="succeeded", ended=runs.now())
        lineage.stage_ended(record, stage)
    return outbox.flush_all()


def _labels(events: list[dict]) -> list[str]:
    return [f"{e['eventType']} {e['job']['name']}" for e in events]


@pytest.fixture(params=MISBEHAVING)
def misbehaving(request):
    service = Misbehaving(request.param)
    yield service
    service.close()


def test_a_misbehaving_lineage_service_costs_at_most_the_budget_and_is_logged_once(
        misbehaving, tmp_path, monkeypatch, caplog):
    url = f"http://127.0.0.1:{misbehaving.port}"
    _only_the_url(monkeypatch, url)
    caplog.set_level(logging.INFO)
    outcomes, seconds = timed(lambda: _a_run_ends(tmp_path / "run"), limit=outbox.BUDGET_S + 5)
    assert seconds <= outbox.BUDGET_S + SLACK_S, f"{misbehaving.kind}: {seconds:.2f} s"

    # The run folder's copy is complete, in order, whatever the service did.
    events = lineage.read_events(tmp_path / "run")
    assert [(e["job"]["name"].rsplit(".", 1)[1], e["eventType"]) for e in events] == [
        (s, t) for s in registry.NAMES for t in ("START", "COMPLETE")]

    # What did not reach the service is said once, and named in the outcome for the record.
    [outcome] = outcomes
    assert outcome.what == lineage.WHAT and outcome.destination == f"{url}/api/v1/lineage"
    labels = _labels(events)
    assert outcome.delivered + outcome.not_delivered == labels
    assert outcome.not_delivered  # a slow one answers 4 of 10 in the budget at best
    if misbehaving.kind != "slow":
        assert outcome.delivered == []
    reasons = {"refusing": "ConnectionError: Connection refused", "failing": "RetryError: too many 500 error responses",
               "slow": f"no answer within the run's {outbox.BUDGET_S:g} s for side channels"}  # hanging: either
    assert outcome.error == reasons.get(misbehaving.kind, outcome.error)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings  # nothing else either: no line per event, no retry
    assert warnings[0].startswith(f"{len(outcome.not_delivered)} of 10 OpenLineage events to {url}/api/v1/lineage "
                                  "were not delivered (the run's outcome is unchanged)")
    assert warnings[0].endswith("not delivered: " + ", ".join(outcome.not_delivered))
    assert outbox.flush_all() == []  # given up: nothing is left waiting for the next flush


def test_a_healthy_lineage_service_receives_every_event_in_order(marquez, tmp_path, monkeypatch, caplog):
    url = f"http://127.0.0.1:{marquez.port}"
    _only_the_url(monkeypatch, url)
    caplog.set_level(logging.INFO)
    before = len(marquez.posts)
    outcomes, seconds = timed(lambda: _a_run_ends(tmp_path / "run"), limit=outbox.BUDGET_S + 5)
    events = lineage.read_events(tmp_path / "run")
    assert [p["json"] for p in marquez.posts[before:]] == events
    [outcome] = outcomes
    assert outcome.delivered == _labels(events) and outcome.not_delivered == [] and outcome.error is None
    assert outcome.record()["delivered"] == 10
    assert f"10 OpenLineage events sent to {url}/api/v1/lineage" in caplog.messages
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
