-- ATTACH PARTITION of a full-size cell partition: the foreign-key validation's plan, PostgreSQL's
-- default against etl.publish.FOREIGN_KEY_CHECK_PLAN (hash anti join). Self-contained: run with
--     psql -h 127.0.0.1 -p 55432 -U postgres -f benchmarks/attach_fk_plan.sql
-- It builds, in a scratch database, the shape of abc.cluster / abc.cell_cluster_membership (6,721
-- clusters, 7,651,713 cells, CHECK (release = ...) so ATTACH skips the partition-constraint scan and
-- the primary key built first so ATTACH reuses it), then attaches the cells three times each way,
-- rolled back in between, so only the foreign key's validation is timed.
\set ON_ERROR_STOP on
DROP DATABASE IF EXISTS abc_bench_attach;
CREATE DATABASE abc_bench_attach;
\c abc_bench_attach
CREATE TABLE cluster (release text NOT NULL, cluster_alias integer NOT NULL, PRIMARY KEY (release, cluster_alias))
    PARTITION BY LIST (release);
CREATE TABLE membership (release text NOT NULL, cell_label text NOT NULL, cluster_alias integer NOT NULL,
    PRIMARY KEY (release, cell_label), FOREIGN KEY (release, cluster_alias) REFERENCES cluster (release, cluster_alias))
    PARTITION BY LIST (release);
CREATE TABLE cluster_r1 (LIKE cluster INCLUDING ALL, CHECK (release = 'r1'));
INSERT INTO cluster_r1 SELECT 'r1', g FROM generate_series(1, 6721) g;
ALTER TABLE cluster ATTACH PARTITION cluster_r1 FOR VALUES IN ('r1');
CREATE TABLE membership_r1 (LIKE membership INCLUDING DEFAULTS, CHECK (release = 'r1'));
INSERT INTO membership_r1 SELECT 'r1', md5(g::text) || '-' || g, 1 + g % 6721 FROM generate_series(1, 7651713) g;
ALTER TABLE membership_r1 ADD PRIMARY KEY (release, cell_label);
ANALYZE membership_r1;
ANALYZE cluster_r1;
\timing on
\echo default plan
BEGIN; ALTER TABLE membership ATTACH PARTITION membership_r1 FOR VALUES IN ('r1'); ROLLBACK;
BEGIN; ALTER TABLE membership ATTACH PARTITION membership_r1 FOR VALUES IN ('r1'); ROLLBACK;
BEGIN; ALTER TABLE membership ATTACH PARTITION membership_r1 FOR VALUES IN ('r1'); ROLLBACK;
\echo FOREIGN_KEY_CHECK_PLAN
BEGIN; SET LOCAL enable_mergejoin = off; SET LOCAL enable_nestloop = off;
ALTER TABLE membership ATTACH PARTITION membership_r1 FOR VALUES IN ('r1'); ROLLBACK;
BEGIN; SET LOCAL enable_mergejoin = off; SET LOCAL enable_nestloop = off;
ALTER TABLE membership ATTACH PARTITION membership_r1 FOR VALUES IN ('r1'); ROLLBACK;
BEGIN; SET LOCAL enable_mergejoin = off; SET LOCAL enable_nestloop = off;
ALTER TABLE membership ATTACH PARTITION membership_r1 FOR VALUES IN ('r1'); ROLLBACK;
\timing off
\echo the validation query as PostgreSQL plans it (RI_Initial_Check's shape), default settings
EXPLAIN SELECT fk.release, fk.cluster_alias FROM ONLY membership_r1 fk
    LEFT JOIN cluster pk ON pk.release = fk.release AND pk.cluster_alias = fk.cluster_alias
    WHERE pk.release IS NULL AND fk.release IS NOT NULL AND fk.cluster_alias IS NOT NULL;
\c postgres
DROP DATABASE abc_bench_attach;
