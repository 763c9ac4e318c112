"""The release DAG runs for real with dag.test(): rclone-served S3, PostgreSQL, a local mirror."""

from __future__ import annotations

import json

import pendulum
import pytest
import sqlalchemy as sa

from etl import db, pipeline, source
from etl.abc_atlas_cache import DOWNLOADED_DATA, MANIFEST_LAST_USED, manifest_name
from etl.discovery import discover
from etl.fixtures import CONSENSUS_RELEASES, NEW_RELEASE, OLD_RELEASE, PRE_CONSENSUS_RELEASE, UNCHANGED_RELEASE
from tests.conftest import scoped_keys
from tests.test_dag_watch import load_dag


@pytest.fixture
def release_env(airflow_home, settings, monkeypatch):
    """The environment a task's settings come from, and the releases recorded by discovery."""
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    monkeypatch.setenv("ABC_WORKERS", "4")
    engine = db.make_engine(settings.database_url)
    discover(source.make_client(settings), settings, engine)
    engine.dispose()
    return settings


def _release_dag():
    dag = load_dag("abc_release", "abc_release")
    for task in dag.tasks:  # a failure must fail the run here, not wait out the retry delay
        task.retries = 0
    return dag


def _published(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT version, status FROM abc.release ORDER BY version")).all())


def _counts(engine: sa.Engine, release: str) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            "cells": conn.execute(sa.text("SELECT count(*) FROM abc.cell WHERE release = :r"), {"r": release}).scalar(),
            "distinct_cells": conn.execute(sa.text("SELECT count(DISTINCT (dataset, cell_label)) FROM abc.cell "
                                                   "WHERE release = :r"), {"r": release}).scalar(),
            "expression_groups": conn.execute(sa.text(
                "SELECT count(*) FROM abc.expression_group WHERE release = :r"), {"r": release}).scalar(),
            "expression_files": conn.execute(sa.text(
                "SELECT count(*) FROM abc.expression_file WHERE release = :r"), {"r": release}).scalar(),
        }


def _cells_in_mirrored_csvs(settings, engine: sa.Engine, release: str) -> int:
    from etl.catalog import release_files_on_disk

    files = release_files_on_disk(settings, engine, release, kinds=["metadata"])
    return sum(sum(1 for _ in path.open()) - 1 for key, path in files.items() if key.endswith("/cell_metadata.csv"))


def test_release_dag_is_wired_for_production(airflow_home):
    from airflow.sdk import PartitionedAssetTimetable

    dag = load_dag("abc_release", "abc_release")
    assert isinstance(dag.timetable, PartitionedAssetTimetable)
    (announced,) = load_dag("abc_watch", "abc_watch").get_task("discover_releases").outlets
    assert dag.timetable.asset_condition == announced
    tasks = {t.task_id: t for t in dag.tasks}
    assert tasks["mirror"].pool == "abc_transfers"
    assert all(t.retries >= 3 and t.retry_exponential_backoff for t in tasks.values())
    assert set(dag.params) >= {"release", "datasets", "kinds", "target"}


def test_plan_batches_are_even_and_bounded():
    files = [pipeline.PlannedFile(f"k{i}", size) for i, size in enumerate([90, 50, 40, 10, 10, 1])]
    batches = pipeline.plan_batches(files, batch_bytes=60)
    assert sorted(k for b in batches for k in b) == sorted(f.key for f in files)
    assert len(batches) == 4
    assert pipeline.plan_batches(files, batch_bytes=1, max_batches=3) and len(
        pipeline.plan_batches(files, batch_bytes=1, max_batches=3)) == 3


