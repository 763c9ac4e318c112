"""Watch the ABC Atlas bucket: record new release manifests and dated dataset directories.

Thin wiring over ``etl.discovery``; each newly recorded release is announced on the
``abc://releases`` asset as an event partitioned by the release (``YYYYMMDD``), so that
``abc_release``, scheduled on that asset, runs once per new release, and alerted (``new_release``)
on the webhook when one is configured. Releases before the history floor (``ABC_FIRST_RELEASE``,
by default the first release holding the scope's datasets) are recorded as skipped and announce
no partition: a backfill is an explicit ``abc_release`` trigger with its ``release``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from abc_lineage import lineage_task
from abc_notifiers import AbcWebhookNotifier
from airflow.sdk import Asset, dag

RELEASES_ASSET = Asset("abc://releases", extra={"description": "new ABC Atlas release manifests"})


@dag(
    schedule="@hourly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["abc-mirror"],
    default_args={"retries": 3, "retry_delay": timedelta(minutes=2), "retry_exponential_backoff": True,
                  "on_failure_callback": AbcWebhookNotifier(kind="failed_run")},
    doc_md=__doc__,
)
def abc_watch():
    @lineage_task(outlets=[RELEASES_ASSET])
    def discover_releases(*, outlet_events=None) -> dict:
        from etl import db, monitor, source
        from etl.config import settings_for_airflow_task
        from etl.discovery import discover

        settings = settings_for_airflow_task()
        engine = db.make_engine(settings.database_url)
        report = discover(source.make_client(settings), settings, engine)
        for line in report.lines():
            print(line)
        monitor.announce_new_releases(settings, engine)
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
