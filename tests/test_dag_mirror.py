"""The mirror DAG runs for real with dag.test(): rclone-served S3, PostgreSQL and a local mirror."""

from __future__ import annotations

import sqlalchemy as sa

from etl.catalog import release_files_on_disk
from etl.fixtures import OLD_RELEASE, md5_of_file
from tests.conftest import scoped_keys
from tests.test_dag_watch import load_dag


def _task_states(run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in run.get_task_instances()}


def test_mirror_dag_mirrors_one_release(airflow_home, settings, engine, generated_bucket, monkeypatch):
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    dag = load_dag("abc_mirror_release", "abc_mirror_release")
    assert dag.schedule is None and set(dag.params) >= {"release"}

    run = dag.test(run_conf={"release": OLD_RELEASE})
    assert run.state == "success", _task_states(run)
    files = release_files_on_disk(settings, engine, OLD_RELEASE)
    assert set(files) == set(scoped_keys(generated_bucket, OLD_RELEASE))
    assert all(md5_of_file(path) == md5_of_file(generated_bucket.bucket_dir / key) for key, path in files.items())
    with engine.connect() as conn:
        status = conn.execute(sa.text("SELECT status FROM abc.release WHERE version = :r"),
                              {"r": OLD_RELEASE}).scalar_one()
    assert status == "mirrored"


def test_mirror_dag_fails_when_the_release_does_not_exist(airflow_home, settings, monkeypatch):
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    dag = load_dag("abc_mirror_release", "abc_mirror_release")
    dag.task_dict["mirror"].retries = 0  # dag.test() would wait out the retry delays
    run = dag.test(run_conf={"release": "19990101"})
    assert run.state == "failed" and _task_states(run) == {"mirror": "failed"}
