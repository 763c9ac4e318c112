"""The watch DAG runs for real with dag.test() against rclone-served S3 and PostgreSQL."""

from __future__ import annotations

import importlib.util

import sqlalchemy as sa

from etl.fixtures import CONSENSUS_RELEASES, PRE_CONSENSUS_RELEASE, RELEASES
from tests.conftest import REPO


def load_dag(name: str, dag_id: str):
    """Import a DAG file the way the dag-processor would, and return its DAG."""
    from airflow.sdk import DAG

    spec = importlib.util.spec_from_file_location(f"dag_{name}", REPO / "dags" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (dag,) = [v for v in vars(module).values() if isinstance(v, DAG) and v.dag_id == dag_id]
    return dag


def test_watch_dag_records_and_announces_releases(airflow_home, s3_server, database_url, engine, monkeypatch):
    from tests.test_monitor import Webhook

    webhook = Webhook()
    monkeypatch.setenv("ABC_DATABASE_URL", database_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("ABC_WEBHOOK_URL", webhook.url)
    dag = load_dag("abc_watch", "abc_watch")
    assert dag.schedule == "@hourly" or str(dag.timetable.summary) == "@hourly"
    assert dag.catchup is False

    run = dag.test()
    assert run.state == "success"
    with engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version FROM abc.release ORDER BY version")).scalars().all()
        directories = conn.execute(sa.text("SELECT count(*) FROM abc.upstream_directory")).scalar_one()
    assert versions == RELEASES
    assert directories > 0
    # Releases before the history floor are recorded, as skipped, and not announced.
    assert sorted((body["kind"], body["release"]) for body in webhook.received) == [
        ("new_release", release) for release in CONSENSUS_RELEASES]
    with engine.connect() as conn:
        skipped = conn.execute(sa.text("SELECT version FROM abc.release WHERE status = 'skipped'")).scalars().all()
    assert skipped == [PRE_CONSENSUS_RELEASE]

    again = dag.test()
    webhook.close()
    assert again.state == "success"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM abc.release")).scalar_one() == len(RELEASES)
    assert len(webhook.received) == len(CONSENSUS_RELEASES)  # each release announced once
