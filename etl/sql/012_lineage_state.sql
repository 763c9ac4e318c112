-- One lineage run per state of the work (etl/lineage.py). A run's state is what determines what it
-- writes: release, step, target, selection, inputs with their MD5s, tables read, code version. An
-- execution that finds its state already completed by a run is not recorded again (nor emitted): that
-- run describes it. The unique index makes the database refuse a second completed run of a state,
-- also when two executions finish it at once; failed runs stay, as the audit of what was tried.
ALTER TABLE abc.lineage_run
    ADD COLUMN state jsonb,
    ADD COLUMN state_key text,
    ADD COLUMN stage_owner text,
    ADD COLUMN stage_started_at timestamptz,
    ADD COLUMN published_at timestamptz;
COMMENT ON COLUMN abc.lineage_run.state IS
    'What the run''s outputs depend on: release, step, target, selection, inputs (key -> MD5), input_tables, '
    'code_version';
COMMENT ON COLUMN abc.lineage_run.state_key IS 'SHA-256 of the state as canonical JSON (null: recorded before 012)';
COMMENT ON COLUMN abc.lineage_run.stage_owner IS
    'A staging step: the stage (abc.stage owner and started_at) that last held its outputs';
COMMENT ON COLUMN abc.lineage_run.published_at IS
    'When what the run wrote last became what readers read: at its end for a step writing in place, at the '
    'publication of its stage for a staging step; null: never (failed, running, or its stage was not published)';
CREATE UNIQUE INDEX lineage_run_state_key ON abc.lineage_run (state_key) WHERE status = 'succeeded';

-- Runs recorded before this migration: every succeeded one was read as current.
UPDATE abc.lineage_run SET published_at = finished_at WHERE status = 'succeeded';

-- The run whose data readers read in a release's table: the one published last that wrote it.
CREATE OR REPLACE VIEW abc.lineage_current_writer AS
SELECT DISTINCT ON (o.table_name, run.release) o.table_name, run.release, run.id AS run_id
FROM abc.lineage_output o
JOIN abc.lineage_run run ON run.id = o.run_id
WHERE run.status = 'succeeded' AND run.published_at IS NOT NULL AND o.partition IN ('', run.release)
ORDER BY o.table_name, run.release, run.published_at DESC, run.id DESC;
