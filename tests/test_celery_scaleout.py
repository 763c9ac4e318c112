"""Scale-out proof: a DAG run under the CeleryExecutor, for real, on this machine.

Starts what a production deployment runs, as separate processes: an api-server (Airflow 3
workers talk to it), a scheduler, a dag-processor and two ``airflow celery worker`` processes
with their own names, against the local Redis broker and a fresh PostgreSQL database as
Airflow's metadata database. Everything is torn down afterwards; on failure every process's log
is printed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from etl import source
from etl.discovery import discover
from etl.fixtures import OLD_RELEASE
from tests.airflow_cluster import CELERY_WORKERS as WORKERS
from tests.airflow_cluster import AirflowCluster, metadata_database
from tests.conftest import REPO

TRANSFER_POOL = "abc_transfers"
RUN_TIMEOUT = 180.0


@pytest.fixture
def metadata_url() -> Iterator[str]:
    """A fresh PostgreSQL database for Airflow's own metadata, dropped afterwards."""
    with metadata_database() as url:
        yield url


def run_on_celery(cluster: AirflowCluster, dag_id: str, conf: dict, pools: dict[str, int]) -> tuple[str, list]:
    """Start the cluster, trigger ``dag_id`` once and wait for the run to finish; return its state and TIs."""
    cluster.up(pools, dag_ids=[dag_id])
    cluster.airflow("dags", "unpause", dag_id)
    run_id = f"celery_{uuid.uuid4().hex[:8]}"
    cluster.airflow("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf))
    cluster.wait_for(f"run {run_id} to finish", lambda: cluster.run_state(dag_id, run_id) in ("success", "failed"),
                     RUN_TIMEOUT)
    return cluster.run_state(dag_id, run_id), cluster.task_instances(dag_id, run_id)


@pytest.mark.slow
def test_release_mirrors_on_two_celery_workers_and_publishes_once(tmp_path, metadata_url, settings, engine):
    discover(source.make_client(settings), settings, engine)
    with engine.connect() as conn:
        total_bytes = conn.execute(sa.text("SELECT total_bytes FROM abc.release WHERE version = :r"),
                                   {"r": OLD_RELEASE}).scalar_one()
    home = tmp_path / "airflow"
    home.mkdir()
    cluster = AirflowCluster(home, metadata_url, REPO / "dags", {
        "ABC_DATABASE_URL": settings.database_url,
        "AWS_ENDPOINT_URL_S3": settings.endpoint_url,
        "ABC_MIRROR_ROOT": settings.mirror_root,
        "ABC_WORKERS": "2",
    }, executor="CeleryExecutor", workers=WORKERS)
    try:
        # Six batches of the release's files: more mapped mirror tasks than workers. Throttled so
        # each takes seconds: a worker busy with one batch (concurrency 1, prefetch 1) cannot take
        # the next, so the other worker must, however quickly the first one would have finished.
        state, instances = run_on_celery(cluster, "abc_release",
                                         {"release": OLD_RELEASE, "batch_bytes": total_bytes // 6 + 1,
                                          "max_bandwidth": "1M"},
                                         pools={TRANSFER_POOL: 4})
        assert state == "success", instances
        mirror_hosts = [ti.hostname for ti in instances if ti.task_id == "mirror"]
        assert len(mirror_hosts) >= 2 and set(mirror_hosts) == set(WORKERS), instances
        assert all(ti.state == "success" and ti.try_number == 1 for ti in instances), instances
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM abc.release WHERE version = :r"),
                            {"r": OLD_RELEASE}).scalar_one() == "published"
        cells, distinct = conn.execute(sa.text(
            "SELECT count(*), count(DISTINCT (dataset, cell_label)) FROM abc.cell WHERE release = :r"),
            {"r": OLD_RELEASE}).one()
    assert cells == distinct > 0
