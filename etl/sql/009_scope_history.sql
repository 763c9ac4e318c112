-- Scope and history (etl/scope.py): releases before the history floor are recorded as 'skipped',
-- and a release whose scoped files are those of a published release is published by reference:
-- it shares that release's rows (shares_data_with) instead of holding a copy.
ALTER TABLE abc.release DROP CONSTRAINT release_status_check;
ALTER TABLE abc.release ADD CONSTRAINT release_status_check
    CHECK (status IN ('upstream', 'skipped', 'mirroring', 'mirrored', 'loading', 'loaded', 'published', 'failed'));
ALTER TABLE abc.release ADD COLUMN shares_data_with text REFERENCES abc.release (version);
COMMENT ON COLUMN abc.release.shares_data_with IS
    'Published by reference: the release whose rows this one shares (its scoped files are the same).';

-- Where a published release's rows are: its own partitions, or those of the release it shares.
CREATE VIEW abc.published_release AS
SELECT version AS release, coalesce(shares_data_with, version) AS data_release, shares_data_with, published_at
FROM abc.release
WHERE status = 'published';
COMMENT ON VIEW abc.published_release IS
    'Published releases; query a release''s rows with release = data_release (shared when published by reference).';

-- The newest published release; data_release is where its rows are.
CREATE OR REPLACE VIEW abc.current_release AS
SELECT release, published_at, data_release
FROM abc.published_release
ORDER BY release DESC
LIMIT 1;

CREATE OR REPLACE VIEW abc.current_cell AS
SELECT * FROM abc.cell WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_gene AS
SELECT * FROM abc.gene WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_donor AS
SELECT * FROM abc.donor WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_library AS
SELECT * FROM abc.library WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_cluster AS
SELECT * FROM abc.cluster WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_cluster_annotation_term_set AS
SELECT * FROM abc.cluster_annotation_term_set WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_cluster_annotation_term AS
SELECT * FROM abc.cluster_annotation_term WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_cluster_membership AS
SELECT * FROM abc.cluster_membership WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_cell_cluster_membership AS
SELECT * FROM abc.cell_cluster_membership WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_cell_embedding AS
SELECT * FROM abc.cell_embedding WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_value_set AS
SELECT * FROM abc.value_set WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_cluster_taxonomy AS
SELECT * FROM abc.cluster_taxonomy WHERE release = (SELECT data_release FROM abc.current_release);
CREATE OR REPLACE VIEW abc.current_cell_annotated AS
SELECT * FROM abc.cell_annotated WHERE release = (SELECT data_release FROM abc.current_release);

GRANT SELECT ON abc.published_release TO abc_reader;
