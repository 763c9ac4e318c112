"""The daily monitoring DAG runs for real with dag.test(): alerts reach a local webhook."""

from __future__ import annotations

import sqlalchemy as sa

from etl import source
from etl.discovery import discover
from etl.fixtures import CONSENSUS_RELEASES, NEW_RELEASE, OLD_RELEASE, RELEASES
from tests.conftest import REPO
from tests.test_dag_watch import load_dag
from tests.test_monitor import Webhook, closed_port_url, load


def _monitor_dag(monkeypatch, settings, webhook_url: str, max_lag_hours: str):
    monkeypatch.syspath_prepend(str(REPO / "plugins"))  # what Airflow does with its plugins folder
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    monkeypatch.setenv("ABC_WEBHOOK_URL", webhook_url)
    monkeypatch.setenv("ABC_MAX_LAG_HOURS", max_lag_hours)
    return load_dag("abc_monitor", "abc_monitor")


def test_monitor_dag_alerts_new_release_failed_check_and_lag(airflow_home, settings, engine, generated_bucket,
                                                              monkeypatch):
    discover(source.make_client(settings), settings, engine)
    load(settings, generated_bucket, OLD_RELEASE)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE abc.gene SET gene_symbol = NULL WHERE release = :r AND gene_identifier = "
                             "(SELECT min(gene_identifier) FROM abc.gene WHERE release = :r)"), {"r": OLD_RELEASE})
    webhook = Webhook()
    try:
        dag = _monitor_dag(monkeypatch, settings, webhook.url, "0")
        assert dag.schedule == "@daily" or str(dag.timetable.summary) == "@daily"
        run = dag.test()
        assert run.state == "success"
        by_kind = {}
        for body in webhook.received:
            by_kind.setdefault(body["kind"], []).append(body)
        assert sorted(b["release"] for b in by_kind["new_release"]) == CONSENSUS_RELEASES
        (failed,) = by_kind["failed_check"]
        assert failed["release"] == OLD_RELEASE and failed["details"]["checks"][0]["name"] == "gene_symbol_present"
        (lag,) = by_kind["lag"]
        assert (lag["details"]["newest_upstream"], lag["details"]["newest_published"]) == (NEW_RELEASE, OLD_RELEASE)
        assert set(by_kind) == {"new_release", "failed_check", "lag"}

        load(settings, generated_bucket, NEW_RELEASE)  # a newer load: checked and diffed by the next run
        webhook.received.clear()
        assert dag.test().state == "success"
        assert webhook.kinds() == []  # announced once; the new release passes; nothing lags now
        notes = settings.mirror_path / "releases" / NEW_RELEASE / "release-notes.md"
        assert notes.read_text().startswith(f"# Release {NEW_RELEASE}: changes since {OLD_RELEASE}")
    finally:
        webhook.close()


def test_failed_task_alerts_through_the_notifier(airflow_home, settings, engine, monkeypatch):
    webhook = Webhook()
    try:
        dag = _monitor_dag(monkeypatch, settings, webhook.url, "24")
        with engine.begin() as conn:  # break the warehouse under the tasks: every task fails
            conn.execute(sa.text("DROP TABLE abc.quality_check, abc.alert"))
        for task in dag.tasks:  # fail now instead of waiting out the retry delay
            task.retries = 0
        run = dag.test()
        assert run.state == "failed"
        failed = [b for b in webhook.received if b["kind"] == "failed_run"]
        assert {b["details"]["task_id"] for b in failed} >= {"check_releases"}
        assert all(b["details"]["dag_id"] == "abc_monitor" and b["details"]["error"] for b in failed)
    finally:
        webhook.close()


def test_down_webhook_does_not_fail_the_run(airflow_home, settings, engine, generated_bucket, monkeypatch):
    discover(source.make_client(settings), settings, engine)
    dag = _monitor_dag(monkeypatch, settings, closed_port_url(), "0")
    assert dag.test().state == "success"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM abc.alert WHERE NOT delivered")).scalar_one() > 0


def test_discovery_under_airflow_records_the_task_in_lineage(airflow_home, settings, engine, monkeypatch):
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)
    monkeypatch.setenv("OPENLINEAGE_DISABLED", "true")
    run = load_dag("abc_watch", "abc_watch").test()
    assert run.state == "success"
    with engine.connect() as conn:
        runs = conn.execute(sa.text("SELECT release, orchestrator, dag_id, dag_run_id, task_id, status "
                                    "FROM abc.lineage_run WHERE step = 'discover' ORDER BY release")).all()
        objects = conn.execute(sa.text("SELECT count(*) FROM abc.source_object WHERE etag IS NOT NULL "
                                       "AND last_modified IS NOT NULL")).scalar_one()
    assert [tuple(r) for r in runs] == [(release, "airflow", "abc_watch", run.run_id, "discover_releases", "succeeded")
                                        for release in RELEASES]
    assert objects > 0


def test_a_failed_task_alerts_once_however_often_its_callback_runs(airflow_home, settings, engine, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    from abc_notifiers import AbcWebhookNotifier

    def failed(task_id: str, try_number: int) -> dict:
        ti = SimpleNamespace(dag_id="abc_release", run_id="manual__1", task_id=task_id, map_index=-1,
                             try_number=try_number)
        return {"ti": ti, "params": {"release": OLD_RELEASE}, "exception": RuntimeError("the warehouse went away")}

    webhook = Webhook()
    try:
        notifier = AbcWebhookNotifier(kind="failed_run", webhook_url=webhook.url)
        notifier.notify(failed("validate", 4))
        notifier.notify(failed("validate", 5))  # cleared, failed again: the same failed task
        assert [b["details"]["task_id"] for b in webhook.received] == ["validate"]
        notifier.notify(failed("publish", 4))  # another task of the run is another failure
        assert [b["details"]["task_id"] for b in webhook.received] == ["validate", "publish"]
    finally:
        webhook.close()
    down = AbcWebhookNotifier(kind="failed_run", webhook_url=closed_port_url())
    down.notify(failed("lineage", 1))
    down.notify(failed("lineage", 2))  # not delivered: tried again
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT payload -> 'details' ->> 'task_id', delivered FROM abc.alert "
                                    "WHERE kind = 'failed_run' AND release = :r ORDER BY id"),
                            {"r": OLD_RELEASE}).all()
    assert [tuple(r) for r in rows] == [("validate", True), ("publish", True), ("lineage", False), ("lineage", False)]
