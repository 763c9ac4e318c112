-- Cell, gene, donor, library and taxonomy metadata of a release (written by etl/load.py).
--
-- Every table is LIST-partitioned by release: a load COPYs into staging tables shaped like these
-- and etl/publish.py attaches them as the release's partitions in one transaction. `dataset` is
-- the manifest's dataset directory the row came from (e.g. 'Consensus-WMB-AIBS-10X'). Columns a
-- file has beyond the typed ones are kept, by their header name, in `extra`. Secondary indexes
-- leave out `release`: each partition holds one release, so it would only widen every entry.

CREATE TABLE abc.cluster_annotation_term_set (
    release                 text NOT NULL,
    dataset                 text NOT NULL,
    label                   text NOT NULL,
    name                    text NOT NULL,
    description             text,
    term_set_order          integer,
    parent_term_set_label   text,
    extra                   jsonb,
    PRIMARY KEY (release, label)
) PARTITION BY LIST (release);

CREATE TABLE abc.cluster_annotation_term (
    release                             text NOT NULL,
    dataset                             text NOT NULL,
    label                               text NOT NULL,
    name                                text,
    cluster_annotation_term_set_label   text,
    cluster_annotation_term_set_name    text,
    parent_term_label                   text,
    parent_term_name                    text,
    parent_term_set_label               text,
    term_set_order                      integer,
    term_order                          integer,
    color_hex_triplet                   text,
    extra                               jsonb,
    PRIMARY KEY (release, label),
    FOREIGN KEY (release, cluster_annotation_term_set_label)
        REFERENCES abc.cluster_annotation_term_set (release, label)
) PARTITION BY LIST (release);
CREATE INDEX cluster_annotation_term_set_name_idx
    ON abc.cluster_annotation_term (cluster_annotation_term_set_name);

CREATE TABLE abc.cluster (
    release          text NOT NULL,
    dataset          text NOT NULL,
    cluster_alias    integer NOT NULL,
    label            text,
    number_of_cells  integer,
    extra            jsonb,
    PRIMARY KEY (release, cluster_alias)
) PARTITION BY LIST (release);

-- cluster_to_cluster_annotation_membership.csv: one row per cluster and term set (level).
CREATE TABLE abc.cluster_membership (
    release                             text NOT NULL,
    dataset                             text NOT NULL,
    cluster_alias                       integer NOT NULL,
    cluster_annotation_term_set_name    text NOT NULL,
    cluster_annotation_term_set_label   text,
    cluster_annotation_term_label       text NOT NULL,
    cluster_annotation_term_name        text,
    number_of_cells                     integer,
    color_hex_triplet                   text,
    extra                               jsonb,
    PRIMARY KEY (release, cluster_alias, cluster_annotation_term_set_name),
    FOREIGN KEY (release, cluster_alias) REFERENCES abc.cluster (release, cluster_alias),
    FOREIGN KEY (release, cluster_annotation_term_label)
        REFERENCES abc.cluster_annotation_term (release, label)
) PARTITION BY LIST (release);
CREATE INDEX cluster_membership_term_idx ON abc.cluster_membership (cluster_annotation_term_label);

CREATE TABLE abc.gene (
    release                  text NOT NULL,
    dataset                  text NOT NULL,
    gene_identifier          text NOT NULL,
    gene_symbol              text,
    name                     text,
    mapped_ncbi_identifier   text,
    comment                  text,
    extra                    jsonb,
    PRIMARY KEY (release, dataset, gene_identifier)
) PARTITION BY LIST (release);
CREATE INDEX gene_symbol_idx ON abc.gene (gene_symbol);

CREATE TABLE abc.donor (
    release          text NOT NULL,
    dataset          text NOT NULL,
    donor_label      text NOT NULL,
    donor_genotype   text,
    donor_sex        text,
    donor_age        text,
    origin_dataset   text,
    extra            jsonb,
    PRIMARY KEY (release, dataset, donor_label)
) PARTITION BY LIST (release);

