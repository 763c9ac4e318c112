"""The load DAG runs for real with dag.test(): a release mirrored from rclone-served S3, loaded and published."""

from __future__ import annotations

from etl import source
from etl.discovery import discover
from etl.fixtures import CONSENSUS_WMB, OLD_RELEASE
from etl.mirror import mirror_release
from tests.test_dag_watch import load_dag


def test_load_dag_publishes_a_mirrored_release(airflow_home, settings, engine, monkeypatch):
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    discover(source.make_client(settings), settings, engine)
    mirror_release(settings, engine, OLD_RELEASE, kinds=["metadata"], progress=False)
    dag = load_dag("abc_load_release", "abc_load_release")

    run = dag.test(run_conf={"release": OLD_RELEASE})
    assert run.state == "success"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT release FROM abc.current_release").scalar() == OLD_RELEASE
        cells = conn.exec_driver_sql("SELECT count(*) FROM abc.cell_annotated WHERE dataset = %s",
                                     (CONSENSUS_WMB,)).scalar()
    assert cells > 0

    again = dag.test(run_conf={"release": OLD_RELEASE})
    assert again.state == "success"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM abc.cell_annotated WHERE dataset = %s",
                                    (CONSENSUS_WMB,)).scalar() == cells
