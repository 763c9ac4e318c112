-- Who stages what (etl/publish.py): one row per release for its current stage. Readers read a
-- release's abc_staging tables only while its stage is live ('staging', 'staged') and, once the
-- release is published, only in the run that stages it; a failed stage's tables are dropped.
-- locked_by/locked_at name the process holding the release's stage lock (an advisory lock), so
-- that a second run waiting for it can say who it waits for.
CREATE TABLE abc.stage (
    release     text PRIMARY KEY REFERENCES abc.release (version),
    owner       text,
    state       text NOT NULL DEFAULT 'idle'
                CHECK (state IN ('idle', 'staging', 'staged', 'failed', 'published')),
    started_at  timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    error       text,
    locked_by   text,
    locked_at   timestamptz
);
COMMENT ON TABLE abc.stage IS
    'The current stage of each release: the run (owner) staging it in abc_staging, since when, and its state.';

-- Releases staged before this table existed keep their staged load readable and publishable.
INSERT INTO abc.stage (release, owner, state, started_at)
SELECT version, 'unrecorded (staged before migration 010)', 'staged', coalesce(loaded_at, now())
FROM abc.release WHERE status = 'loaded';
