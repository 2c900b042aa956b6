"""Reconciliation across every hop: record counts and content fingerprints as each stage recorded
them, compared pairwise as the stages declare (lib/registry.py `Hop`)."""

from __future__ import annotations

import pandas as pd

from lib import registry
from lib.errors import PipelineError


class ReconciliationError(PipelineError):
    """Counts or fingerprints disagree between two hops; the message names the hop, `table` is the
    whole reconciliation table (None when it could not be built)."""

    def __init__(self, message: str, table: pd.DataFrame | None = None):
        super().__init__(message)
        self.table = table


def _field(details: dict[str, dict], stage: str, ref: str):
    """A detail of a stage record: `field` of `stage` itself, or `other_stage.field`."""
    owner, _, name = ref.rpartition(".")
    return (details[owner or stage] or {}).get(name)  # a field a stage did not record compares as missing


def reconcile(details: dict[str, dict | None]) -> pd.DataFrame:
    """The record count and content fingerprint at every hop the stages declare (lib/registry.py), and
    whether each hop agrees with the one it is compared with. `details` maps each stage name to its
    record's details. Raises ReconciliationError naming the first hop that disagrees (after building
    the table)."""
    reconciled = [s for s in registry.STAGES if s.hops and s.number <= registry.reconciler().number]
    missing = [s.name for s in reconciled if details.get(s.name) is None]
    if missing:
        raise ReconciliationError(f"cannot reconcile: no record of stage(s) {', '.join(missing)} in this run")

    rows = []
    for stage in reconciled:
        mine = details[stage.name]
        for hop in stage.hops:
            exempt = (mine.get("unreconciled") or {}).get(hop.label)
            if hop.against is None:
                status = "-"
            elif exempt:
                status = f"skipped: {exempt}"
            else:
                status = "ok" if all(_field(details, stage.name, a) is not None
                                     and _field(details, stage.name, a) == _field(details, stage.name, b)
                                     for a, b in hop.equal) else "MISMATCH"
            rows.append({"hop": hop.label, "records": str(mine.get(hop.shown or hop.rows)),
                         "fingerprint": str(mine.get(hop.fingerprint))[:16], "compared with": hop.against or "",
                         "status": status})
    table = pd.DataFrame(rows, columns=["hop", "records", "fingerprint", "compared with", "status"])
    bad = table[table["status"] == "MISMATCH"]
    if len(bad):
        first = bad.iloc[0]
        raise ReconciliationError(
            f"reconciliation failed at hop '{first['compared with']} → {first['hop']}': "
            f"{first['records']} records, fingerprint {first['fingerprint']}\n{table.to_string(index=False)}", table)
    return table
