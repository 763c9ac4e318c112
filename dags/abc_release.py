"""Process one ABC Atlas release end to end: mirror, verify, load, aggregate, publish.

Scheduled on the ``abc://releases`` asset: ``abc_watch`` emits one event per new release,
partitioned by the release, and each partition becomes one run of this DAG (its
``partition_key`` is the release). It can also be triggered by hand with the ``release`` param.

resolve -> plan -> mirror (mapped over batches of files, pool ``abc_transfers`` caps concurrent transfers)
-> verify -> load_metadata (staged) -> aggregate (mapped per h5ad file) -> merge (staged) -> validate
(data-quality checks; a failure alerts and blocks publication) -> publish (metadata and expression in
one transaction) -> lineage (every published relation traced to its source objects) -> notify (diff
against the previous release, release notes beside the mirror, ``published`` alert). A failed task
alerts through ``AbcWebhookNotifier``, and a failed run drops the stage it leaves (re-running it loads
afresh); mirror, load and aggregate steps are lineage steps (``abc.lineage_run``), recorded once per
state of their work: a cleared task that finds its work done adds no run. Their tasks are
``@lineage_task``s: Airflow's OpenLineage provider sends each task's events with the datasets and
facets of its steps (docs/lineage.md).

Only the run's scope (``scope`` param, else ``ABC_SCOPE``; docs/scope.md) is mirrored, loaded and
aggregated. A release whose scoped files are those of a published release is published by reference
at ``load_metadata`` (no reload, no aggregation), and a matrix whose inputs did not change keeps the
partial an earlier release aggregated from it.

Every task is idempotent, so clearing and re-running any of them is safe: the mirror skips
files already verified on disk, loads and aggregations rebuild their staging tables,
publishing swaps partitions in (or does nothing when the release is already published), and
the diff and its notes are rewritten.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from abc_lineage import lineage_task
from abc_notifiers import AbcWebhookNotifier
from airflow.sdk import Asset, Param, PartitionedAssetTimetable, dag, task

# The asset abc_watch announces releases on (DAG files do not import each other; same definition).
RELEASES_ASSET = Asset("abc://releases", extra={"description": "new ABC Atlas release manifests"})
TRANSFER_POOL = "abc_transfers"


def _end_stages_of_failed_run(context) -> None:
    """DAG failure callback: the stage a failed run leaves is dropped, never read as the release."""
    from etl import pipeline
    from etl.config import settings_for_airflow_task

    dag_run = context["dag_run"]
    pipeline.end_failed_run(settings_for_airflow_task(), dag_run.dag_id, dag_run.run_id)


@dag(
    schedule=PartitionedAssetTimetable(assets=RELEASES_ASSET),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["abc-mirror"],
    params={
        "release": Param("", type="string", pattern="^([0-9]{8})?$",
                         description="YYYYMMDD; empty: the triggering asset partition, else the newest recorded"),
        "scope": Param("", type="string", enum=["", "consensus-mouse", "atlas"],
                       description="what to mirror and load (empty: ABC_SCOPE, default consensus-mouse)"),
        "datasets": Param([], type="array", description="only these datasets of the scope (empty: all)"),
        "kinds": Param([], type="array", description="only these kinds, e.g. metadata (empty: all)"),
        "target": Param("", type="string", description="mirror root: a local or shared directory (empty: "
                        "ABC_MIRROR_ROOT); s3:// is refused, use abc_mirror_release to copy to a bucket"),
        "batch_bytes": Param(None, type=["null", "integer"], minimum=1,
                             description="bytes per mirror batch, one mapped task each (empty: 8 GiB)"),
        "max_bandwidth": Param("", type="string", pattern="^([0-9.]+[kKmMgG]?)?$",
                               description="bytes/s cap per mirror task, e.g. 50M (empty: unlimited)"),
    },
    default_args={
        "retries": 3,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
        "on_failure_callback": AbcWebhookNotifier(kind="failed_run"),
    },
    on_failure_callback=_end_stages_of_failed_run,
    doc_md=__doc__,
)
def abc_release():
    @task
    def resolve(params=None, dag_run=None) -> str:
        from etl import db, pipeline

        pipeline.require_local_mirror(_settings(params))  # before anything is mirrored: loading reads local files
        engine = db.make_engine(_settings(params).database_url)
        try:
            return pipeline.resolve_release(engine, params["release"] or dag_run.partition_key)
        finally:
            engine.dispose()

    @task
    def plan(release: str, params=None) -> list[list[str]]:
        from etl import db, pipeline
        from etl.mirror import check_free_space

        settings = _settings(params)
        engine = db.make_engine(settings.database_url)
        try:
            files = pipeline.release_files(engine, release, settings.run_scope, params["datasets"],
                                           params["kinds"])
            # Once for the whole release: the mirror batches run side by side and share the disk.
            to_fetch = check_free_space(settings, engine, release, [f.key for f in files])
        finally:
            engine.dispose()
        batches = pipeline.plan_batches(files, params["batch_bytes"] or pipeline.DEFAULT_BATCH_BYTES)
        print(f"release {release}: {len(files)} files, {sum(f.size for f in files)} bytes ({to_fetch} still to "
              f"fetch), {len(batches)} batches")
        return batches

    @lineage_task(pool=TRANSFER_POOL, max_active_tis_per_dagrun=16)
    def mirror(keys: list[str], release: str, params=None) -> dict:
        from etl import pipeline
        from etl.transfer import parse_rate

        return pipeline.mirror_task(_settings(params), release, keys=keys,
                                    max_bandwidth=parse_rate(params["max_bandwidth"]))

    @task
    def verify(release: str, params=None) -> int:
        from etl import db
        from etl.catalog import release_files_on_disk

        settings = _settings(params)
        engine = db.make_engine(settings.database_url)
        try:
            files = release_files_on_disk(settings, engine, release, params["datasets"], params["kinds"])
        finally:
            engine.dispose()
        print(f"release {release}: {len(files)} files mirrored and verified in {settings.mirror_root}")
        return len(files)

    @lineage_task
    def load_metadata(release: str, params=None) -> list[dict]:
        from etl import aggregate, db, pipeline

        settings = _settings(params)
        if params["kinds"] and "metadata" not in params["kinds"]:
            return []
        shared = pipeline.share_if_unchanged(settings, release)
        if shared:
            print(f"release {release}: scoped files unchanged since {shared.release}; published by reference")
            return []
        report = pipeline.load_metadata(settings, release, params["datasets"] or None)
        for line in report.lines():
            print(line)
        if params["kinds"] and "expression_matrices" not in params["kinds"]:
            return []
        with db.copy_connection(settings.database_url) as conn:
            return aggregate.plan_release(settings, conn, release, params["datasets"] or None)

    @task(max_active_tis_per_dagrun=4)
    def aggregate(item: dict, release: str, params=None) -> dict:
        from etl import pipeline
        from etl.aggregate import default_work_dir

        settings = _settings(params)
        return pipeline.aggregate_item(settings, release, item, default_work_dir(settings, release))

    @lineage_task(trigger_rule="none_failed")  # runs, with nothing to merge, when no file was planned (metadata only)
    def merge(done: list[dict], release: str, params=None) -> dict:
        from etl import pipeline

        done = list(done)
        return pipeline.stage_expression(_settings(params), release, done) if done else {}

    @task
    def validate(release: str, params=None) -> dict:
        from etl import pipeline

        return {r.name: r.passed for r in pipeline.validate(_settings(params), release)}

    @task
    def publish(release: str, params=None) -> bool:
        from etl import db, pipeline

        settings = _settings(params)
        with db.copy_connection(settings.database_url) as conn:
            published_now = pipeline.publish_release(conn, release)
        print(f"release {release}: {'published' if published_now else 'already published'}")
        return published_now

    @task
    def lineage(release: str, params=None) -> dict:
        from etl import pipeline

        return pipeline.check_lineage(_settings(params), release)

    @task
    def notify(release: str, params=None) -> dict:
        from etl import pipeline

        return pipeline.announce_published(_settings(params), release)

    release = resolve()
    mirrored = mirror.partial(release=release).expand(keys=plan(release))
    work = load_metadata(release)
    partials = aggregate.partial(release=release).expand(item=work)
    mirrored >> verify(release) >> work
    merge(partials, release) >> validate(release) >> publish(release) >> lineage(release) >> notify(release)


def _settings(params: dict):
    """Settings of a task: the environment and connections, with the run's ``target`` mirror root and ``scope``."""
    from etl.config import settings_for_airflow_task

    return settings_for_airflow_task().with_overrides(mirror_root=params["target"] or None,
                                                      scope=params["scope"] or None)


release_dag = abc_release()
