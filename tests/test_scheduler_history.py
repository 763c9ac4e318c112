"""The first watch of a bucket with a release history, under the real scheduler (not ``dag.test()``).

A real Airflow 3 deployment (api-server, scheduler, dag-processor; LocalExecutor, PostgreSQL
metadata database) runs ``abc_watch`` once on a generated bucket with several historical releases.
Its one asset event on ``abc://releases`` carries one partition per new release; the scheduler must
turn it into exactly one asset-triggered ``abc_release`` run per release at or after the first
release with the consensus datasets (the floor), with the release as the run's partition key, and
none for the releases before the floor. Those runs must then succeed and publish their releases.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl.fixtures import GeneratedBucket
from tests.airflow_cluster import AirflowCluster, metadata_database
from tests.conftest import REPO

TRANSFER_POOL = "abc_transfers"
CONSENSUS_PREFIX = "Consensus-"
# dag_run.run_type of a run the scheduler creates for an asset (partition) event (DagRunType.ASSET_TRIGGERED).
ASSET_TRIGGERED = "asset_triggered"
WATCH_TIMEOUT = 240.0  # from the trigger until the watch run succeeded and its abc_release runs exist
TOTAL_TIMEOUT = 420.0  # from the trigger until those abc_release runs finished


def consensus_floor(bucket_dir: Path, releases: list[str]) -> str:
    """The first release whose manifest holds the consensus datasets (``Consensus-*``)."""
    for version in sorted(releases):
        manifest = json.loads((bucket_dir / "releases" / version / "manifest.json").read_text())
        if any(name.startswith(CONSENSUS_PREFIX) for name in manifest["directory_listing"]):
            return version
    raise AssertionError(f"no release of {releases} holds {CONSENSUS_PREFIX}* datasets")


def expected_releases(bucket: GeneratedBucket) -> tuple[list[str], list[str]]:
    """(releases that must get an abc_release run, releases before the floor that must not)."""
    floor = consensus_floor(bucket.bucket_dir, bucket.releases)
    releases = sorted(bucket.releases)
    return [v for v in releases if v >= floor], [v for v in releases if v < floor]


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


def _asset_events(cluster: AirflowCluster) -> list[sa.Row]:
    with cluster.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT e.source_dag_id, e.source_run_id, e.partition_key FROM asset_event e "
            "JOIN asset a ON a.id = e.asset_id WHERE a.name = 'abc://releases' ORDER BY e.id")).all()


def _watch_done(cluster: AirflowCluster, run_id: str) -> bool:
    """The triggered watch run (and any scheduled one beside it) finished, and every partition it
    announced became an abc_release run; fails at once if a watch run failed."""
    runs = cluster.dag_runs("abc_watch")
    if any(run.state == "failed" for run in runs):
        raise AssertionError(f"abc_watch failed: {runs}\n" + "\n".join(
            cluster.task_logs("abc_watch", run.run_id) for run in runs if run.state == "failed"))
    if not any(run.run_id == run_id and run.state == "success" for run in runs):
        return False
    if any(run.state not in ("success", "failed") for run in runs):
        return False
    return _pending_partitions(cluster, "abc_release") == 0 and bool(cluster.dag_runs("abc_release"))


@pytest.mark.slow
def test_first_watch_starts_one_release_run_per_release_from_the_floor(
        tmp_path, metadata_url, generated_bucket, s3_server, database_url, engine):
    expected, skipped = expected_releases(generated_bucket)
    home = tmp_path / "airflow"
    home.mkdir()
    cluster = AirflowCluster(home, metadata_url, REPO / "dags", {
        "ABC_DATABASE_URL": database_url,
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url,
        "ABC_MIRROR_ROOT": str(tmp_path / "mirror"),
        "ABC_WORKERS": "2",
        "AIRFLOW__CORE__PARALLELISM": "4",
    }, executor="LocalExecutor")
    started = time.monotonic()
    try:
        cluster.up({TRANSFER_POOL: 2}, dag_ids=["abc_watch", "abc_release"])
        print(f"deployment up in {time.monotonic() - started:.0f} s")
        cluster.airflow("dags", "unpause", "abc_release")
        cluster.airflow("dags", "unpause", "abc_watch")
        watch_run = f"history_{uuid.uuid4().hex[:8]}"
        cluster.airflow("dags", "trigger", "abc_watch", "--run-id", watch_run)
        triggered = time.monotonic()
        cluster.wait_for("the abc_watch run and the abc_release runs it caused",
                         lambda: _watch_done(cluster, watch_run), WATCH_TIMEOUT)
        print(f"abc_watch runs {[(r.run_id, r.run_type, r.state) for r in cluster.dag_runs('abc_watch')]} "
              f"done {time.monotonic() - triggered:.0f} s after the trigger")
        print(f"asset events on abc://releases: {[tuple(e) for e in _asset_events(cluster)]}")
        runs = cluster.dag_runs("abc_release")
        print(f"abc_release runs: {[(r.run_id, r.run_type, r.partition_key) for r in runs]}")
        print(f"expected partition keys {expected}, none for {skipped}")

        keys = [run.partition_key for run in runs]
        assert not [key for key in keys if key in skipped], f"runs for releases before the floor: {runs}"
        assert sorted(keys) == expected, runs  # one run per release from the floor, none twice
        assert all(run.run_type == ASSET_TRIGGERED for run in runs), runs

        cluster.wait_for("the abc_release runs to finish",
                         lambda: all(run.state in ("success", "failed") for run in cluster.dag_runs("abc_release")),
                         max(1.0, TOTAL_TIMEOUT - (time.monotonic() - triggered)))
        finished = cluster.dag_runs("abc_release")
        print(f"abc_release runs finished {time.monotonic() - triggered:.0f} s after the trigger: "
              f"{[(r.partition_key, r.state) for r in finished]}")
        failed = [run for run in finished if run.state != "success"]
        assert not failed, "\n".join(
            f"{run.partition_key} {run.run_id}: {cluster.task_instances('abc_release', run.run_id)}\n"
            f"{cluster.task_logs('abc_release', run.run_id)}" for run in failed)
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        print(f"deployment stopped {time.monotonic() - started:.0f} s after start")
    with engine.connect() as conn:
        status = dict(conn.execute(sa.text("SELECT version, status FROM abc.release")).all())
    assert {v: status.get(v) for v in expected} == dict.fromkeys(expected, "published"), status
    assert not [v for v in skipped if status.get(v) == "published"], status
