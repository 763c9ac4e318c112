-- The per-cluster cell count's join with plain against covering primary keys (INCLUDE (dataset, cluster_alias)),
-- synthetic 7.65 M x 7.65 M. psql -h 127.0.0.1 -p 55432 -U postgres -f THIS_FILE
\set ON_ERROR_STOP on
DROP DATABASE IF EXISTS abc_bench_cover;
CREATE DATABASE abc_bench_cover;
\c abc_bench_cover
SET maintenance_work_mem = '512MB';
BEGIN;
CREATE TABLE cell (release text NOT NULL, dataset text NOT NULL, cell_label text NOT NULL, cluster_alias int, x float8, CHECK (release = 'r1'));
COPY cell FROM PROGRAM 'seq 1 7651713 | awk ''{printf "r1,%s,%08x-%d,,0.5\n", ($1 % 2 ? "Consensus-WMB-AIBS-10X" : "Consensus-WMB-Macosko-10X"), $1 * 2654435761 % 4294967296, $1}''' (FORMAT csv, FREEZE true);
CREATE TABLE m (release text NOT NULL, dataset text NOT NULL, cell_label text NOT NULL, cluster_alias int NOT NULL);
COPY m FROM PROGRAM 'seq 1 7651713 | awk ''{printf "r1,tax,%08x-%d,%d\n", $1 * 2654435761 % 4294967296, $1, 1 + $1 % 6721}''' (FORMAT csv, FREEZE true);
COMMIT;
\timing on
\echo plain primary keys
ALTER TABLE cell ADD PRIMARY KEY (release, cell_label);
ALTER TABLE m ADD PRIMARY KEY (release, cell_label);
ANALYZE cell; ANALYZE m;
EXPLAIN SELECT c.release, c.dataset, coalesce(c.cluster_alias, m.cluster_alias), count(*) FROM cell c LEFT JOIN m ON m.cell_label = c.cell_label GROUP BY 1, 2, 3;
CREATE TABLE cc1 AS SELECT c.release, c.dataset, coalesce(c.cluster_alias, m.cluster_alias) AS a, count(*) FROM cell c LEFT JOIN m ON m.cell_label = c.cell_label GROUP BY 1, 2, 3;
\echo covering primary keys
ALTER TABLE cell DROP CONSTRAINT cell_pkey; ALTER TABLE m DROP CONSTRAINT m_pkey;
ALTER TABLE cell ADD PRIMARY KEY (release, cell_label) INCLUDE (dataset, cluster_alias);
ALTER TABLE m ADD PRIMARY KEY (release, cell_label) INCLUDE (cluster_alias);
ANALYZE cell; ANALYZE m;
EXPLAIN SELECT c.release, c.dataset, coalesce(c.cluster_alias, m.cluster_alias), count(*) FROM cell c LEFT JOIN m ON m.release = c.release AND m.cell_label = c.cell_label GROUP BY 1, 2, 3;
CREATE TABLE cc2 AS SELECT c.release, c.dataset, coalesce(c.cluster_alias, m.cluster_alias) AS a, count(*) FROM cell c LEFT JOIN m ON m.release = c.release AND m.cell_label = c.cell_label GROUP BY 1, 2, 3;
\timing off
SELECT (SELECT count(*) FROM (SELECT * FROM cc1 EXCEPT SELECT * FROM cc2) d) AS differ, (SELECT count(*) FROM cc1) AS rows;
\c postgres
DROP DATABASE abc_bench_cover;
