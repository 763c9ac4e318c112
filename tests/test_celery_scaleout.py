"""A first deployment on a bucket with a release history, under the real scheduler and Celery workers.

Starts what a production deployment runs, as separate processes (tests/airflow_cluster.py): an
api-server, a scheduler, a dag-processor and two ``airflow celery worker`` processes with their own
names, against the local Redis broker and a fresh PostgreSQL metadata database, with the shipped
defaults (no scope, floor or release given). ``abc_watch`` runs once on the generated whole-atlas
bucket; its asset event on ``abc://releases`` must become exactly one asset-triggered ``abc_release``
run per release at or after the history floor, with the release as partition key, and none for the
release before it. Each run then mirrors, loads, aggregates and publishes the consensus scope, the
unchanged release by reference, and the mapped tasks are shared by both workers. On failure every
process's log is printed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from etl.fixtures import OLD_RELEASE, PRE_CONSENSUS_RELEASE, UNCHANGED_RELEASE
from tests.airflow_cluster import CELERY_WORKERS as WORKERS
from tests.airflow_cluster import AirflowCluster, metadata_database
from tests.conftest import REPO, scoped_keys

TRANSFER_POOL = "abc_transfers"
# dag_run.run_type of a run the scheduler creates for an asset (partition) event (DagRunType.ASSET_TRIGGERED).
ASSET_TRIGGERED = "asset_triggered"
WATCH_TIMEOUT = 240.0  # from the trigger until the watch run succeeded and its abc_release runs exist
TOTAL_TIMEOUT = 600.0  # from the trigger until those abc_release runs finished


@pytest.fixture
def metadata_url() -> Iterator[str]:
    with metadata_database() as url:
        yield url


def _pending_partitions(cluster: AirflowCluster, dag_id: str) -> int:
    """Asset partitions queued for ``dag_id`` that the scheduler has not yet turned into a run."""
    with cluster.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM asset_partition_dag_run WHERE target_dag_id = :d AND created_dag_run_id IS NULL"),
            {"d": dag_id}).scalar_one()


def _watch_done(cluster: AirflowCluster, run_id: str) -> bool:
    """The triggered watch run (and the scheduled one unpausing starts beside it) finished, and every
    partition announced became an abc_release run; fails at once if a watch run failed."""
    runs = cluster.dag_runs("abc_watch")
    if any(run.state == "failed" for run in runs):
        raise AssertionError(f"abc_watch failed: {runs}\n" + "\n".join(
            cluster.task_logs("abc_watch", run.run_id) for run in runs if run.state == "failed"))
    if not any(run.run_id == run_id and run.state == "success" for run in runs):
        return False
    if any(run.state not in ("success", "failed") for run in runs):
        return False
    return _pending_partitions(cluster, "abc_release") == 0 and bool(cluster.dag_runs("abc_release"))


def _run_seconds(cluster: AirflowCluster, run_id: str) -> float:
    with cluster.engine.connect() as conn:
        return conn.execute(sa.text("SELECT extract(epoch FROM end_date - start_date) FROM dag_run "
                                    "WHERE dag_id = 'abc_release' AND run_id = :r"), {"r": run_id}).scalar_one()


@pytest.mark.slow
def test_first_watch_runs_each_release_from_the_floor_on_two_celery_workers(
        tmp_path, metadata_url, generated_bucket, s3_server, database_url, engine):
    expected = generated_bucket.consensus_releases
    home = tmp_path / "airflow"
    home.mkdir()
    cluster = AirflowCluster(home, metadata_url, REPO / "dags", {
        "ABC_DATABASE_URL": database_url,
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url,
        "ABC_MIRROR_ROOT": str(tmp_path / "mirror"),
        "ABC_WORKERS": "2",
    }, executor="CeleryExecutor", workers=WORKERS)
    try:
        cluster.up({TRANSFER_POOL: 4}, dag_ids=["abc_watch", "abc_release"])
        cluster.airflow("dags", "unpause", "abc_release")
        cluster.airflow("dags", "unpause", "abc_watch")
        watch_run = f"history_{uuid.uuid4().hex[:8]}"
        cluster.airflow("dags", "trigger", "abc_watch", "--run-id", watch_run)
        triggered = time.monotonic()
        cluster.wait_for("the abc_watch run and the abc_release runs it caused",
                         lambda: _watch_done(cluster, watch_run), WATCH_TIMEOUT)
        runs = cluster.dag_runs("abc_release")
        keys = [run.partition_key for run in runs]
        assert PRE_CONSENSUS_RELEASE not in keys, f"a run for the release before the floor: {runs}"
        assert sorted(keys) == expected, runs  # one run per release from the floor, none twice
        assert all(run.run_type == ASSET_TRIGGERED for run in runs), runs

        cluster.wait_for("the abc_release runs to finish",
                         lambda: all(run.state in ("success", "failed") for run in cluster.dag_runs("abc_release")),
                         max(1.0, TOTAL_TIMEOUT - (time.monotonic() - triggered)))
        finished = {run.partition_key: run for run in cluster.dag_runs("abc_release")}
        failed = [run for run in finished.values() if run.state != "success"]
        assert not failed, "\n".join(
            f"{run.partition_key} {run.run_id}: {cluster.task_instances('abc_release', run.run_id)}\n"
            f"{cluster.task_logs('abc_release', run.run_id)}" for run in failed)
        instances = {key: cluster.task_instances("abc_release", run.run_id) for key, run in finished.items()}
        seconds = {key: _run_seconds(cluster, run.run_id) for key, run in finished.items()}
        print(f"abc_release runs (seconds): {seconds}")
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()

    # The scheduler picks the order of the runs (newest first, here): of the two releases with the same
    # consensus files, the first one published holds the rows and the other shares them, whichever it is.
    with engine.connect() as conn:
        status = {row.version: (row.status, row.shares_data_with) for row in conn.execute(sa.text(
            "SELECT version, status, shares_data_with FROM abc.release"))}
        files = conn.execute(sa.text(
            "SELECT count(DISTINCT rf.relative_path), count(DISTINCT rf.dataset) FROM abc.mirror_object o "
            "JOIN abc.release_file rf ON rf.relative_path = o.relative_path")).one()
    assert status.pop(PRE_CONSENSUS_RELEASE) == ("skipped", None)
    assert all(state == "published" for state, _ in status.values()), status
    shared = {release: data for release, (_, data) in status.items() if data}
    (sharing, holder), = shared.items()
    assert {sharing, holder} == {OLD_RELEASE, UNCHANGED_RELEASE}, status
    assert not [ti for ti in instances[sharing] if ti.task_id == "aggregate" and ti.state == "success"]
    # Celery handed the mapped per-file aggregations to both workers, each task once.
    aggregated = [ti for release in (holder, expected[-1]) for ti in instances[release] if ti.task_id == "aggregate"]
    assert len(aggregated) > len(WORKERS) and {ti.hostname for ti in aggregated} == set(WORKERS), aggregated
    assert all(ti.state in ("success", "skipped") and ti.try_number <= 1 for run in instances.values()
               for ti in run), instances
    with engine.connect() as conn:
        cells, distinct = conn.execute(sa.text(
            "SELECT count(*), count(DISTINCT (dataset, cell_label)) FROM abc.cell WHERE release = :r"),
            {"r": holder}).one()
    assert cells == distinct > 0
    in_scope = {k for r in expected for k in scoped_keys(generated_bucket, r)}
    assert files == (len(in_scope), 6)  # only the consensus scope was mirrored, nothing of the other datasets
