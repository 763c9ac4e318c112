-- Lineage per release and release monitoring (written by etl/lineage.py and etl/monitor.py).
--
-- Lineage is a graph an auditor queries with SQL: a release's manifest and source objects
-- (abc.release, abc.release_file, abc.source_object), where each object was mirrored and verified
-- (abc.mirror_object), and every step that read them or read tables (abc.lineage_run with its
-- abc.lineage_input) and what it wrote (abc.lineage_output). abc.lineage_sources() walks it.

-- Source objects as the bucket listed them: the ETag and Last-Modified the manifest does not carry.
CREATE TABLE abc.source_object (
    relative_path  text PRIMARY KEY,
    size           bigint NOT NULL,
    etag           text,
    last_modified  timestamptz,
    listed_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per execution of a step (discover, mirror, load_metadata, aggregate, publish, ...).
CREATE TABLE abc.lineage_run (
    id              bigserial PRIMARY KEY,
    run_uuid        uuid NOT NULL UNIQUE,
    release         text NOT NULL REFERENCES abc.release (version) ON DELETE CASCADE,
    step            text NOT NULL,
    orchestrator    text NOT NULL CHECK (orchestrator IN ('airflow', 'cli')),
    dag_id          text,
    dag_run_id      text,
    task_id         text,
    try_number      integer,
    invocation      text,
    code_version    text NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    status          text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    error           text
);
COMMENT ON COLUMN abc.lineage_run.run_uuid IS 'the OpenLineage runId of the events emitted for this run';
COMMENT ON COLUMN abc.lineage_run.invocation IS 'the command line of a CLI run';
CREATE INDEX lineage_run_release_idx ON abc.lineage_run (release, step, started_at DESC);

-- What a run read: a source object (bucket key) or a warehouse table (schema.table) of the release.
CREATE TABLE abc.lineage_input (
    run_id  bigint NOT NULL REFERENCES abc.lineage_run (id) ON DELETE CASCADE,
    kind    text NOT NULL CHECK (kind IN ('object', 'table')),
    name    text NOT NULL,
    PRIMARY KEY (run_id, kind, name)
);
CREATE INDEX lineage_input_name_idx ON abc.lineage_input (kind, name);

-- What a run wrote: table (schema.table), partition (the release for partitioned tables) and rows.
CREATE TABLE abc.lineage_output (
    run_id      bigint NOT NULL REFERENCES abc.lineage_run (id) ON DELETE CASCADE,
    table_name  text NOT NULL,
    partition   text NOT NULL DEFAULT '',
    row_count   bigint,
    PRIMARY KEY (run_id, table_name, partition)
);
CREATE INDEX lineage_output_table_idx ON abc.lineage_output (table_name, partition);

-- Which relations each view reads, from the catalog (so lineage follows views to their tables).
CREATE VIEW abc.relation_dependency AS
SELECT DISTINCT (quote_ident(vn.nspname) || '.' || quote_ident(v.relname)) COLLATE "default" AS view_name,
                (quote_ident(tn.nspname) || '.' || quote_ident(t.relname)) COLLATE "default" AS relation
FROM pg_rewrite r
JOIN pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm')
JOIN pg_namespace vn ON vn.oid = v.relnamespace
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass
JOIN pg_class t ON t.oid = d.refobjid AND t.oid <> v.oid
JOIN pg_namespace tn ON tn.oid = t.relnamespace;

-- The run whose data a release's table holds: the last succeeded run that wrote the table for it.
CREATE VIEW abc.lineage_current_writer AS
SELECT DISTINCT ON (o.table_name, run.release) o.table_name, run.release, run.id AS run_id
FROM abc.lineage_output o
JOIN abc.lineage_run run ON run.id = o.run_id
WHERE run.status = 'succeeded' AND o.partition IN ('', run.release)
ORDER BY o.table_name, run.release, run.finished_at DESC, run.id DESC;

-- Every source object behind a relation (table or view) of a release, through every step that led
-- to it, with the step's run and code version, where the object was mirrored and when verified.
CREATE FUNCTION abc.lineage_sources(relation text, for_release text)
RETURNS TABLE (step text, run_ref text, code_version text, finished_at timestamptz, manifest_key text,
               manifest_md5 text, source_key text, size bigint, md5 text, etag text, last_modified timestamptz,
               mirror_path text, verified_at timestamptz)
LANGUAGE sql STABLE AS $$
WITH RECURSIVE reached (kind, name) AS (
    SELECT 'table', relation
    UNION
    SELECT e.to_kind, e.to_name
    FROM reached r
    JOIN (SELECT 'table' AS from_kind, view_name AS from_name, 'table' AS to_kind, relation AS to_name
          FROM abc.relation_dependency
          UNION ALL
          SELECT 'table', table_name, 'run', run_id::text FROM abc.lineage_current_writer WHERE release = for_release
          UNION ALL
          SELECT 'run', run_id::text, kind, name FROM abc.lineage_input) e
      ON e.from_kind = r.kind AND e.from_name = r.name
)
SELECT run.step,
       CASE run.orchestrator WHEN 'airflow' THEN concat('airflow ', run.dag_id, '/', run.dag_run_id, '/',
                                                        run.task_id, ' try ', run.try_number)
                             ELSE 'cli ' || run.invocation END,
       run.code_version, run.finished_at, rel.manifest_key, rel.manifest_md5,
       i.name, rf.size, rf.md5, coalesce(so.etag, mo.etag), so.last_modified, mo.local_path, mo.verified_at
FROM reached r
JOIN abc.lineage_run run ON r.kind = 'run' AND run.id = r.name::bigint
JOIN abc.release rel ON rel.version = for_release
JOIN abc.lineage_input i ON i.run_id = run.id AND i.kind = 'object'
LEFT JOIN abc.release_file rf ON rf.release = for_release AND rf.relative_path = i.name
LEFT JOIN abc.source_object so ON so.relative_path = i.name
LEFT JOIN LATERAL (SELECT o.local_path, o.etag, o.verified_at FROM abc.mirror_object o
                   WHERE o.relative_path = i.name AND o.md5 = rf.md5
                   ORDER BY o.verified_at DESC LIMIT 1) mo ON true
ORDER BY run.step, i.name
$$;
COMMENT ON FUNCTION abc.lineage_sources(text, text) IS
    'Source objects (with run, code version, mirror copy) behind a relation of a release, e.g. '
    '(''abc.expression_by_cluster'', ''20251031'')';

-- Release diffs, computed at load time and by `abc-mirror diff`: counts and the items behind them.
CREATE TABLE abc.release_diff (
    old_release  text NOT NULL REFERENCES abc.release (version) ON DELETE CASCADE,
    new_release  text NOT NULL REFERENCES abc.release (version) ON DELETE CASCADE,
    computed_at  timestamptz NOT NULL DEFAULT now(),
    summary      jsonb NOT NULL,
    PRIMARY KEY (old_release, new_release)
);
COMMENT ON COLUMN abc.release_diff.summary IS 'dataset -> subject (file, cell, cluster, gene, directory) -> change -> count';

CREATE TABLE abc.release_diff_item (
    old_release  text NOT NULL,
    new_release  text NOT NULL,
    dataset      text NOT NULL,
    subject      text NOT NULL CHECK (subject IN ('file', 'directory', 'cell', 'cluster', 'gene')),
    change       text NOT NULL CHECK (change IN ('added', 'removed', 'changed', 'moved', 'reassigned')),
    item         text NOT NULL,
    old_value    text,
    new_value    text,
    PRIMARY KEY (old_release, new_release, dataset, subject, item),
    FOREIGN KEY (old_release, new_release) REFERENCES abc.release_diff (old_release, new_release)
        ON DELETE CASCADE
);
COMMENT ON COLUMN abc.release_diff_item.old_value IS 'file: MD5 (moved: old key); directory: version; cell: cluster_alias';

-- Data-quality checks after a load: one row per release and check, replaced when run again.
CREATE TABLE abc.quality_check (
    release     text NOT NULL REFERENCES abc.release (version) ON DELETE CASCADE,
    name        text NOT NULL,
    passed      boolean NOT NULL,
    failing     bigint NOT NULL DEFAULT 0,
    details     text NOT NULL DEFAULT '',
    checked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (release, name)
);

-- Every alert sent (or attempted): what, about which release, and whether the webhook took it.
CREATE TABLE abc.alert (
    id         bigserial PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('new_release', 'failed_run', 'failed_check', 'lag')),
    release    text,
    summary    text NOT NULL,
    payload    jsonb NOT NULL,
    delivered  boolean NOT NULL,
    sent_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alert_kind_release_idx ON abc.alert (kind, release);