def test_each_release_from_the_floor_publishes_through_the_dag(release_env, engine, generated_bucket):
    dag = _release_dag()
    runs = {}
    for release in CONSENSUS_RELEASES:
        runs[release] = dag.test(run_conf={"release": release, "batch_bytes": 1 << 20})
        assert runs[release].state == "success", release
    assert _published(engine) == {PRE_CONSENSUS_RELEASE: "skipped", OLD_RELEASE: "published",
                                  UNCHANGED_RELEASE: "published", NEW_RELEASE: "published"}
    for release in (OLD_RELEASE, NEW_RELEASE):
        counts = _counts(engine, release)
        assert counts["cells"] == counts["distinct_cells"] > 0
        assert counts["expression_groups"] > 0 and counts["expression_files"] > 0
    # The release unchanged in scope is published by reference: no rows of its own, nothing aggregated.
    assert _counts(engine, UNCHANGED_RELEASE) == dict.fromkeys(_counts(engine, OLD_RELEASE), 0)
    states = {ti.task_id: ti.state for ti in runs[UNCHANGED_RELEASE].get_task_instances()}
    assert states["aggregate"] == "skipped" and states["publish"] == "success", states
    with engine.connect() as conn:
        shared = conn.execute(sa.text("SELECT shares_data_with FROM abc.release WHERE version = :r"),
                              {"r": UNCHANGED_RELEASE}).scalar_one()
        checks = conn.execute(sa.text("SELECT release, bool_and(passed), count(*) FROM abc.quality_check "
                                      "GROUP BY release ORDER BY release")).all()
        sources = conn.execute(sa.text("SELECT DISTINCT step, run_ref, source_key FROM "
                                       "abc.lineage_sources('abc.expression_by_cluster', :r)"),
                               {"r": NEW_RELEASE}).all()
        matrices = conn.execute(sa.text("SELECT source FROM abc.expression_file WHERE release = :r"),
                                {"r": NEW_RELEASE}).scalars().all()
        diffs = dict(conn.execute(sa.text("SELECT new_release, old_release FROM abc.release_diff")).all())
        published_alerts = conn.execute(sa.text("SELECT release FROM abc.alert WHERE kind = 'published' "
                                                "ORDER BY release")).scalars().all()
    assert shared == OLD_RELEASE
    assert [(r, ok) for r, ok, _ in checks] == [(OLD_RELEASE, True), (NEW_RELEASE, True)]
    # Lineage through the views: the h5ad files the aggregate task read and the metadata behind its cells.
    by_step = {step: {key for s, _, key in sources if s == step} for step, _, _ in sources}
    assert {key.rsplit("/", 1)[-1] for key in by_step["aggregate"]} >= {m.rsplit("/", 1)[-1] for m in matrices}
    assert any(key.endswith("/cell_metadata.csv") for key in by_step["load_metadata"])
    assert all(ref.startswith("airflow abc_release/") for _, ref, _ in sources)
    assert diffs == {UNCHANGED_RELEASE: OLD_RELEASE, NEW_RELEASE: UNCHANGED_RELEASE}
    assert (release_env.mirror_path / "releases" / NEW_RELEASE / "release-notes.md").is_file()
    assert "No change in scope." in (release_env.mirror_path / "releases" / UNCHANGED_RELEASE
                                     / "release-notes.md").read_text()
    assert published_alerts == CONSENSUS_RELEASES
    # Every mirror batch rewrote the abc_atlas_access bookkeeping; the last saw every file and the newest release.
    root = release_env.mirror_path
    assert (root / MANIFEST_LAST_USED).read_text() == manifest_name(NEW_RELEASE)
    assert set(json.loads((root / DOWNLOADED_DATA).read_text())) == {
        str(root / key) for release in CONSENSUS_RELEASES for key in scoped_keys(generated_bucket, release)}


def test_failed_quality_check_blocks_publication(release_env, engine, monkeypatch):
    from etl import quality

    monkeypatch.setitem(quality.CHECKS, "injected_failure",
                        ("fails on purpose", "SELECT count(*), 'injected' FROM {cell} WHERE release = %(r)s"))
    run = _release_dag().test(run_conf={"release": OLD_RELEASE, "batch_bytes": 1 << 20})
    assert run.state == "failed"
    assert _published(engine)[OLD_RELEASE] != "published"
    assert _counts(engine, OLD_RELEASE)["cells"] == 0 and _counts(engine, OLD_RELEASE)["expression_groups"] == 0
    with engine.connect() as conn:
        failed = conn.execute(sa.text("SELECT name FROM abc.quality_check WHERE release = :r AND NOT passed"),
                              {"r": OLD_RELEASE}).scalars().all()
        alerts = conn.execute(sa.text("SELECT kind FROM abc.alert WHERE release = :r ORDER BY kind"),
                              {"r": OLD_RELEASE}).scalars().all()
    assert failed == ["injected_failure"]
    assert "failed_check" in alerts and "failed_run" in alerts and "published" not in alerts


