#!/bin/bash
# First start of the postgres container (docker-entrypoint-initdb.d). Airflow's metadata database
# is POSTGRES_DB (airflow, owned by the superuser POSTGRES_USER); the atlas warehouse is a separate
# database, so that it can be backed up, sized and moved on its own, owned by abc_etl:
#   abc_etl     the ETL (workers, init): owns the database abc and everything in it; no superuser.
#               CREATEROLE only because migration 006 runs `CREATE ROLE abc_reader` (a no-op here:
#               the role exists); on PostgreSQL 16 that lets it manage only roles it created.
#   abc_reader  the read-only analyst role of docs/schema.md (NOLOGIN; views only).
#   abc_web     the login of the "ABC releases" page: member of abc_reader, and SELECT on the
#               tables abc_etl creates (default privileges), nothing else.
# The schema inside abc is created by `abc-mirror db upgrade` (airflow-init) as abc_etl.
set -euo pipefail
: "${ABC_ETL_PASSWORD:?set ABC_ETL_PASSWORD}" "${ABC_WEB_PASSWORD:?set ABC_WEB_PASSWORD}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v etl_password="$ABC_ETL_PASSWORD" -v web_password="$ABC_WEB_PASSWORD" <<'SQL'
CREATE ROLE abc_etl LOGIN NOSUPERUSER NOCREATEDB CREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'etl_password';
CREATE ROLE abc_reader NOLOGIN;
CREATE ROLE abc_web LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE IN ROLE abc_reader PASSWORD :'web_password';
CREATE DATABASE abc OWNER abc_etl;
REVOKE ALL ON DATABASE abc FROM PUBLIC;
GRANT CONNECT ON DATABASE abc TO abc_web, abc_reader;
\connect abc
-- Default privileges belong to a database: these are the warehouse's.
ALTER DEFAULT PRIVILEGES FOR ROLE abc_etl GRANT USAGE ON SCHEMAS TO abc_web;
ALTER DEFAULT PRIVILEGES FOR ROLE abc_etl GRANT SELECT ON TABLES TO abc_web;
SQL
