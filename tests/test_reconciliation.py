"""lib.reconciliation: counts and fingerprints compared at every hop the stages declare."""

from __future__ import annotations

import pytest

from lib import reconciliation
from lib.reconciliation import ReconciliationError


def stage_records(rows=250, fp="f" * 64, sha="s" * 64, mode="upsert", gold_sha="e" * 64, gold_rows=248,
                  people="9223372036854775808"):
    """Details of each stage's record as a run that reconciles leaves them."""
    return {
        "01_ingest": {"records": rows, "response_sha256": sha},
        "02_clean": {"raw_records": rows, "raw_sha256": sha, "clean_rows": rows - 2, "quarantined": 2,
                     "silver_records": rows, "silver_breakdown": f"{rows - 2} + 2", "clean_fingerprint": fp},
        "03_load": {"batch_rows": rows - 2, "batch_fingerprint": fp, "current_rows": rows - 2,
                    "current_fingerprint": fp, "mode": mode, "population_total": "9223372036854775808",
                    "unreconciled": {"PostgreSQL rows of this batch": "append"} if mode == "append" else {}},
        "04_export": {"rows": rows - 2, "fingerprint": fp, "sha256": "e" * 64},
        "05_gold": {"gold_rows": gold_rows, "gold_fingerprint": fp, "gold_sha256": gold_sha,
                    "aggregate_countries": rows - 2, "aggregate_population": people},
    }


def test_reconcile_of_agreeing_hops_is_all_ok():
    table = reconciliation.reconcile(stage_records())
    assert list(table["hop"]) == ["API response", "raw (bronze)", "clean + quarantine (silver)",
                                  "PostgreSQL rows of this batch", "PostgreSQL current table", "cloud export",
                                  "gold", "gold aggregates"]
    assert "MISMATCH" not in set(table["status"])
    assert list(table["status"]).count("ok") == 6
    assert table.loc[table["hop"] == "clean + quarantine (silver)", "records"].item() == "248 + 2"


def test_reconcile_names_the_first_hop_that_disagrees():
    details = stage_records(gold_rows=247)
    details["04_export"]["rows"] = 247
    with pytest.raises(ReconciliationError, match="'PostgreSQL current table → cloud export'"):
        reconciliation.reconcile(details)


def test_reconcile_catches_aggregates_that_do_not_add_up_to_the_table():
    with pytest.raises(ReconciliationError, match="PostgreSQL current table → gold aggregates"):
        reconciliation.reconcile(stage_records(people="-9223372036834263648"))  # an int64 sum that wrapped


def test_a_field_no_stage_recorded_is_a_mismatch_not_a_match():
    details = stage_records()
    del details["03_load"]["population_total"], details["05_gold"]["aggregate_population"]
    with pytest.raises(ReconciliationError, match="gold aggregates"):
        reconciliation.reconcile(details)


def test_reconcile_catches_a_changed_gold_object():
    with pytest.raises(ReconciliationError, match="cloud export → gold"):
        reconciliation.reconcile(stage_records(gold_sha="x" * 64))


def test_reconcile_catches_records_lost_between_bronze_and_silver():
    details = stage_records()
    details["02_clean"]["silver_records"] = 249
    with pytest.raises(ReconciliationError, match="raw \\(bronze\\) → clean \\+ quarantine"):
        reconciliation.reconcile(details)


def test_a_hop_the_stage_exempts_is_shown_as_skipped_with_its_reason():
    details = stage_records(mode="append")
    details["03_load"]["batch_rows"] = 3
    table = reconciliation.reconcile(details)
    assert "MISMATCH" not in set(table["status"])
    assert table.loc[table["hop"] == "PostgreSQL rows of this batch", "status"].item() == "skipped: append"


def test_reconcile_without_a_stage_record_says_which():
    details = stage_records()
    details["03_load"] = None
    with pytest.raises(ReconciliationError, match="no record of stage\\(s\\) 03_load"):
        reconciliation.reconcile(details)
