-- What analysts query: cells with their whole taxonomy, donor and library, and abc.current_*
-- views of the newest published release; the read-only role abc_reader sees only these views.

-- One row per cluster with each level's term label, name and colour: the pivoted and colour
-- CSVs of the taxonomy, derived from abc.cluster_membership so they can never disagree with it.
CREATE VIEW abc.cluster_taxonomy AS
SELECT release, cluster_alias,
       max(cluster_annotation_term_label) FILTER (WHERE cluster_annotation_term_set_name = 'neighborhood')
           AS neighborhood_label,
       max(cluster_annotation_term_name) FILTER (WHERE cluster_annotation_term_set_name = 'neighborhood')
           AS neighborhood_name,
       max(cluster_annotation_term_label) FILTER (WHERE cluster_annotation_term_set_name = 'class') AS class_label,
       max(cluster_annotation_term_name) FILTER (WHERE cluster_annotation_term_set_name = 'class') AS class_name,
       max(color_hex_triplet) FILTER (WHERE cluster_annotation_term_set_name = 'class') AS class_color,
       max(cluster_annotation_term_label) FILTER (WHERE cluster_annotation_term_set_name = 'subclass')
           AS subclass_label,
       max(cluster_annotation_term_name) FILTER (WHERE cluster_annotation_term_set_name = 'subclass') AS subclass_name,
       max(color_hex_triplet) FILTER (WHERE cluster_annotation_term_set_name = 'subclass') AS subclass_color,
       max(cluster_annotation_term_label) FILTER (WHERE cluster_annotation_term_set_name = 'supertype')
           AS supertype_label,
       max(cluster_annotation_term_name) FILTER (WHERE cluster_annotation_term_set_name = 'supertype')
           AS supertype_name,
       max(color_hex_triplet) FILTER (WHERE cluster_annotation_term_set_name = 'supertype') AS supertype_color,
       max(cluster_annotation_term_label) FILTER (WHERE cluster_annotation_term_set_name = 'cluster') AS cluster_label,
       max(cluster_annotation_term_name) FILTER (WHERE cluster_annotation_term_set_name = 'cluster') AS cluster_name,
       max(color_hex_triplet) FILTER (WHERE cluster_annotation_term_set_name = 'cluster') AS cluster_color
FROM abc.cluster_membership
GROUP BY release, cluster_alias;

-- A cell's cluster is its own cluster_alias or the taxonomy's cell_to_cluster_membership row, its
-- region its own or its library's, its x/y its own or the cell_2d_embedding_coordinates ones: the
-- consensus release keeps them in those files rather than in cell_metadata.csv.
CREATE VIEW abc.cell_annotated AS
SELECT c.release, c.dataset, c.cell_label, a.cluster_alias,
       t.neighborhood_label, t.neighborhood_name,
       t.class_label, t.class_name, t.class_color,
       t.subclass_label, t.subclass_name, t.subclass_color,
       t.supertype_label, t.supertype_name, t.supertype_color,
       coalesce(t.cluster_label, k.label) AS cluster_label, t.cluster_name, t.cluster_color,
       coalesce(c.region_of_interest_acronym, l.region_of_interest_acronym) AS region_of_interest_acronym,
       l.anatomical_division_label, c.feature_matrix_label, c.dataset_label, c.entity,
       c.library_label, coalesce(c.library_method, l.library_method) AS library_method,
       c.barcoded_cell_sample_label, c.cell_barcode, c.brain_section_label, c.abc_sample_id,
       coalesce(c.donor_label, l.donor_label) AS donor_label,
       coalesce(c.donor_genotype, d.donor_genotype) AS donor_genotype,
       coalesce(c.donor_sex, d.donor_sex) AS donor_sex, d.donor_age, d.origin_dataset,
       coalesce(c.x, e.x) AS x, coalesce(c.y, e.y) AS y, c.gene_count, c.umi_count, c.doublet_score,
       c.extra, l.extra AS library_extra, d.extra AS donor_extra
FROM abc.cell c
LEFT JOIN abc.cell_cluster_membership m ON m.release = c.release AND m.cell_label = c.cell_label
CROSS JOIN LATERAL (SELECT coalesce(c.cluster_alias, m.cluster_alias) AS cluster_alias) a
LEFT JOIN abc.cluster k ON k.release = c.release AND k.cluster_alias = a.cluster_alias
LEFT JOIN abc.cluster_taxonomy t ON t.release = c.release AND t.cluster_alias = a.cluster_alias
LEFT JOIN abc.library l ON l.release = c.release AND l.dataset = c.dataset AND l.library_label = c.library_label
LEFT JOIN abc.donor d ON d.release = c.release AND d.dataset = c.dataset
    AND d.donor_label = coalesce(c.donor_label, l.donor_label)
LEFT JOIN abc.cell_embedding e ON e.release = c.release AND e.embedding = 'cell_2d_embedding_coordinates'
    AND e.cell_label = c.cell_label;

-- The newest published release of every table and view above; `release = (SELECT ...)` lets the
-- planner prune to that one partition at run time.
CREATE VIEW abc.current_cell AS
SELECT * FROM abc.cell WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_gene AS
SELECT * FROM abc.gene WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_donor AS
SELECT * FROM abc.donor WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_library AS
SELECT * FROM abc.library WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_cluster AS
SELECT * FROM abc.cluster WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_cluster_annotation_term_set AS
SELECT * FROM abc.cluster_annotation_term_set WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_cluster_annotation_term AS
SELECT * FROM abc.cluster_annotation_term WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_cluster_membership AS
SELECT * FROM abc.cluster_membership WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_cell_cluster_membership AS
SELECT * FROM abc.cell_cluster_membership WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_cell_embedding AS
SELECT * FROM abc.cell_embedding WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_value_set AS
SELECT * FROM abc.value_set WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_cluster_taxonomy AS
SELECT * FROM abc.cluster_taxonomy WHERE release = (SELECT release FROM abc.current_release);
CREATE VIEW abc.current_cell_annotated AS
SELECT * FROM abc.cell_annotated WHERE release = (SELECT release FROM abc.current_release);

-- Roles belong to the server, not the database: create once, tolerate a concurrent creator.
-- Analysts log in with their own role and are granted abc_reader.
DO $$
BEGIN
    CREATE ROLE abc_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
GRANT USAGE ON SCHEMA abc TO abc_reader;
GRANT SELECT ON abc.current_release, abc.cluster_taxonomy, abc.cell_annotated,
    abc.current_cell, abc.current_gene, abc.current_donor, abc.current_library, abc.current_cluster,
    abc.current_cluster_annotation_term_set, abc.current_cluster_annotation_term,
    abc.current_cluster_membership, abc.current_cell_cluster_membership, abc.current_cell_embedding,
    abc.current_value_set, abc.current_cluster_taxonomy, abc.current_cell_annotated
    TO abc_reader;
