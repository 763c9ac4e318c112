"""What every abc-mirror DAG shares, defined once: the releases asset, retries with failure alerts, the end
of a failed run's stage, and a task's settings.

DAG files do not import each other; Airflow puts ``plugins/`` on their path, so they import this module.
"""

from __future__ import annotations

from datetime import timedelta

from abc_notifiers import AbcWebhookNotifier
from airflow.sdk import Asset

# abc_watch emits one partition per new release on it; abc_release runs once per partition.
RELEASES_ASSET = Asset("abc://releases", extra={"description": "new ABC Atlas release manifests"})

DEFAULT_ARGS = {
    "retries": 3,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "on_failure_callback": AbcWebhookNotifier(kind="failed_run"),
}


def end_stages_of_failed_run(context) -> None:
    """DAG failure callback: the stage a failed run leaves is dropped, never read as the release."""
    from etl import pipeline
    from etl.config import settings_for_airflow_task

    dag_run = context["dag_run"]
    pipeline.end_failed_run(settings_for_airflow_task(), dag_run.dag_id, dag_run.run_id)


def task_settings(params: dict | None = None):
    """Settings of a task: the environment and Airflow connections, with the run's ``target`` mirror root and
    ``scope`` params when it has them."""
    from etl.config import settings_for_airflow_task

    params = params or {}
    return settings_for_airflow_task().with_overrides(mirror_root=params.get("target") or None,
                                                      scope=params.get("scope") or None)
