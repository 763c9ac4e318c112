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

import pendulum
from abc_dags import DEFAULT_ARGS, RELEASES_ASSET, end_stages_of_failed_run, task_settings
from abc_lineage import lineage_task
from airflow.sdk import Param, PartitionedAssetTimetable, dag, task

TRANSFER_POOL = "abc_transfers"


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
    default_args=DEFAULT_ARGS,
    on_failure_callback=end_stages_of_failed_run,
    doc_md=__doc__,
)
def abc_release():
    @task
    def resolve(params=None, dag_run=None) -> str:
        from etl import pipeline

        return pipeline.resolve(task_settings(params), params["release"] or dag_run.partition_key)

    @task
    def plan(release: str, params=None) -> list[list[str]]:
        from etl import pipeline

        return pipeline.plan_mirror(task_settings(params), release, params["datasets"], params["kinds"],
                                    params["batch_bytes"])

    @lineage_task(pool=TRANSFER_POOL, max_active_tis_per_dagrun=16)
    def mirror(keys: list[str], release: str, params=None) -> dict:
        from etl import pipeline

        return pipeline.mirror_task(task_settings(params), release, keys=keys, max_bandwidth=params["max_bandwidth"])

    @task
    def verify(release: str, params=None) -> int:
        from etl import pipeline

        return pipeline.verify(task_settings(params), release, params["datasets"], params["kinds"])

    @lineage_task
    def load_metadata(release: str, params=None) -> list[dict]:
        from etl import pipeline

        return pipeline.load_and_plan(task_settings(params), release, params["datasets"] or None, params["kinds"])

    @task(max_active_tis_per_dagrun=4)
    def aggregate(item: dict, release: str, params=None) -> dict:
        from etl import pipeline

        return pipeline.aggregate_item(task_settings(params), release, item)

    @lineage_task(trigger_rule="none_failed")  # runs, with nothing to merge, when no file was planned (metadata only)
    def merge(done: list[dict], release: str, params=None) -> dict:
        from etl import pipeline

        done = list(done)
        return pipeline.stage_expression(task_settings(params), release, done) if done else {}

    @task
    def validate(release: str, params=None) -> dict:
        from etl import pipeline

        return {r.name: r.passed for r in pipeline.validate(task_settings(params), release)}

    @task
    def publish(release: str, params=None) -> bool:
        from etl import pipeline

        return pipeline.publish_staged_release(task_settings(params), release)

    @task
    def lineage(release: str, params=None) -> dict:
        from etl import pipeline

        return pipeline.check_lineage(task_settings(params), release)

    @task
    def notify(release: str, params=None) -> dict:
        from etl import pipeline

        return pipeline.announce_published(task_settings(params), release)

    release = resolve()
    mirrored = mirror.partial(release=release).expand(keys=plan(release))
    work = load_metadata(release)
    partials = aggregate.partial(release=release).expand(item=work)
    mirrored >> verify(release) >> work
    merge(partials, release) >> validate(release) >> publish(release) >> lineage(release) >> notify(release)


release_dag = abc_release()
