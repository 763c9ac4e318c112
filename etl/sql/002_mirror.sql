-- Mirror records, written by etl/mirror.py: what each mirror target holds, verified against the manifests.
-- A target is a resolved local directory or s3://bucket/prefix. Objects are keyed by their bucket key,
-- not by release: consecutive releases share most keys, and a shared key is fetched and recorded once.

CREATE TABLE abc.mirror_object (
    target         text NOT NULL,
    relative_path  text NOT NULL CHECK (relative_path <> ''),
    size           bigint NOT NULL CHECK (size >= 0),
    md5            text NOT NULL CHECK (md5 ~ '^[0-9a-f]{32}$'),
    etag           text,
    mtime_ns       bigint,
    local_path     text NOT NULL,
    verified_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, relative_path)
);
COMMENT ON TABLE abc.mirror_object IS
    'A file placed in a mirror target after its size and MD5 matched a manifest; trusted while size and mtime_ns hold.';
COMMENT ON COLUMN abc.mirror_object.mtime_ns IS 'st_mtime_ns of the local file when verified (NULL for S3 targets)';
-- Identical content under another key can be copied locally instead of downloaded.
CREATE INDEX mirror_object_content_idx ON abc.mirror_object (target, md5, size);

-- One row per mirror run of a release (dry runs are not recorded); the integrity report of `abc-mirror status`.
CREATE TABLE abc.mirror_run (
    id              bigserial PRIMARY KEY,
    release         text NOT NULL REFERENCES abc.release (version) ON DELETE CASCADE,
    target          text NOT NULL,
    selection       jsonb NOT NULL DEFAULT '{}',
    verify          boolean NOT NULL DEFAULT false,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    status          text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    files_selected  integer NOT NULL DEFAULT 0,
    files_ok        integer NOT NULL DEFAULT 0,
    files_fetched   integer NOT NULL DEFAULT 0,
    files_skipped   integer NOT NULL DEFAULT 0,
    files_failed    integer NOT NULL DEFAULT 0,
    bytes_fetched   bigint NOT NULL DEFAULT 0,
    failures        jsonb NOT NULL DEFAULT '{}'
);
COMMENT ON COLUMN abc.mirror_run.failures IS 'relative_path -> reason, for the files this run could not place';
COMMENT ON COLUMN abc.mirror_run.status IS 'running also marks a run that was interrupted before it finished';
CREATE INDEX mirror_run_release_idx ON abc.mirror_run (release, target, started_at DESC);

-- Every mirrored file of every release: (release, key, size, MD5, ETag, local path, verified at).
CREATE VIEW abc.mirrored_release_file AS
SELECT rf.release, rf.relative_path, rf.size, rf.md5, o.target, o.etag, o.local_path, o.verified_at
FROM abc.release_file rf
JOIN abc.mirror_object o ON o.relative_path = rf.relative_path AND o.md5 = rf.md5 AND o.size = rf.size;