def _lineage_runs(engine: sa.Engine, release: str) -> list[tuple[str, str, str]]:
    """(step, status, runId) of the release's lineage runs after discovery, in order."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT step, status, run_uuid::text FROM abc.lineage_run WHERE release = :r AND step <> 'discover' "
            "ORDER BY id"), {"r": release})]


def test_failed_task_cleared_and_rerun_leaves_no_duplicates(release_env, engine, monkeypatch):
    from etl import lineage
    from etl.aggregate import warehouse
    from tests.test_lineage import recording_emitter

    emitter, recording = recording_emitter()
    monkeypatch.setattr(lineage, "default_emitter", lambda: emitter)
    real_merge = warehouse.merge_and_stage

    def broken_merge(*args, **kwargs):
        raise RuntimeError("injected: the warehouse went away during merge")

    monkeypatch.setattr(warehouse, "merge_and_stage", broken_merge)
    dag = _release_dag()
    logical_date = pendulum.datetime(2026, 4, 1, tz="UTC")
    conf = {"release": OLD_RELEASE, "batch_bytes": 1 << 20}
    failed = dag.test(logical_date=logical_date, run_after=logical_date, run_conf=conf)
    assert failed.state == "failed"
    assert _published(engine)[OLD_RELEASE] != "published"
    # The failed run's stage (its metadata was staged) is dropped: nobody reads it as the release.
    with engine.connect() as conn:
        stage = conn.execute(sa.text("SELECT owner, state FROM abc.stage WHERE release = :r"),
                             {"r": OLD_RELEASE}).one()
        staged = conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'abc_staging'")).scalar()
    assert tuple(stage) == (f"abc_release run {failed.run_id}", "failed") and staged == 0
    after_failure = _lineage_runs(engine, OLD_RELEASE)
    assert {(step, status) for step, status, _ in after_failure} == {
        ("mirror", "succeeded"), ("load_metadata", "succeeded"), ("aggregate", "failed")}

    monkeypatch.setattr(warehouse, "merge_and_stage", real_merge)
    # The same run: dag.test() clears its task instances (the failed one included) and runs them again.
    rerun = dag.test(logical_date=logical_date, run_after=logical_date, run_conf=conf)
    assert rerun.state == "success"
    assert rerun.run_id == failed.run_id
    first = _counts(engine, OLD_RELEASE)
    assert first["cells"] == first["distinct_cells"] == _cells_in_mirrored_csvs(release_env, engine, OLD_RELEASE)

    again = dag.test(logical_date=logical_date, run_after=logical_date, run_conf=conf)
    assert again.state == "success"
    assert _counts(engine, OLD_RELEASE) == first
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM abc.release WHERE status = 'published'")).scalar() == 1
    # Lineage once per state: the cleared run added only the aggregation that now succeeded (the mirror
    # batches and the load had reached their states), the third run nothing. Inside Airflow tasks the
    # steps emit no event of their own: the tasks' events are the OpenLineage provider's
    # (tests/test_openlineage_airflow.py).
    runs = _lineage_runs(engine, OLD_RELEASE)
    assert runs[:-1] == after_failure and runs[-1][:2] == ("aggregate", "succeeded")
    assert recording.events == []
    with engine.connect() as conn:
        writers = conn.execute(sa.text("SELECT DISTINCT r.run_uuid::text FROM abc.lineage_current_writer w "
                                       "JOIN abc.lineage_run r ON r.id = w.run_id WHERE w.release = :r "
                                       "AND w.table_name LIKE 'abc.expression%'"), {"r": OLD_RELEASE}).scalars().all()
    assert writers == [runs[-1][2]]


def test_watch_emits_one_partitioned_event_per_new_release(airflow_home, s3_server, database_url, monkeypatch):
    from airflow import settings as airflow_settings
    from airflow.models.asset import AssetEvent, AssetModel

    monkeypatch.setenv("ABC_DATABASE_URL", database_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    run = load_dag("abc_watch", "abc_watch").test()
    assert run.state == "success"
    with airflow_settings.Session() as session:
        keys = session.execute(
            sa.select(AssetEvent.partition_key).join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.uri == "abc://releases/", AssetEvent.source_run_id == run.run_id)).scalars().all()
    assert sorted(keys) == CONSENSUS_RELEASES  # none for the release before the history floor


def test_an_s3_target_is_refused_at_resolve_before_anything_is_mirrored(release_env, engine):
    settings = release_env.with_overrides(mirror_root="s3://other-bucket/abc")
    with pytest.raises(pipeline.PlanError) as refused:
        pipeline.require_local_mirror(settings)
    message = str(refused.value)
    assert "s3://other-bucket/abc" in message and "abc_mirror_release" in message
    assert "abc-mirror mirror" in message and "local mirror" in message
    pipeline.require_local_mirror(release_env)  # a directory is fine

    run = _release_dag().test(run_conf={"release": OLD_RELEASE, "target": "s3://other-bucket/abc"})
    assert run.state == "failed"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["resolve"] == "failed" and states["plan"] == "upstream_failed", states
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM abc.mirror_object")).scalar() == 0
