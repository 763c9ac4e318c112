-- The per-cluster cell count's join (etl/load.py _stage_cell_counts) on synthetic 7.65 M cells x 7.65 M
-- membership rows: work_mem 4 MB against 1 GB, each twice. psql -h 127.0.0.1 -p 55432 -U postgres -f THIS_FILE
\set ON_ERROR_STOP on
DROP DATABASE IF EXISTS abc_bench_wm;
CREATE DATABASE abc_bench_wm;
\c abc_bench_wm
BEGIN;
CREATE TABLE cell (release text NOT NULL, dataset text NOT NULL, cell_label text NOT NULL, cluster_alias int, x float8, CHECK (release = 'r1'));
COPY cell FROM PROGRAM 'seq 1 7651713 | awk ''{printf "r1,%s,%08x-%d,,0.5\n", ($1 % 2 ? "Consensus-WMB-AIBS-10X" : "Consensus-WMB-Macosko-10X"), $1 * 2654435761 % 4294967296, $1}''' (FORMAT csv, FREEZE true);
CREATE TABLE m (release text NOT NULL, dataset text NOT NULL, cell_label text NOT NULL, cluster_alias int NOT NULL);
COPY m FROM PROGRAM 'seq 1 7651713 | awk ''{printf "r1,tax,%08x-%d,%d\n", $1 * 2654435761 % 4294967296, $1, 1 + $1 % 6721}''' (FORMAT csv, FREEZE true);
COMMIT;
ANALYZE cell; ANALYZE m;
\timing on
\echo work_mem 4MB
EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) SELECT c.release, c.dataset, coalesce(c.cluster_alias, m.cluster_alias), count(*) FROM cell c LEFT JOIN m ON m.cell_label = c.cell_label GROUP BY 1, 2, 3;
\echo work_mem 1GB
SET work_mem = '1GB';
EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) SELECT c.release, c.dataset, coalesce(c.cluster_alias, m.cluster_alias), count(*) FROM cell c LEFT JOIN m ON m.cell_label = c.cell_label GROUP BY 1, 2, 3;
RESET work_mem;
\echo work_mem 4MB again
EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) SELECT c.release, c.dataset, coalesce(c.cluster_alias, m.cluster_alias), count(*) FROM cell c LEFT JOIN m ON m.cell_label = c.cell_label GROUP BY 1, 2, 3;
\echo work_mem 1GB again
SET work_mem = '1GB';
EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) SELECT c.release, c.dataset, coalesce(c.cluster_alias, m.cluster_alias), count(*) FROM cell c LEFT JOIN m ON m.cell_label = c.cell_label GROUP BY 1, 2, 3;
\c postgres
DROP DATABASE abc_bench_wm;