CREATE TABLE abc.library (
    release                      text NOT NULL,
    dataset                      text NOT NULL,
    library_label                text NOT NULL,
    library_method               text,
    region_of_interest_acronym   text,
    anatomical_division_label    text,
    donor_label                  text,
    alignment_id                 text,
    extra                        jsonb,
    PRIMARY KEY (release, dataset, library_label)
) PARTITION BY LIST (release);

CREATE TABLE abc.cell (
    release                      text NOT NULL,
    dataset                      text NOT NULL,
    cell_label                   text NOT NULL,
    cluster_alias                integer,
    cell_barcode                 text,
    barcoded_cell_sample_label   text,
    library_label                text,
    feature_matrix_label         text,
    entity                       text,
    brain_section_label          text,
    library_method               text,
    region_of_interest_acronym   text,
    donor_label                  text,
    donor_genotype               text,
    donor_sex                    text,
    dataset_label                text,
    x                            double precision,
    y                            double precision,
    abc_sample_id                text,
    gene_count                   integer,
    umi_count                    integer,
    doublet_score                double precision,
    extra                        jsonb,
    PRIMARY KEY (release, cell_label),
    FOREIGN KEY (release, cluster_alias) REFERENCES abc.cluster (release, cluster_alias)
) PARTITION BY LIST (release);
CREATE INDEX cell_cluster_idx ON abc.cell (cluster_alias);
CREATE INDEX cell_region_idx ON abc.cell (region_of_interest_acronym);

-- The consensus release keeps each cell's cluster in the taxonomy directory
-- (cell_to_cluster_membership.csv), not in cell_metadata.csv; abc.cell_annotated and
-- etl.load.cell_assignments take a cell's cluster from abc.cell.cluster_alias or from here.
CREATE TABLE abc.cell_cluster_membership (
    release          text NOT NULL,
    dataset          text NOT NULL,
    cell_label       text NOT NULL,
    cluster_alias    integer NOT NULL,
    extra            jsonb,
    PRIMARY KEY (release, cell_label),
    FOREIGN KEY (release, cluster_alias) REFERENCES abc.cluster (release, cluster_alias)
) PARTITION BY LIST (release);
CREATE INDEX cell_cluster_membership_cluster_idx ON abc.cell_cluster_membership (cluster_alias);

-- cell_2d_embedding_coordinates.csv and its per-neighborhood variants
-- (<neighborhood>_cell_2d_embedding_coordinates.csv); `embedding` is the file stem.
CREATE TABLE abc.cell_embedding (
    release          text NOT NULL,
    dataset          text NOT NULL,
    embedding        text NOT NULL,
    cell_label       text NOT NULL,
    x                double precision,
    y                double precision,
    extra            jsonb,
    PRIMARY KEY (release, embedding, cell_label)
) PARTITION BY LIST (release);

-- value_sets.csv: labels, order and colours of categorical values (donor_sex, anatomical divisions, ...).
CREATE TABLE abc.value_set (
    release               text NOT NULL,
    dataset               text NOT NULL,
    table_name            text NOT NULL,
    field                 text NOT NULL,
    label                 text NOT NULL,
    description           text,
    value_order           integer,
    external_identifier   text,
    parent_label          text,
    color_hex_triplet     text,
    comment               text,
    extra                 jsonb,
    PRIMARY KEY (release, dataset, table_name, field, label)
) PARTITION BY LIST (release);

-- What the last load of each release read: every metadata file of the manifest it was given,
-- the table it went to (NULL: not a table we load, with the reason) and the columns it kept in
-- `extra` because the schema does not know them yet.
CREATE TABLE abc.metadata_file (
    release          text NOT NULL REFERENCES abc.release (version) ON DELETE CASCADE,
    relative_path    text NOT NULL,
    dataset          text NOT NULL,
    table_name       text,
    row_count        bigint,
    unknown_columns  text[] NOT NULL DEFAULT '{}',
    note             text,
    loaded_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (release, relative_path)
);

-- The newest published release: every abc.current_* view reads through this one definition.
CREATE VIEW abc.current_release AS
SELECT version AS release, published_at
FROM abc.release
WHERE status = 'published'
ORDER BY version DESC
LIMIT 1;
