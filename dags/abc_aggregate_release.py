"""Aggregate a mirrored, loaded release's expression matrices and publish the expression tables.

Thin wiring over ``etl.pipeline``: one mapped task per (metadata dataset, h5ad file), each
writing an additive partial beside the mirror, then one task that merges the partials per
dataset, rolls them up, stages them, runs the data-quality checks and publishes the release's
expression partitions atomically.
"""

from __future__ import annotations

import pendulum
from abc_dags import DEFAULT_ARGS, end_stages_of_failed_run, task_settings
from abc_lineage import lineage_task
from airflow.sdk import Param, dag, task


@dag(
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["abc-mirror"],
    params={"release": Param(type="string", pattern="^[0-9]{8}$", description="release YYYYMMDD"),
            "chunk_cells": Param(None, type=["null", "integer"], minimum=1,
                                 description="cells per read chunk (empty: the CLI's default, "
                                             "etl.aggregate.DEFAULT_CHUNK_CELLS)")},
    default_args=DEFAULT_ARGS,
    on_failure_callback=end_stages_of_failed_run,
    doc_md=__doc__,
)
def abc_aggregate_release():
    @task
    def plan(params=None) -> list[dict[str, str]]:
        from etl import pipeline

        return pipeline.plan_aggregation(task_settings(), params["release"])

    @task(max_active_tis_per_dagrun=4)
    def aggregate_file(item: dict[str, str], params=None) -> dict[str, str]:
        from etl import pipeline

        return pipeline.aggregate_item(task_settings(), params["release"], item, chunk_cells=params["chunk_cells"])

    @lineage_task
    def merge_and_publish(done: list[dict[str, str]], params=None) -> dict[str, int]:
        from etl import pipeline

        settings, release = task_settings(), params["release"]
        entries = pipeline.stage_expression(settings, release, list(done))
        pipeline.validate_and_publish(settings, release)
        return entries

    merge_and_publish(aggregate_file.expand(item=plan()))


aggregate_dag = abc_aggregate_release()
