"""Monitor the mirror daily: announce new upstream releases, check loaded releases, diff them, watch the lag.

Thin wiring over ``etl.monitor``. Each task alerts through the webhook (``ABC_WEBHOOK_URL``) on
what it finds: a release not announced yet, a failed data-quality check, a newest published
release trailing upstream's for more than ``ABC_MAX_LAG_HOURS``; a task that fails alerts too,
through ``AbcWebhookNotifier`` (plugins/abc_notifiers.py).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from abc_notifiers import AbcWebhookNotifier
from airflow.sdk import dag, task


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["abc-mirror"],
    default_args={"retries": 1, "retry_delay": timedelta(minutes=5),
                  "on_failure_callback": AbcWebhookNotifier(kind="failed_run")},
    doc_md=__doc__,
)
def abc_monitor():
    @task
    def announce_new_releases() -> list[str]:
        from etl import db, monitor
        from etl.config import settings_for_airflow_task

        settings = settings_for_airflow_task()
        return monitor.announce_new_releases(settings, db.make_engine(settings.database_url))

    @task
    def check_releases() -> dict[str, list[str]]:
        from etl import db, monitor
        from etl.config import settings_for_airflow_task

        settings = settings_for_airflow_task()
        engine = db.make_engine(settings.database_url)
        return {release: [r.name for r in monitor.check_release(settings, engine, release) if not r.passed]
                for release in monitor.releases_to_check(engine)}

    @task
    def diff_releases() -> dict[str, str | None]:
        from etl import db, monitor
        from etl.config import settings_for_airflow_task

        settings = settings_for_airflow_task()
        engine = db.make_engine(settings.database_url)
        written = {}
        for old, new in monitor.releases_without_diff(engine):
            notes = monitor.record_diff(settings, engine, new, old)
            written[new] = str(notes[0]) if notes else None
        return written

    @task
    def check_lag() -> dict:
        from etl import db, monitor
        from etl.config import settings_for_airflow_task

        settings = settings_for_airflow_task()
        lag = monitor.check_lag(settings, db.make_engine(settings.database_url))
        return {"newest_upstream": lag.newest_upstream, "newest_published": lag.newest_published,
                "lag_hours": round(lag.hours(), 2), "max_lag_hours": settings.max_lag_hours}

    announce_new_releases()
    check_releases()
    diff_releases()
    check_lag()


monitor_dag = abc_monitor()
