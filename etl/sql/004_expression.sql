-- Expression aggregated per metadata dataset x grouping x group x gene (written by etl/aggregate.py).
--
-- Four additive statistics of the log2(CPM+1) expression are kept per (group, gene): the group's
-- number of cells, the number of its cells with non-zero expression, the sum and the sum of
-- squares; mean, variance and fraction expressing follow. Pairs with no expressing cell are not
-- stored (their mean and fraction are 0).
--
-- The same statistics are stored twice, as arrays, once per access path:
--   expression_gene_major:  one row per gene,  arrays over the groups that express it
--                           ("where is Gad1 expressed?": one row)
--   expression_group_major: one row per group, arrays over the genes it expresses
--                           ("top 50 genes of cluster X": one row)
-- Analysts use the views at the end, which return plain rows.
-- Every table is LIST-partitioned by release and published with etl/publish.py.

CREATE TABLE abc.expression_gene (
    release          text NOT NULL,
    dataset          text NOT NULL,
    gene_index       integer NOT NULL,
    gene_identifier  text NOT NULL,
    gene_symbol      text,
    PRIMARY KEY (release, dataset, gene_index)
) PARTITION BY LIST (release);
CREATE INDEX expression_gene_symbol_idx ON abc.expression_gene (release, dataset, gene_symbol);
CREATE INDEX expression_gene_identifier_idx ON abc.expression_gene (release, dataset, gene_identifier);
COMMENT ON TABLE abc.expression_gene IS 'Genes of a dataset''s matrices; gene_index is the var position.';

CREATE TABLE abc.expression_group (
    release                     text NOT NULL,
    dataset                     text NOT NULL,
    grouping                    text NOT NULL
                                CHECK (grouping IN ('cluster', 'supertype', 'subclass', 'class', 'region_subclass')),
    group_index                 integer NOT NULL,
    group_label                 text NOT NULL,
    group_name                  text,
    region_of_interest_acronym  text NOT NULL DEFAULT '',
    n_cells                     bigint NOT NULL CHECK (n_cells > 0),
    PRIMARY KEY (release, dataset, grouping, group_index),
    UNIQUE (release, dataset, grouping, group_label, region_of_interest_acronym)
) PARTITION BY LIST (release);
CREATE INDEX expression_group_name_idx ON abc.expression_group (release, dataset, grouping, group_name);
COMMENT ON TABLE abc.expression_group IS
    'Groups of a grouping: a taxonomy term (label, name), or a region x subclass pair; n_cells aggregated.';

CREATE TABLE abc.expression_gene_major (
    release      text NOT NULL,
    dataset      text NOT NULL,
    grouping     text NOT NULL,
    gene_index   integer NOT NULL,
    group_index  integer[] NOT NULL,
    n_nonzero    integer[] NOT NULL,
    sum          double precision[] NOT NULL,
    sum_sq       double precision[] NOT NULL,
    PRIMARY KEY (release, dataset, grouping, gene_index)
) PARTITION BY LIST (release);

CREATE TABLE abc.expression_group_major (
    release      text NOT NULL,
    dataset      text NOT NULL,
    grouping     text NOT NULL,
    group_index  integer NOT NULL,
    gene_index   integer[] NOT NULL,
    n_nonzero    integer[] NOT NULL,
    sum          double precision[] NOT NULL,
    sum_sq       double precision[] NOT NULL,
    PRIMARY KEY (release, dataset, grouping, group_index)
) PARTITION BY LIST (release);

-- Which matrix files went into each dataset's statistics, and how many of their cells.
CREATE TABLE abc.expression_file (
    release             text NOT NULL,
    dataset             text NOT NULL,
    source              text NOT NULL,
    normalization       text NOT NULL CHECK (normalization IN ('log2', 'raw')),
    n_cells_in_file     bigint NOT NULL,
    n_cells_aggregated  bigint NOT NULL,
    PRIMARY KEY (release, dataset, source)
) PARTITION BY LIST (release);

-- Plain rows, filtered fast by gene (gene-major arrays).
CREATE VIEW abc.expression_by_gene AS
SELECT e.release, e.dataset, e.grouping, g.group_label, g.group_name, g.region_of_interest_acronym,
       x.gene_identifier, x.gene_symbol, g.n_cells, u.n_nonzero,
       u.sum / g.n_cells AS mean,
       CASE WHEN g.n_cells > 1 THEN greatest(0, (u.sum_sq - u.sum * u.sum / g.n_cells) / (g.n_cells - 1)) END
           AS variance,
       u.n_nonzero::double precision / g.n_cells AS fraction,
       u.sum, u.sum_sq
FROM abc.expression_gene_major e
JOIN abc.expression_gene x ON x.release = e.release AND x.dataset = e.dataset AND x.gene_index = e.gene_index
CROSS JOIN LATERAL unnest(e.group_index, e.n_nonzero, e.sum, e.sum_sq) AS u(group_index, n_nonzero, sum, sum_sq)
JOIN abc.expression_group g ON g.release = e.release AND g.dataset = e.dataset AND g.grouping = e.grouping
                           AND g.group_index = u.group_index;
COMMENT ON VIEW abc.expression_by_gene IS
    'Aggregated expression, one row per (group, gene) with expression; fast when filtered by gene.';

-- The same rows, filtered fast by group (group-major arrays).
CREATE VIEW abc.expression_profile AS
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
CROSS JOIN LATERAL unnest(e.gene_index, e.n_nonzero, e.sum, e.sum_sq) AS u(gene_index, n_nonzero, sum, sum_sq)
JOIN abc.expression_gene x ON x.release = e.release AND x.dataset = e.dataset AND x.gene_index = u.gene_index;
COMMENT ON VIEW abc.expression_profile IS
    'Aggregated expression, one row per (group, gene) with expression; fast when filtered by group.';

-- One pair of views per grouping: expression_by_<grouping> (filter by gene) and
-- <grouping>_profile (filter by group), e.g. abc.expression_by_cluster, abc.cluster_profile.
CREATE VIEW abc.expression_by_cluster AS SELECT * FROM abc.expression_by_gene WHERE grouping = 'cluster';
CREATE VIEW abc.expression_by_supertype AS SELECT * FROM abc.expression_by_gene WHERE grouping = 'supertype';
CREATE VIEW abc.expression_by_subclass AS SELECT * FROM abc.expression_by_gene WHERE grouping = 'subclass';
CREATE VIEW abc.expression_by_class AS SELECT * FROM abc.expression_by_gene WHERE grouping = 'class';
CREATE VIEW abc.expression_by_region_subclass AS
    SELECT * FROM abc.expression_by_gene WHERE grouping = 'region_subclass';
CREATE VIEW abc.cluster_profile AS SELECT * FROM abc.expression_profile WHERE grouping = 'cluster';
CREATE VIEW abc.supertype_profile AS SELECT * FROM abc.expression_profile WHERE grouping = 'supertype';
CREATE VIEW abc.subclass_profile AS SELECT * FROM abc.expression_profile WHERE grouping = 'subclass';
CREATE VIEW abc.class_profile AS SELECT * FROM abc.expression_profile WHERE grouping = 'class';
CREATE VIEW abc.region_subclass_profile AS
    SELECT * FROM abc.expression_profile WHERE grouping = 'region_subclass';
