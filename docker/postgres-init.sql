-- First start of the postgres container: Airflow's metadata database is POSTGRES_DB (airflow);
-- the atlas warehouse is a separate database, so that it can be backed up, sized and moved
-- on its own. The schema inside it is created by `abc-mirror db upgrade` (airflow-init).
CREATE DATABASE abc;
