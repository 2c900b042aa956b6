"""Stage 5: the cloud export → the gold bucket (the table, aggregates, the change report), then
reconciliation of every hop. What consumers read moves at the publish, after the stage
(lib/publish.py), and only in a run that holds the pipeline lock."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pandas as pd

from lib import aggregates, changes, contract, formats, layout, memory, quality, reconciliation, registry, runs, storage
from lib import publish as publish_
from lib.registry import Layer
from lib.stages.context import StageRun, spooled_input


@dataclass
class Golden:
    table: pd.DataFrame  # a sample: the gold table's first rows (the table itself is never held whole)
    aggregates: dict[str, pd.DataFrame]
    # The change report (lib/changes.py) with its added and removed keys cut to the first
    # CHANGES_SAMPLE (changes.json has them all) and "counts": how many were added, removed, changed.
    changes: dict
    reconciliation: pd.DataFrame | None
    artifacts: list[storage.Artifact]


CHANGES_SAMPLE = 1000  # added and removed keys kept in `Golden.changes` (a first table adds every key)


def _as_parquet(s3, bucket: str, key: str):
    """A gold table as Parquet: a Parquet one as a file spooled to disk (read a column at a time, a
    million rows need not be held; close it after use), any other format converted to Parquet bytes."""
    fmt = formats.of_key(key)
    if fmt is formats.PARQUET:
        return storage.get_spooled(s3, bucket, key).rewound()
    return formats.to_parquet(fmt, storage.get_bytes(s3, bucket, key)[0])


def _previous_gold(s3, bucket: str, table: str, run_id: str):
    """The gold table of the previous successful run as Parquet whatever format it was written in
    (`_as_parquet`), and its run id: the published one, unless that is this run (a rerun), in which
    case the one it replaced. The published pointer says where it is; a bucket published before
    pointers existed is read through its `latest` keys."""
    pointer = publish_.pointer(s3, bucket, table)
    if pointer is not None:
        previous, key = ((pointer.get("previous_run_id"), pointer.get("previous_gold_key"))
                         if pointer["run_id"] == run_id else (pointer["run_id"], pointer["gold_key"]))
        if not previous or not key or storage.head(s3, bucket, key) is None:
            return None, None
        return _as_parquet(s3, bucket, key), previous
    for fmt in formats.FORMATS.values():
        latest = storage.head(s3, bucket, layout.latest(layout.gold_table_key(table, run_id, fmt.extension)))
        if latest is None:
            continue
        previous = latest["metadata"].get("run-id")
        if previous == run_id:
            previous = latest["metadata"].get("previous-run-id") or None
        if not previous:
            return None, None
        for kind in formats.FORMATS.values():
            key = layout.gold_table_key(table, previous, kind.extension)
            if storage.head(s3, bucket, key) is not None:
                return _as_parquet(s3, bucket, key), previous
        return None, None
    return None, None


def build(stage: StageRun) -> Golden:
    """Fetch this run's export, verify its checksum against what stage 4 wrote, then write gold:
    the table, aggregates by region and subregion, the change report. `reconcile` and `publish`
    follow. The export is converted to typed Parquet in Arrow batches as it downloads (used once its
    sha256 is proven); the aggregates read only their columns and the change report compares column
    by column (lib/changes.py `of_parquet`), its keys written to changes.json as they are encoded."""
    settings, table = stage.settings, stage.params.table
    fmt = formats.get(stage.params.gold_format or formats.DEFAULT_GOLD)
    cloud = storage.cloud_client(settings.cloud)
    key = layout.export_key(settings.cloud.prefix, table, stage.input_run(Layer.CLOUD))
    # Converted to typed Parquet as it downloads; used only once its sha256 is proven.
    spool, (typed, rows) = spooled_input(stage, cloud, settings.cloud.bucket, key, Layer.CLOUD, formats.csv_to_parquet)
    digest = spool.sha256
    try:
        memory.release()
        exported = (stage.previous_record(Layer.CLOUD) or {}).get("details") or {}
        if exported.get("key") == key and exported.get("sha256") == digest and exported.get("fingerprint"):
            # A proof, not a shortcut: these bytes are byte for byte (sha256) the ones stage 4 parsed and
            # fingerprinted, so their fingerprint is the one it recorded.
            fp = {"rows": rows, "fingerprint": exported["fingerprint"]}
        else:  # no record of stage 4 for this object: the fingerprint is recomputed from the values
            fp = quality.Fingerprint()
            for batch in formats.csv_arrow_batches(spool.rewound()):
                fp.add(batch)
            fp = fp.result()
        golden = _write_gold(stage, fmt, table, _Export(key, typed, rows, fp, digest, spool))
    finally:
        spool.close()
    return golden


def _shared_text(column):
    """An Arrow text column as an object array in which equal values are one Python string: a million
    rows of a dozen regions hold a dozen strings, not a million (nulls stay None)."""
    import numpy as np
    import pyarrow.compute as pc

    encoded = column.combine_chunks().dictionary_encode()
    values = np.array([*encoded.dictionary.to_pylist(), None], dtype=object)
    return values[pc.fill_null(encoded.indices, len(encoded.dictionary)).to_numpy()]


@dataclass
class _Export:
    """The cloud export `build` read and proved: its key, its rows as typed Parquet, its fingerprint
    and sha256, and the spool holding its bytes as they are."""
    key: str
    typed: bytes
    rows: int
    fingerprint: dict
    sha256: str
    spool: storage.HashingSpool


def _write_gold(stage: StageRun, fmt: formats.Format, table: str, export: _Export) -> Golden:
    """The rest of `build`: the change report, the aggregates and every gold object."""
    import pyarrow.parquet as pq

    key, typed, rows, fp, digest = export.key, export.typed, export.rows, export.fingerprint, export.sha256
    # A CSV gold table is the export's bytes as they are; any other format is the typed conversion's.
    gold_body = export.spool if fmt is formats.CSV else formats.from_parquet(fmt, typed)

    settings = stage.settings
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.gold_bucket)
    previous, previous_id = _previous_gold(s3, settings.gold_bucket, table, stage.run_id)
    try:
        report = changes.of_parquet(previous, typed, previous_id)
    finally:
        if hasattr(previous, "close"):  # a spooled file
            previous.close()
        del previous
    memory.release()
    # Countries quarantined this run and kept current by the load: listed, with why.
    loaded = (stage.previous_record(Layer.TABLE) or {}).get("details") or {}
    report["held"] = {h["country"]: h["reasons"] for h in loaded.get("held_keys") or []}
    counts = {name: len(report[name]) for name in ("added", "removed", "changed")}
    counts["held"] = loaded.get("held") or 0
    changes_json = storage.HashingSpool()  # written as it is encoded
    try:
        changes.write_json(report, changes_json)
        report = {**report, "added": report["added"][:CHANGES_SAMPLE].to_pylist(),
                  "removed": report["removed"][:CHANGES_SAMPLE].to_pylist(), "counts": counts}
        columns = pq.read_table(io.BytesIO(typed), columns=aggregates.COLUMNS)
        # The keys (a million different ones) stay in Arrow as pandas' string dtype; the other text
        # columns hold a few values each, as shared Python strings.
        frame = pd.DataFrame({name: columns.column(name).to_pandas(types_mapper={
                                  columns.schema.field(name).type: pd.StringDtype("pyarrow")}.get)
                              if name == contract.KEY else pd.Series(_shared_text(columns.column(name)), dtype=object)
                              if name in contract.TEXT_COLUMNS else columns.column(name).to_numpy()
                              for name in aggregates.COLUMNS})
        del columns
        summaries = {name: fn(frame) for name, fn in aggregates.AGGREGATES.items()}
        del frame
        memory.release()
        sample = formats.parquet_decode(typed, rows=10)
        source_uri = f"s3://{settings.cloud.bucket}/{key}"
        meta_out = stage.meta(**{"previous-run-id": previous_id, "format": fmt.name})
        outputs = [
            (layout.gold_table_key(table, stage.run_id, fmt.extension), gold_body, rows, fmt.content_type),
            *((layout.aggregate_key(name, stage.run_id, fmt.extension), fmt.encode(agg), len(agg), fmt.content_type)
              for name, agg in summaries.items()),
            (layout.changes_key(stage.run_id), changes_json, sum(counts.values()), "application/json"),
        ]
        artifacts = [storage.put_stream(s3, settings.gold_bucket, k, body.rewound(), size=body.size,
                                        digest=body.sha256, rows=n, inputs=[source_uri], metadata=meta_out,
                                        content_type=content_type)
                     if isinstance(body, storage.HashingSpool) else
                     storage.put_bytes(s3, settings.gold_bucket, k, body, rows=n, inputs=[source_uri],
                                       metadata=meta_out, content_type=content_type)
                     for k, body, n, content_type in outputs]
    finally:
        changes_json.close()
    for artifact in artifacts:
        stage.record.output(artifact)
    stage.record.update(rows_in=rows, rows_out=rows, gold_rows=rows, gold_key=artifacts[0].key,
                        gold_fingerprint=fp["fingerprint"], gold_sha256=digest, previous_run_id=previous_id,
                        format=fmt.name, changes=counts,
                        by_region=dict(zip(summaries["by_region"]["region"].astype(str),
                                           map(int, summaries["by_region"]["population"]))),
                        # The aggregates' totals, checked against the table's own (lib/registry.py hops).
                        aggregate_countries=int(summaries["by_region"]["countries"].sum()),
                        aggregate_population=str(sum(map(int, summaries["by_region"]["population"]))))
    return Golden(sample, summaries, report, None, artifacts)


def reconcile(stage: StageRun, golden: Golden) -> pd.DataFrame:
    """Counts and fingerprints at every hop of this run (lib/registry.py); raises naming the first hop
    that disagrees. The table is recorded either way. Nothing is published here."""
    details = {s.name: (runs.read_stage(stage.settings, stage.source_run(s.name), s.name) or {}).get("details")
               for s in registry.before(stage.name)}
    details[stage.name] = stage.record.data["details"]
    try:
        table = reconciliation.reconcile(details)
    except reconciliation.ReconciliationError as err:
        rows = err.table.to_dict(orient="records") if err.table is not None else []
        stage.record.update(reconciliation=rows, reconciliation_error=str(err).split("\n")[0])
        raise
    stage.record.update(reconciliation=table.to_dict(orient="records"), reconciliation_error=None)
    golden.reconciliation = table
    return table
