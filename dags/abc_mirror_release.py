"""Mirror one ABC Atlas release: every file of its manifest, verified by size and MD5, into the mirror root.

Thin wiring over ``etl.pipeline.mirror_task``, triggered with the ``release`` param. Safe to
re-run: files already mirrored are skipped and an interrupted download resumes from its
``.partial``. The task fails, naming the files, when any file could not be placed.
"""

from __future__ import annotations

import pendulum
from abc_dags import DEFAULT_ARGS, task_settings
from abc_lineage import lineage_task
from airflow.sdk import Param, dag


@dag(
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["abc-mirror"],
    params={
        "release": Param(type="string", pattern="^[0-9]{8}$", description="release version YYYYMMDD"),
        "datasets": Param(None, type=["null", "array"], description="only these datasets (empty: all)"),
        "kinds": Param(None, type=["null", "array"], description="only these kinds, e.g. metadata"),
        "max_bandwidth": Param("", type="string", pattern="^([0-9.]+[kKmMgG]?)?$",
                               description="bytes/s cap, e.g. 50M (empty: unlimited)"),
    },
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
)
def abc_mirror_release():
    @lineage_task
    def mirror(params=None) -> dict:
        from etl import pipeline

        return pipeline.mirror_task(task_settings(), params["release"], datasets=params["datasets"] or None,
                                    kinds=params["kinds"] or None, max_bandwidth=params["max_bandwidth"])

    mirror()


mirror_release_dag = abc_mirror_release()
