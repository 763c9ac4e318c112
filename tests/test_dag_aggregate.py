"""The aggregation DAG and CLI on a mirrored, loaded release: dag.test() with PostgreSQL and a local mirror."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from etl import source
from etl.catalog import release_files_on_disk
from etl.cli import EXIT_FAILED, EXIT_OK, main
from etl.discovery import discover
from etl.fixtures import CONSENSUS_WMB, MACOSKO, NEW_RELEASE, OLD_RELEASE
from etl.load import load_release_metadata
from etl.mirror import mirror_release
from tests.test_dag_watch import load_dag


@pytest.fixture
def loaded(settings, engine, generated_bucket, monkeypatch):
    """Release OLD_RELEASE discovered, mirrored from the rclone-served bucket and its metadata loaded."""
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    discover(source.make_client(settings), settings, engine)
    assert not mirror_release(settings, engine, OLD_RELEASE).failed
    load_release_metadata(engine, OLD_RELEASE,
                          release_files_on_disk(settings, engine, OLD_RELEASE, kinds=["metadata"]))
    return settings


def _summary(engine: sa.Engine) -> list[tuple]:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT g.dataset, g.grouping, count(*), sum(g.n_cells), "
            "(SELECT count(*) FROM abc.expression_file f WHERE f.release = g.release AND f.dataset = g.dataset) "
            "FROM abc.expression_group g WHERE g.release = :r GROUP BY g.release, g.dataset, g.grouping "
            "ORDER BY 1, 2"), {"r": OLD_RELEASE}).all()


def _cells(engine: sa.Engine) -> dict[str, tuple[int, int]]:
    """Per dataset: cells with a cluster, and the matrix files (feature_matrix_label) holding them."""
    with engine.connect() as conn:
        # A cell's cluster is in the taxonomy's cell_to_cluster_membership (the consensus layout).
        rows = conn.execute(sa.text("SELECT c.dataset, count(*), count(DISTINCT c.feature_matrix_label) "
                                    "FROM abc.cell c JOIN abc.cell_cluster_membership m USING (release, cell_label) "
                                    "WHERE release = :r AND m.cluster_alias IS NOT NULL GROUP BY 1"),
                            {"r": OLD_RELEASE}).all()
    return {dataset: (cells, files) for dataset, cells, files in rows}


def test_dag_maps_over_files_then_publishes(airflow_home, loaded, engine):
    dag = load_dag("abc_aggregate_release", "abc_aggregate_release")
    for task in dag.tasks:
        task.retries = 0
    run = dag.test(run_conf={"release": OLD_RELEASE, "chunk_cells": 500})
    assert run.state == "success"
    summary = _summary(engine)
    cells = _cells(engine)
    assert {row[0] for row in summary} == {MACOSKO, CONSENSUS_WMB}
    for dataset, grouping, _, n_cells, n_files in summary:
        assert (n_cells, n_files) == cells[dataset], (dataset, grouping)  # every loaded cell, once per grouping
    with engine.connect() as conn:
        sources = conn.execute(sa.text("SELECT source FROM abc.expression_file WHERE release = :r "
                                       "AND dataset = :d"), {"r": OLD_RELEASE, "d": CONSENSUS_WMB}).scalars().all()
    assert {"WMB-10Xv2", "WMB-10Xv3"} <= {s.split("/")[-3] for s in sources}  # consensus cells in both WMB matrices

    again = dag.test(run_conf={"release": OLD_RELEASE, "chunk_cells": 500})
    assert again.state == "success"
    assert _summary(engine) == summary


def test_cli_aggregates_one_dataset_and_reports_an_unloaded_release(loaded, engine, capsys, tmp_path):
    url = loaded.database_url
    assert main(["aggregate", "--release", OLD_RELEASE, "--dataset", MACOSKO, "--database-url", url,
                 "--work-dir", str(tmp_path / "work")]) == EXIT_OK
    assert f"{MACOSKO}: " in capsys.readouterr().out
    assert {row[0] for row in _summary(engine)} == {MACOSKO}
    assert any((tmp_path / "work" / MACOSKO).glob("*.npz"))

    assert main(["aggregate", "--release", NEW_RELEASE, "--database-url", url]) == EXIT_FAILED
    assert "load the release's metadata first" in capsys.readouterr().err
