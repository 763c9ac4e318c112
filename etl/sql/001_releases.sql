-- Releases seen upstream, the dataset directories each one pins, and the files it lists.
-- Written by discovery (etl/discovery.py); every later stage keys its rows by abc.release.version.

CREATE TABLE abc.release (
    version          text PRIMARY KEY CHECK (version ~ '^[0-9]{8}$'),
    manifest_key     text NOT NULL,
    manifest_md5     text NOT NULL CHECK (manifest_md5 ~ '^[0-9a-f]{32}$'),
    manifest_size    bigint NOT NULL,
    manifest_etag    text,
    resource_uri     text NOT NULL,
    n_files          integer NOT NULL,
    total_bytes      bigint NOT NULL,
    discovered_at    timestamptz NOT NULL DEFAULT now(),
    mirrored_at      timestamptz,
    loaded_at        timestamptz,
    published_at     timestamptz,
    status           text NOT NULL DEFAULT 'upstream'
                     CHECK (status IN ('upstream', 'mirroring', 'mirrored', 'loading', 'loaded',
                                       'published', 'failed')),
    last_error       text
);
COMMENT ON TABLE abc.release IS 'One row per releases/<YYYYMMDD>/manifest.json seen upstream.';

-- directory_listing of a manifest: which dated directory of each dataset/kind a release pins.
CREATE TABLE abc.release_directory (
    release        text NOT NULL REFERENCES abc.release (version) ON DELETE CASCADE,
    dataset        text NOT NULL,
    kind           text NOT NULL,
    version        text NOT NULL,
    relative_path  text NOT NULL,
    total_size     bigint,
    PRIMARY KEY (release, dataset, kind)
);
CREATE INDEX release_directory_dataset_idx ON abc.release_directory (dataset, kind, version);

-- file_listing of a manifest, flattened: one row per file.
CREATE TABLE abc.release_file (
    release        text NOT NULL REFERENCES abc.release (version) ON DELETE CASCADE,
    relative_path  text NOT NULL,
    dataset        text NOT NULL,
    kind           text NOT NULL,
    tag            text NOT NULL,
    normalization  text NOT NULL DEFAULT '',
    file_type      text NOT NULL,
    version        text NOT NULL,
    size           bigint NOT NULL CHECK (size >= 0),
    md5            text NOT NULL CHECK (md5 ~ '^[0-9a-f]{32}$'),
    PRIMARY KEY (release, relative_path)
);
CREATE INDEX release_file_key_idx ON abc.release_file (relative_path);

-- Dated directories seen in the bucket listing, whether or not a manifest lists them yet.
CREATE TABLE abc.upstream_directory (
    kind           text NOT NULL,
    dataset        text NOT NULL,
    version        text NOT NULL CHECK (version ~ '^[0-9]{8}$'),
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, dataset, version)
);

-- Manifests that could not be used, by key, so monitoring can show them.
CREATE TABLE abc.manifest_problem (
    manifest_key   text NOT NULL,
    manifest_md5   text NOT NULL,
    problem        text NOT NULL,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (manifest_key, manifest_md5)
);
