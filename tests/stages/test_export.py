"""Stage 4's `column_case` option (the seed's upper-case column names in the cloud CSV): the stages
called directly on the real services, the header writer alone, and the runner's argument check."""

from __future__ import annotations

import io

import pytest

from lib import contract, formats, storage
from lib.stages import context, export
from tests.stages.helpers import run_stages
from lib.params import UsageError


def test_upper_header_upper_cases_only_the_first_line_even_when_it_arrives_in_pieces():
    sink = io.BytesIO()
    writer = formats.UpperHeader(sink)
    for chunk in (b"name_com", "mon,capital\nFrance,", b'"[""Paris""]"\nname_common,x\n'):
        writer.write(chunk)
    assert sink.getvalue() == b'NAME_COMMON,CAPITAL\nFrance,"[""Paris""]"\nname_common,x\n'


@pytest.mark.parametrize("case", ["upper", "lower"])
def test_export_column_case_and_reconciliation(settings, s3, unique, case):
    out = run_stages(f"case-{case}-{unique}", f"case_{unique}", options={"04_export": {"column_case": case}})
    exported, golden = out["export"][0], out["gold"]
    data, _ = storage.get_bytes(storage.cloud_client(settings.cloud), exported.bucket, exported.key)
    header = data.split(b"\n", 1)[0].decode().split(",")
    expected = [c.upper() if case == "upper" else c for c in contract.COLUMNS]
    assert header[:len(contract.COLUMNS)] == expected
    assert len(formats.get("csv").decode(data)) == 250
    assert set(golden.reconciliation["status"]) <= {"ok", "-"}
    assert list(golden.table.columns[:len(contract.COLUMNS)]) == contract.COLUMNS


def test_an_unknown_column_case_is_refused(settings):
    with pytest.raises(UsageError, match="column_case 'title' is not one of lower, upper"):
        context.begin("01_ingest", "case-bad-run")  # the run exists (a notebook names only existing runs)
        export.run(context.begin("04_export", "case-bad-run", column_case="title"))


def test_the_runner_refuses_an_unknown_column_case_before_anything_runs(run_pipeline):
    res = run_pipeline("--stages", "4", "-p", "column_case=Title", timeout=120)
    assert res.returncode == 2
    assert "column_case 'Title' is not one of lower, upper" in res.stderr
