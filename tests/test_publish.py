"""Atomic publication of staged partitions on the real server."""

from __future__ import annotations

import psycopg
import pytest

from etl import db
from etl.publish import analyze_published, create_staging_table, index_staging_table, publish


@pytest.fixture
def conn(database_url: str):
    with db.copy_connection(database_url) as connection:
        connection.execute("CREATE TABLE abc.toy (release text NOT NULL, k integer NOT NULL, v text, "
                           "PRIMARY KEY (release, k)) PARTITION BY LIST (release)")
        connection.execute("CREATE INDEX toy_v_idx ON abc.toy (v)")
        connection.commit()
        yield connection


def _stage(conn: psycopg.Connection, release: str, rows: list[tuple[int, str]]) -> None:
    target = create_staging_table(conn, "toy", release)
    with conn.cursor().copy(psycopg.sql.SQL("COPY {} (release, k, v) FROM STDIN").format(target)) as copy:
        for k, v in rows:
            copy.write_row((release, k, v))
    index_staging_table(conn, "toy", release)
    conn.commit()


def _rows(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT release, k, v FROM abc.toy ORDER BY 1, 2").fetchall()


def test_publish_swaps_in_whole_release_and_republish_replaces(conn):
    _stage(conn, "20250101", [(1, "a"), (2, "b")])
    assert _rows(conn) == []  # staged rows are invisible
    with conn.transaction():
        publish(conn, "20250101", ["toy"])
    assert _rows(conn) == [("20250101", 1, "a"), ("20250101", 2, "b")]

    _stage(conn, "20250101", [(1, "a2")])
    with conn.transaction():
        publish(conn, "20250101", ["toy"])
    assert _rows(conn) == [("20250101", 1, "a2")]
    indexes = {r[0] for r in conn.execute(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'toy_r20250101'").fetchall()}
    assert len(indexes) == 2  # the primary key and toy_v_idx, reused by ATTACH


def test_failed_publish_leaves_previous_state(conn):
    _stage(conn, "20250101", [(1, "a")])
    with conn.transaction():
        publish(conn, "20250101", ["toy"])
    _stage(conn, "20250101", [(1, "new")])
    with pytest.raises(psycopg.errors.UndefinedTable), conn.transaction():
        publish(conn, "20250101", ["toy", "missing_table"])
    assert _rows(conn) == [("20250101", 1, "a")]


def test_release_must_be_a_date(conn):
    with pytest.raises(ValueError, match="YYYYMMDD"):
        create_staging_table(conn, "toy", "2025'; DROP TABLE abc.release; --")


def test_parents_are_analysed_when_their_partitions_double(conn):
    """A parent's statistics are taken at its first publication, then each time its partitions have
    doubled since they were taken (not at every publication: that re-analyses every partition)."""
    analysed_at = []
    for n, release in enumerate(["20250101", "20250201", "20250301", "20250401", "20250501"], start=1):
        _stage(conn, release, [(k, f"v{k}") for k in range(50)])
        with conn.transaction():
            publish(conn, release, ["toy"])
        if analyze_published(conn, ["toy"]) == ["toy"]:
            analysed_at.append(n)
        releases_in_statistics = conn.execute(
            "SELECT n_distinct FROM pg_stats WHERE schemaname = 'abc' AND tablename = 'toy' "
            "AND attname = 'release' AND inherited").fetchone()[0]
        assert releases_in_statistics == analysed_at[-1]
    assert analysed_at == [1, 2, 4]
    # Publishing a release again (same partitions) does not analyse the parent.
    _stage(conn, "20250501", [(1, "again")])
    with conn.transaction():
        publish(conn, "20250501", ["toy"])
    assert analyze_published(conn, ["toy"]) == []
