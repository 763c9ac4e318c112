"""Load one mirrored release's metadata (cells, genes, donors, libraries, taxonomy) into the warehouse.

Thin wiring over ``etl.pipeline``: triggered with the ``release`` param (and optionally
``datasets``); the metadata is staged, checked (``etl.monitor``) and becomes visible to analysts
atomically when the task succeeds, and a failed or retried run leaves the previously published state as it was.
"""

from __future__ import annotations

import pendulum
from abc_dags import DEFAULT_ARGS, end_stages_of_failed_run, task_settings
from abc_lineage import lineage_task
from airflow.sdk import Param, dag


@dag(
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["abc-mirror"],
    params={
        "release": Param(type="string", pattern="^[0-9]{8}$", description="release version YYYYMMDD"),
        "datasets": Param(None, type=["null", "array"], description="only these datasets; others are kept"),
    },
    default_args=DEFAULT_ARGS,
    on_failure_callback=end_stages_of_failed_run,
    doc_md=__doc__,
)
def abc_load_release():
    @lineage_task
    def load_metadata(params=None) -> dict:
        from etl import pipeline

        settings = task_settings()
        report = pipeline.load_metadata(settings, params["release"], params["datasets"] or None)
        for line in report.lines():
            print(line)
        published = pipeline.validate_and_publish(settings, params["release"])
        return {"release": report.release, "published": published, "table_rows": report.table_rows,
                "unknown_columns": {x.file.relative_path: x.unknown_columns for x in report.loaded
                                    if x.unknown_columns},
                "ignored": {f.relative_path: f.note for f in report.ignored}}

    load_metadata()


load_release_dag = abc_load_release()
