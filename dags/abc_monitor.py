"""Monitor the mirror daily: announce new upstream releases, check loaded releases, diff them, watch the lag.

Thin wiring over ``etl.monitor``: settings in, a summary out. Each task alerts through the webhook
(``ABC_WEBHOOK_URL``) on what it finds: a release not announced yet, a failed data-quality check, a newest published
release trailing upstream's for more than ``ABC_MAX_LAG_HOURS``; a task that fails alerts too,
through ``AbcWebhookNotifier`` (plugins/abc_notifiers.py).
"""

from __future__ import annotations

import pendulum
from abc_dags import DEFAULT_ARGS, task_settings
from airflow.sdk import dag, task


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["abc-mirror"],
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
)
def abc_monitor():
    @task
    def announce_new_releases() -> list[str]:
        from etl import monitor

        return monitor.announce(task_settings())

    @task
    def check_releases() -> dict[str, list[str]]:
        from etl import monitor

        return monitor.check_loaded_releases(task_settings())

    @task
    def diff_releases() -> dict[str, str | None]:
        from etl import monitor

        return monitor.diff_releases(task_settings())

    @task
    def check_lag() -> dict:
        from etl import monitor

        return monitor.lag_report(task_settings())

    announce_new_releases()
    check_releases()
    diff_releases()
    check_lag()


monitor_dag = abc_monitor()
