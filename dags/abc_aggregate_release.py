"""Aggregate a mirrored, loaded release's expression matrices and publish the expression tables.

Thin wiring over ``etl.aggregate``: one mapped task per (metadata dataset, h5ad file), each
writing an additive partial beside the mirror, then one task that merges the partials per
dataset, rolls them up, stages them, runs the data-quality checks and publishes the release's
expression partitions atomically.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from abc_lineage import lineage_task
from airflow.sdk import Param, dag, get_current_context, task


@dag(
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["abc-mirror"],
    params={"release": Param(type="string", pattern="^[0-9]{8}$", description="release YYYYMMDD"),
            "chunk_cells": Param(10_000, type="integer", minimum=1, description="cells per read chunk")},
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    doc_md=__doc__,
)
def abc_aggregate_release():
    @task
    def plan() -> list[dict[str, str]]:
        from etl import db
        from etl.aggregate import plan_release
        from etl.config import settings_for_airflow_task

        settings = settings_for_airflow_task()
        with db.copy_connection(settings.database_url) as conn:
            return plan_release(settings, conn, get_current_context()["params"]["release"])

    @task(max_active_tis_per_dagrun=4)
    def aggregate_file(item: dict[str, str]) -> dict[str, str]:
        from etl.aggregate import default_work_dir
        from etl.config import settings_for_airflow_task
        from etl.pipeline import aggregate_item

        settings = settings_for_airflow_task()
        params = get_current_context()["params"]
        return aggregate_item(settings, params["release"], item, default_work_dir(settings, params["release"]),
                              params["chunk_cells"])

    @lineage_task
    def merge_and_publish(done: list[dict[str, str]]) -> dict[str, int]:
        from etl import pipeline
        from etl.config import settings_for_airflow_task

        settings = settings_for_airflow_task()
        release = get_current_context()["params"]["release"]
        entries = pipeline.stage_expression(settings, release, list(done))
        pipeline.validate_and_publish(settings, release)
        return entries

    merge_and_publish(aggregate_file.expand(item=plan()))


aggregate_dag = abc_aggregate_release()
