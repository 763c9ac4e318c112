-- Analyst queries at full size (7.65 M cells, 6,721 clusters x 32,285 genes x 2 datasets; measured by
-- benchmarks/bench_queries.py, figures and plans in benchmarks/RESULTS.md).

-- 1. The expression views unnest arrays of thousands of elements, which PostgreSQL before 17 estimates
-- at 10 rows: the planner then joins each element to its group (or gene) by an index lookup, 10,000
-- lookups for one gene across the clusters of two datasets. unnest_statistics is the same unnest
-- with a realistic estimate (ROWS), so those joins hash or merge instead. STRICT keeps the function
-- from being inlined, which would bring back unnest's own estimate.
CREATE FUNCTION abc.unnest_statistics(integer[], integer[], double precision[], double precision[])
RETURNS TABLE (element_index integer, n_nonzero integer, sum double precision, sum_sq double precision)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE ROWS 2000
AS $$ SELECT * FROM unnest($1, $2, $3, $4) $$;
COMMENT ON FUNCTION abc.unnest_statistics(integer[], integer[], double precision[], double precision[]) IS
    'unnest of one row of expression arrays, with a row estimate (ROWS) the planner can join on.';

CREATE OR REPLACE VIEW abc.expression_by_gene AS
SELECT e.release, e.dataset, e.grouping, g.group_label, g.group_name, g.region_of_interest_acronym,
       x.gene_identifier, x.gene_symbol, g.n_cells, u.n_nonzero,
       u.sum / g.n_cells AS mean,
       CASE WHEN g.n_cells > 1 THEN greatest(0, (u.sum_sq - u.sum * u.sum / g.n_cells) / (g.n_cells - 1)) END
           AS variance,
       u.n_nonzero::double precision / g.n_cells AS fraction,
       u.sum, u.sum_sq
FROM abc.expression_gene_major e
JOIN abc.expression_gene x ON x.release = e.release AND x.dataset = e.dataset AND x.gene_index = e.gene_index
CROSS JOIN LATERAL abc.unnest_statistics(e.group_index, e.n_nonzero, e.sum, e.sum_sq)
    AS u(group_index, n_nonzero, sum, sum_sq)
JOIN abc.expression_group g ON g.release = e.release AND g.dataset = e.dataset AND g.grouping = e.grouping
                           AND g.group_index = u.group_index;

CREATE OR REPLACE VIEW abc.expression_profile AS
SELECT e.release, e.dataset, e.grouping, g.group_label, g.group_name, g.region_of_interest_acronym,
       x.gene_identifier, x.gene_symbol, g.n_cells, u.n_nonzero,
       u.sum / g.n_cells AS mean,
       CASE WHEN g.n_cells > 1 THEN greatest(0, (u.sum_sq - u.sum * u.sum / g.n_cells) / (g.n_cells - 1)) END
           AS variance,
       u.n_nonzero::double precision / g.n_cells AS fraction,
       u.sum, u.sum_sq
FROM abc.expression_group_major e
JOIN abc.expression_group g ON g.release = e.release AND g.dataset = e.dataset AND g.grouping = e.grouping
                           AND g.group_index = e.group_index
CROSS JOIN LATERAL abc.unnest_statistics(e.gene_index, e.n_nonzero, e.sum, e.sum_sq)
    AS u(gene_index, n_nonzero, sum, sum_sq)
JOIN abc.expression_gene x ON x.release = e.release AND x.dataset = e.dataset AND x.gene_index = u.gene_index;

GRANT EXECUTE ON FUNCTION abc.unnest_statistics(integer[], integer[], double precision[], double precision[])
    TO abc_reader;

-- 2. A gene by symbol in the current release (release = (SELECT data_release ...), known only when the
-- query runs), across datasets: the (release, dataset, gene_symbol) index cannot seek without the
-- dataset. Each partition holds one release, so the symbol alone suffices.
CREATE INDEX expression_gene_symbol_any_dataset_idx ON abc.expression_gene (gene_symbol);

-- 3. Cells per dataset and cluster, counted once when the metadata is staged (etl/load.py) and published
-- with it: "cells per class" and "clusters in both datasets" read 2 x 6,721 rows instead of joining
-- and counting 7.65 M cells (35 s at full size even with a good plan). cluster_alias is NULL for cells
-- without a cluster.
CREATE TABLE abc.cluster_cell_count (
    release        text NOT NULL,
    dataset        text NOT NULL,
    cluster_alias  integer,
    n_cells        bigint NOT NULL CHECK (n_cells > 0),
    UNIQUE NULLS NOT DISTINCT (release, dataset, cluster_alias)
) PARTITION BY LIST (release);
COMMENT ON TABLE abc.cluster_cell_count IS
    'Cells per dataset and cluster of a release (a cell''s own cluster_alias or its cell_cluster_membership row).';

-- Cells per dataset and taxonomy term of every level (class, subclass, supertype, cluster, ...), summed
-- from the counts per cluster: filter on term_set_name. (A join with the pivoted abc.cluster_taxonomy
-- costs more than the counts themselves: 55-100 ms against 25-45 ms for this, measured under load.)
CREATE VIEW abc.term_cell_count AS
SELECT n.release, n.dataset, m.cluster_annotation_term_set_name AS term_set_name,
       m.cluster_annotation_term_label AS term_label, m.cluster_annotation_term_name AS term_name,
       sum(n.n_cells) AS n_cells
