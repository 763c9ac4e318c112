"""Watch the ABC Atlas bucket: record new release manifests and dated dataset directories.

Thin wiring over ``etl.discovery``; each newly recorded release is announced on the
``abc://releases`` asset as an event partitioned by the release (``YYYYMMDD``), so that
``abc_release``, scheduled on that asset, runs once per new release, and alerted (``new_release``)
on the webhook when one is configured. Releases before the history floor (``ABC_FIRST_RELEASE``,
by default the first release holding the scope's datasets) are recorded as skipped and announce
no partition: a backfill is an explicit ``abc_release`` trigger with its ``release``.
"""

from __future__ import annotations

import pendulum
from abc_dags import DEFAULT_ARGS, RELEASES_ASSET
from abc_lineage import lineage_task
from airflow.sdk import dag


@dag(
    schedule="@hourly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["abc-mirror"],
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
)
def abc_watch():
    @lineage_task(outlets=[RELEASES_ASSET])
    def discover_releases(*, outlet_events=None) -> dict:
        from etl import pipeline
        from etl.config import settings_for_airflow_task

        report = pipeline.discover_releases(settings_for_airflow_task())
        for line in report.lines():
            print(line)
        if report.releases_to_process:
            outlet_events[RELEASES_ASSET].extra = {"new_releases": report.releases_to_process}
            outlet_events[RELEASES_ASSET].add_partitions(report.releases_to_process)
        return {
            "new_releases": report.new_releases,
            "history_floor": report.floor,
            "skipped": report.skipped,
            "changed_manifests": report.changed_manifests,
            "new_directories": [d.prefix for d in report.new_directories],
            "bad_manifests": report.bad_manifests,
        }

    discover_releases()


watch_dag = abc_watch()
