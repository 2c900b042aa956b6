-- The load's typed, keyed floor: by hand, what stage 3 and the publish must do to one batch of silver
-- rows, and nothing more: a typed COPY into a staging table, the merge into the keyed table with its
-- history (changed and retired keys' versions closed, new versions opened), the current rows
-- replaced, the indexes in place. No proof, no drift check, no staging copy, no load log: the
-- pipeline's load and publish are measured against it (make bench, bench/pipeline.py `floors`).
--
-- Run with psql, the batch on standard input (CSV with a header: the contract's columns as
-- PostgreSQL literals, lists as array literals, then _row_hash, as lib/formats.py `copy_csv` writes
-- it), the table and its history made already by the pipeline's own DDL (lib/db_schema.py):
--
--   psql -X -q -v ON_ERROR_STOP=1 -v target='"public"."t"' -v history='"public"."t_history"' \
--        -v key='"name"' -v cols='"name", …' -v typed='"name" text, …' \
--        -v updates='"capital" = EXCLUDED."capital", …' -v run_id=bench -f bench/floor_load.sql < batch.csv
--
-- The column lists come from the contract (lib/contract.py), so this file names no column but the
-- audit ones every table of the pipeline has.

BEGIN;

-- A table with no rows yet is filled first and keyed after (one sort per index), as the load does.
SELECT NOT EXISTS (SELECT 1 FROM :target) AS fresh \gset

CREATE TEMP TABLE _batch (:typed, _row_hash text) ON COMMIT DROP;
\copy _batch FROM pstdin WITH (FORMAT csv, HEADER true)

CREATE TEMP TABLE _changes ON COMMIT DROP AS
  SELECT b.:key AS key,
         CASE WHEN t.:key IS NULL THEN 'insert'
              WHEN t._row_hash IS DISTINCT FROM b._row_hash THEN 'update'
              ELSE 'unchanged' END AS change
  FROM _batch b LEFT JOIN :target t ON t.:key = b.:key;
INSERT INTO _changes
  SELECT t.:key, 'retire' FROM :target t WHERE NOT EXISTS (SELECT 1 FROM _batch b WHERE b.:key = t.:key);

\if :fresh
  SELECT conname AS target_key, pg_get_constraintdef(oid) AS target_key_def FROM pg_constraint
    WHERE conrelid = :'target'::regclass AND contype = 'p' \gset
  SELECT indexrelid::regclass::text AS history_index, pg_get_indexdef(indexrelid) AS history_index_def
    FROM pg_index WHERE indrelid = :'history'::regclass AND NOT indisprimary \gset
  ALTER TABLE :target DROP CONSTRAINT :"target_key";
  DROP INDEX :history_index;
\endif

UPDATE :history SET valid_to = now(), is_current = false
  WHERE is_current AND :key IN (SELECT key FROM _changes WHERE change IN ('update', 'retire'));
INSERT INTO :history (:cols, _row_hash, _run_id, valid_from, valid_to, is_current)
  SELECT :cols, _row_hash, :'run_id', now(), NULL, true FROM _batch
  WHERE :key IN (SELECT key FROM _changes WHERE change IN ('insert', 'update'));

\if :fresh
  INSERT INTO :target (:cols, _row_hash, _run_id, _loaded_at) SELECT :cols, _row_hash, :'run_id', now() FROM _batch;
  ALTER TABLE :target ADD CONSTRAINT :"target_key" :target_key_def;
  :history_index_def;
\else
  DELETE FROM :target WHERE :key IN (SELECT key FROM _changes WHERE change = 'retire');
  INSERT INTO :target (:cols, _row_hash, _run_id, _loaded_at)
    SELECT :cols, _row_hash, :'run_id', now() FROM _batch
    WHERE :key IN (SELECT key FROM _changes WHERE change IN ('insert', 'update'))
    ON CONFLICT (:key) DO UPDATE SET :updates, _row_hash = EXCLUDED._row_hash, _run_id = EXCLUDED._run_id,
                                     _loaded_at = EXCLUDED._loaded_at;
\endif

COMMIT;