FROM abc.cluster_cell_count n
JOIN abc.cluster_membership m ON m.release = n.release AND m.cluster_alias = n.cluster_alias
GROUP BY n.release, n.dataset, m.cluster_annotation_term_set_name, m.cluster_annotation_term_label,
         m.cluster_annotation_term_name;
COMMENT ON VIEW abc.term_cell_count IS
    'Cells per dataset and taxonomy term (term_set_name: class, subclass, supertype, cluster, ...); cells with a cluster.';

CREATE VIEW abc.current_cluster_cell_count AS
SELECT * FROM abc.cluster_cell_count WHERE release = (SELECT data_release FROM abc.current_release);
CREATE VIEW abc.current_term_cell_count AS
SELECT * FROM abc.term_cell_count WHERE release = (SELECT data_release FROM abc.current_release);

GRANT SELECT ON abc.term_cell_count, abc.current_cluster_cell_count, abc.current_term_cell_count TO abc_reader;

-- Releases loaded before this migration: their counts, published or staged beside their cells. (No
-- format(): the migration runner passes the text through a DB-API driver, which takes a percent sign
-- for a parameter.)
DO $$
DECLARE
    loaded record;
    counts text;
BEGIN
    FOR loaded IN
        SELECT 'abc_part' AS schema_name, r.version AS release FROM abc.release r
        WHERE to_regclass('abc_part.cell_r' || r.version) IS NOT NULL
        UNION ALL
        SELECT 'abc_staging', r.version FROM abc.release r
        WHERE to_regclass('abc_staging.cell_r' || r.version) IS NOT NULL
          AND to_regclass('abc_staging.cell_cluster_membership_r' || r.version) IS NOT NULL
    LOOP
        counts := quote_ident(loaded.schema_name) || '.' || quote_ident('cluster_cell_count_r' || loaded.release);
        IF loaded.schema_name = 'abc_part' THEN
            EXECUTE 'CREATE TABLE ' || counts || ' PARTITION OF abc.cluster_cell_count FOR VALUES IN ('
                    || quote_literal(loaded.release) || ')';
        ELSE
            -- As etl/publish.py stages a table; ATTACH builds its unique index at publication.
            EXECUTE 'CREATE TABLE ' || counts || ' (LIKE abc.cluster_cell_count INCLUDING DEFAULTS '
                    || 'INCLUDING CONSTRAINTS, CONSTRAINT '
                    || quote_ident('cluster_cell_count_r' || loaded.release || '_release_check')
                    || ' CHECK (release = ' || quote_literal(loaded.release) || '))';
        END IF;
        EXECUTE 'INSERT INTO ' || counts || ' (release, dataset, cluster_alias, n_cells) '
                || 'SELECT c.release, c.dataset, coalesce(c.cluster_alias, m.cluster_alias), count(*) FROM '
                || quote_ident(loaded.schema_name) || '.' || quote_ident('cell_r' || loaded.release) || ' c '
                || 'LEFT JOIN ' || quote_ident(loaded.schema_name) || '.'
                || quote_ident('cell_cluster_membership_r' || loaded.release) || ' m ON m.cell_label = c.cell_label '
                || 'GROUP BY 1, 2, 3';
    END LOOP;
END $$;

-- 4. No statistics of the expression arrays: no query filters on them, and ANALYZE reads every
-- sampled array whole (67 s for the gene-major arrays of one full release, 41 s for the group-major
-- ones; 0.9 s and 0.03 s without). Set on the parents and their partitions here, on new partitions
-- by etl/aggregate.py when it stages them.
ALTER TABLE abc.expression_gene_major ALTER COLUMN group_index SET STATISTICS 0,
    ALTER COLUMN n_nonzero SET STATISTICS 0, ALTER COLUMN sum SET STATISTICS 0, ALTER COLUMN sum_sq SET STATISTICS 0;
ALTER TABLE abc.expression_group_major ALTER COLUMN gene_index SET STATISTICS 0,
    ALTER COLUMN n_nonzero SET STATISTICS 0, ALTER COLUMN sum SET STATISTICS 0, ALTER COLUMN sum_sq SET STATISTICS 0;

-- 5. Statistics of the partitioned tables as a whole. Autovacuum analyses partitions but never their
-- partitioned parent, and without the parent's statistics every join of a view over a release known
-- only at run time (the abc.current_* views) is estimated with default selectivities: at 7.65 M
-- cells, abc.current_cell_annotated was planned as a merge join of every cell with every donor of
-- its dataset (10^20 rows estimated) and did not finish. etl/publish.py analyses the parents after
-- each publication; this analyses the releases published before it.
ANALYZE abc.cluster_annotation_term_set, abc.cluster_annotation_term, abc.cluster, abc.cluster_membership,
    abc.gene, abc.donor, abc.library, abc.cell, abc.cell_cluster_membership, abc.cell_embedding, abc.value_set,
    abc.cluster_cell_count, abc.expression_gene, abc.expression_group, abc.expression_gene_major,
    abc.expression_group_major, abc.expression_file;
