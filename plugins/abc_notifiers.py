"""Airflow notifier posting abc-mirror alerts to the JSON webhook (``ABC_WEBHOOK_URL``).

Use it in task or DAG callbacks, e.g. ``default_args={"on_failure_callback": AbcWebhookNotifier()}``
or ``on_failure_callback=AbcWebhookNotifier(kind="failed_run")`` on a DAG. The body is the one of
``etl.alerts`` (kind, release, summary, details with dag_id, run_id, task_id, try and the error),
and a webhook that is down only logs a warning: the callback never fails the task or run.
"""

from __future__ import annotations

from airflow.sdk import BaseNotifier


class AbcWebhookNotifier(BaseNotifier):
    """Send one ``etl.alerts.Alert`` from an Airflow callback context."""

    template_fields = ("summary", "webhook_url")

    def __init__(self, kind: str = "failed_run", summary: str | None = None, webhook_url: str | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.summary = summary
        self.webhook_url = webhook_url

    def notify(self, context) -> None:
        """Send the alert once per failed task (DAG, run, task, map index): a task cleared and failing again,
        or a callback run twice, does not alert again."""
        from etl import db
        from etl.alerts import Alert, send_once
        from etl.config import settings_for_airflow_task

        ti = context.get("ti") or context.get("task_instance")
        dag_run = context.get("dag_run")
        params = context.get("params") or {}
        release = (params.get("release") if isinstance(params.get("release"), str) else None) or getattr(
            dag_run, "partition_key", None) or None  # abc_release: the param, else the asset partition
        error = context.get("exception")
        where = ".".join(x for x in (getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", None),
                                     getattr(ti, "task_id", None)) if x)
        summary = self.summary or (f"{where} failed" + (f" (release {release})" if release else "")
                                   + (f": {error}" if error else ""))
        failed = {"dag_id": getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", None),
                  "run_id": getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None),
                  "task_id": getattr(ti, "task_id", None), "map_index": getattr(ti, "map_index", None)}
        details = {**failed, "try_number": getattr(ti, "try_number", None),
                   "error": f"{type(error).__name__}: {error}" if error else None}
        settings = settings_for_airflow_task()
        engine = db.make_engine(settings.database_url)
        try:
            send_once(Alert(self.kind, summary, release, details), self.webhook_url or settings.webhook_url,
                      engine, failed)
        finally:
            engine.dispose()
