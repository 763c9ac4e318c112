-- A stage owned by one process (the CLI, a script: neither an Airflow DAG run nor ABC_STAGE_OWNER) lives
-- as long as that process: the process holds an advisory lock named after its owner on a session of its
-- own (etl/publish.py), which PostgreSQL releases when the process dies, however it dies. A live stage
-- whose owning process no longer holds that lock is abandoned: never read as the release, taken over
-- by the next run.
ALTER TABLE abc.stage ADD COLUMN owned_by_process boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN abc.stage.owned_by_process IS
    'The owner is one process: the stage is abandoned once that process no longer holds its owner lock.';
