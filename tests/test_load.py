"""Metadata load into PostgreSQL on generated releases: counts, reloads, atomic publication, bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psycopg
import pytest

from etl import db, source
from etl.catalog import cell_assignments
from etl.csv_stream import CsvFormatError
from etl.discovery import discover
from etl.fixtures import CONSENSUS_WMB, MACOSKO, NEW_RELEASE, OLD_RELEASE, TAXONOMY
from etl.load import LoadError, load_release_metadata, publish_staged_metadata
from tests.conftest import REPO, scoped_keys

CSV_OF_TABLE = {"cell": "cell_metadata", "gene": "gene", "donor": "donor", "library": "library",
                "cluster": "cluster", "cluster_annotation_term_set": "cluster_annotation_term_set",
                "cluster_annotation_term": "cluster_annotation_term",
                "cluster_membership": "cluster_to_cluster_annotation_membership",
                "cell_cluster_membership": "cell_to_cluster_membership", "value_set": "value_sets",
                "cell_embedding": "*cell_2d_embedding_coordinates"}


def metadata_files(generated_bucket, release: str, root: Path | None = None) -> dict[str, Path]:
    """The release's metadata files, from its manifest, at their place in the bucket (or a copy of it)."""
    base = root or generated_bucket.bucket_dir
    # What the consensus scope loads: the consensus datasets' metadata and the AIBS genes.
    return {rel: base / rel for rel in scoped_keys(generated_bucket, release) if rel.startswith("metadata/")}


def copied_files(generated_bucket, release: str, tmp_path: Path) -> dict[str, Path]:
    """A private copy of the release's metadata, for tests that damage or extend a file."""
    files = metadata_files(generated_bucket, release, tmp_path)
    for rel, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(generated_bucket.bucket_dir / rel, path)
    return files


def expected_cells(files: dict[str, Path]) -> pd.DataFrame:
    """Cells as the real files describe them: the metadata directory they are listed in (dataset),
    cluster from the taxonomy's cell_to_cluster_membership.csv, region and donor from library.csv."""
    cells = []
    for rel, path in files.items():
        if path.name == "cell_metadata.csv":
            frame = pd.read_csv(path, keep_default_na=False).assign(dataset=rel.split("/")[1])
            library = pd.read_csv(path.with_name("library.csv"))
            cells.append(frame.merge(library[["library_label", "region_of_interest_acronym", "donor_label"]],
                                     on="library_label", how="left"))
    membership = pd.concat([pd.read_csv(p) for p in files.values() if p.name == "cell_to_cluster_membership.csv"])
    return pd.concat(cells).merge(membership, on="cell_label", how="left")


def expected_rows(files: dict[str, Path]) -> dict[str, int]:
    counts = dict.fromkeys(CSV_OF_TABLE, 0)
    for table, stem in CSV_OF_TABLE.items():
        for path in files.values():
            if path.match(f"{stem}.csv"):
                counts[table] += len(pd.read_csv(path))
    return counts


@pytest.fixture
def discovered(settings, engine):
    """Releases recorded in abc.release through discovery against the rclone-served bucket."""
    discover(source.make_client(settings), settings, engine)
    return engine


@pytest.fixture
def conn(discovered):
    with db.copy_connection(discovered.url) as connection:
        connection.autocommit = True
        yield connection


def counts(conn: psycopg.Connection, release: str) -> dict[str, int]:
    return {t: conn.execute(f"SELECT count(*) FROM abc.{t} WHERE release = %s", (release,)).fetchone()[0]
            for t in CSV_OF_TABLE}


def current(conn: psycopg.Connection) -> str | None:
    row = conn.execute("SELECT release FROM abc.current_release").fetchone()
    return row and row[0]


def fingerprint(conn: psycopg.Connection, release: str) -> str:
    return conn.execute("SELECT md5(string_agg(c::text, '|' ORDER BY c.cell_label)) FROM abc.cell c "
                        "WHERE release = %s", (release,)).fetchone()[0]


def test_release_loads_every_table_with_exact_counts(generated_bucket, discovered, conn):
    files = metadata_files(generated_bucket, OLD_RELEASE)
    report = load_release_metadata(discovered, OLD_RELEASE, files)

    assert counts(conn, OLD_RELEASE) == expected_rows(files)
    assert report.published and current(conn) == OLD_RELEASE
    status, error, published_at = conn.execute(
        "SELECT status, last_error, published_at FROM abc.release WHERE version = %s", (OLD_RELEASE,)).fetchone()
    assert (status, error) == ("published", None) and published_at is not None
    datasets = dict(conn.execute("SELECT dataset, count(*) FROM abc.cell GROUP BY dataset").fetchall())
    frame = {d: pd.read_csv(generated_bucket.bucket_dir / f"metadata/{d}/{OLD_RELEASE}/cell_metadata.csv")
             for d in (MACOSKO, CONSENSUS_WMB)}
    assert datasets == {d: len(f) for d, f in frame.items()}
    # Typed values round-trip: the cell's library, cluster and coordinates are those of the files.
    first = frame[MACOSKO].iloc[0]
    taxonomy = generated_bucket.bucket_dir / f"metadata/{TAXONOMY}/{OLD_RELEASE}"
    cluster = pd.read_csv(taxonomy / "cell_to_cluster_membership.csv").set_index("cell_label").cluster_alias
    embedding = pd.read_csv(taxonomy / "cell_2d_embedding_coordinates.csv").set_index("cell_label")
    row = conn.execute("SELECT c.library_label, c.dataset_label, c.extra, m.cluster_alias, e.x FROM abc.cell c "
                       "JOIN abc.cell_cluster_membership m USING (release, cell_label) "
                       "JOIN abc.cell_embedding e USING (release, cell_label) "
                       "WHERE cell_label = %s AND e.embedding = 'cell_2d_embedding_coordinates'",
                       (first.cell_label,)).fetchone()
    assert row == (first.library_label, MACOSKO, None, cluster[first.cell_label],
                   pytest.approx(embedding.x[first.cell_label]))
    recorded = conn.execute("SELECT count(*) FROM abc.metadata_file WHERE release = %s AND table_name IS NOT NULL",
                            (OLD_RELEASE,)).fetchone()[0]
    assert recorded == len(report.loaded) == len(
        [p for p in files.values() if any(p.match(f"{stem}.csv") for stem in CSV_OF_TABLE.values())])
    assert conn.execute("SELECT count(*) FROM abc.cluster WHERE dataset = %s", (TAXONOMY,)).fetchone()[0] > 0


def test_reload_is_a_no_op_in_effect(generated_bucket, discovered, conn):
    files = metadata_files(generated_bucket, OLD_RELEASE)
    load_release_metadata(discovered, OLD_RELEASE, files)
    before, print_before = counts(conn, OLD_RELEASE), fingerprint(conn, OLD_RELEASE)
    load_release_metadata(discovered, OLD_RELEASE, files)
    assert counts(conn, OLD_RELEASE) == before
    assert fingerprint(conn, OLD_RELEASE) == print_before
    partitions = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'abc.cell'::regclass").fetchone()[0]
    assert partitions == 1


def test_newer_release_loads_beside_the_old_and_current_switches(generated_bucket, discovered, conn):
    load_release_metadata(discovered, OLD_RELEASE, metadata_files(generated_bucket, OLD_RELEASE))
    old_counts, old_print = counts(conn, OLD_RELEASE), fingerprint(conn, OLD_RELEASE)
    assert current(conn) == OLD_RELEASE

    new_files = metadata_files(generated_bucket, NEW_RELEASE)
    load_release_metadata(discovered, NEW_RELEASE, new_files)
    assert current(conn) == NEW_RELEASE
    assert counts(conn, NEW_RELEASE) == expected_rows(new_files)
    assert counts(conn, OLD_RELEASE) == old_counts and fingerprint(conn, OLD_RELEASE) == old_print
    changes = generated_bucket.changes[CONSENSUS_WMB]
    moved = changes.reassigned[0]
    old, new = (conn.execute("SELECT cluster_alias FROM abc.cell_annotated WHERE release = %s AND cell_label = %s",
                             (r, moved)).fetchone()[0] for r in (OLD_RELEASE, NEW_RELEASE))
    assert old != new
    gone = conn.execute("SELECT count(*) FROM abc.cell WHERE release = %s AND cell_label = ANY(%s)",
                        (NEW_RELEASE, changes.removed)).fetchone()[0]
    assert gone == 0


def test_unknown_column_is_kept_in_extra_and_reported(generated_bucket, discovered, conn, tmp_path):
    files = copied_files(generated_bucket, OLD_RELEASE, tmp_path)
    path = files[f"metadata/{MACOSKO}/{OLD_RELEASE}/cell_metadata.csv"]
    frame = pd.read_csv(path, keep_default_na=False)
    frame.insert(3, "population_sampling, new", [f"p{i % 3}" for i in range(len(frame))])
    frame = frame[list(reversed(frame.columns))]  # columns in any order
    frame.to_csv(path, index=False)
    unknown_file = path.with_name("region_of_interest_metadata.csv")
    unknown_file.write_text("acronym,name\nHY,Hypothalamus\n")
    files[f"metadata/{MACOSKO}/{OLD_RELEASE}/region_of_interest_metadata.csv"] = unknown_file

    report = load_release_metadata(discovered, OLD_RELEASE, files)
    (cells,) = [x for x in report.loaded if x.file.relative_path.endswith(f"{MACOSKO}/{OLD_RELEASE}/cell_metadata.csv")]
    assert cells.unknown_columns == ["population_sampling, new"] and cells.rows == len(frame)
    kept = dict(conn.execute("SELECT cell_label, extra->>'population_sampling, new' FROM abc.cell "
                             "WHERE dataset = %s", (MACOSKO,)).fetchall())
    assert kept == dict(zip(frame.cell_label, frame["population_sampling, new"], strict=True))
    typed = conn.execute("SELECT library_label, feature_matrix_label FROM abc.cell WHERE cell_label = %s",
                         (frame.cell_label.iloc[5],)).fetchone()
    assert typed == (frame.library_label.iloc[5], frame.feature_matrix_label.iloc[5])
    recorded = conn.execute("SELECT unknown_columns FROM abc.metadata_file WHERE relative_path = %s",
                            (cells.file.relative_path,)).fetchone()[0]
    assert recorded == ["population_sampling, new"]
    assert "region_of_interest_metadata" in [f.tag for f in report.ignored]
    note = conn.execute("SELECT note FROM abc.metadata_file WHERE relative_path LIKE %s AND table_name IS NULL",
                        ("%region_of_interest_metadata.csv",)).fetchone()[0]
    assert note == "no table for this file yet"


def _damage(path: Path, line: int, column: str, value: str) -> None:
    """Set one field of a CSV; ``line`` counts the header as line 1."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[line - 2, column] = value
    frame.to_csv(path, index=False)


@pytest.mark.parametrize(("stem", "column", "value", "expected"), [
    ("cell_to_cluster_membership", "cluster_alias", "twelve",
     r"cell_to_cluster_membership.csv: line 7, column cluster_alias: invalid input syntax for type int"),
    ("cell_metadata", "cell_label", "", r"cell_metadata.csv: line 7: null value in column \"cell_label\""),
    ("cell_to_cluster_membership", "cluster_alias", "999999",
     r"\(cluster_alias\)=\(999999\) not in abc.cluster .*/cell_to_cluster_membership.csv line\(s\) 7$"),
    ("cell_metadata", "cell_label", "DUPLICATE",
     r"duplicate key \(cell_label\)=\(DUPLICATE\) at .*cell_metadata.csv line\(s\) 7"),
    ("cell_to_cluster_membership", "cell_label", "DUPLICATE",
     r"duplicate key \(cell_label\)=\(DUPLICATE\) at .*cell_to_cluster_membership.csv line\(s\) 7"),
])
def test_bad_row_fails_with_file_and_line_and_publishes_nothing(generated_bucket, discovered, conn, tmp_path,
                                                                stem, column, value, expected):
    load_release_metadata(discovered, OLD_RELEASE, metadata_files(generated_bucket, OLD_RELEASE))
    published = fingerprint(conn, OLD_RELEASE)
    files = copied_files(generated_bucket, NEW_RELEASE, tmp_path)
    dataset = TAXONOMY if stem == "cell_to_cluster_membership" else CONSENSUS_WMB
    path = files[f"metadata/{dataset}/{NEW_RELEASE}/{stem}.csv"]
    _damage(path, 7, column, value)
    if value == "DUPLICATE":
        _damage(path, 9, column, value)

    with pytest.raises(LoadError, match=expected):
        load_release_metadata(discovered, NEW_RELEASE, files)
    assert current(conn) == OLD_RELEASE and fingerprint(conn, OLD_RELEASE) == published
    assert counts(conn, NEW_RELEASE) == dict.fromkeys(CSV_OF_TABLE, 0)
    status, error = conn.execute("SELECT status, last_error FROM abc.release WHERE version = %s",
                                 (NEW_RELEASE,)).fetchone()
    assert status == "failed" and f"{stem}.csv" in error
    staged = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'abc_staging'").fetchone()[0]
    assert staged == 0


def test_tables_stage_side_by_side_and_the_first_failure_cancels_the_rest(generated_bucket, discovered, conn,
                                                                          tmp_path, monkeypatch):
    """While abc.cell is locked, the cells' staging waits on one connection and the other tables stage on
    the other; the bad membership row fails the load at once, cancelling the waiting statement."""
    monkeypatch.setenv("ABC_LOAD_CONNECTIONS", "2")
    files = copied_files(generated_bucket, OLD_RELEASE, tmp_path)
    _damage(files[f"metadata/{TAXONOMY}/{OLD_RELEASE}/cell_to_cluster_membership.csv"], 7, "cluster_alias", "twelve")
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_release_metadata(discovered, OLD_RELEASE, files)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    with db.copy_connection(discovered.url) as blocker:
        blocker.execute("LOCK TABLE abc.cell IN ACCESS EXCLUSIVE MODE")
        loader = threading.Thread(target=load)
        loader.start()
        loader.join(timeout=60)
        finished_while_locked = not loader.is_alive()
        blocker.rollback()
    loader.join()
    assert finished_while_locked, "the load waited for abc.cell instead of cancelling its staging"
    assert isinstance(outcome[0], LoadError)
    assert "cell_to_cluster_membership.csv: line 7, column cluster_alias" in str(outcome[0])
    assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'abc_staging'").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND query LIKE 'CREATE TABLE%%' AND state <> 'idle'").fetchone()[0] == 0
    assert current(conn) is None


def test_killed_load_leaves_nothing_and_rerun_publishes_once(generated_bucket, discovered, conn):
    files = metadata_files(generated_bucket, OLD_RELEASE)
    script = ("import json, sys; from pathlib import Path; from etl.db import make_engine; "
              "from etl.load import load_release_metadata; "
              "files = {k: Path(v) for k, v in json.loads(sys.argv[3]).items()}; "
              "load_release_metadata(make_engine(sys.argv[1]), sys.argv[2], files)")
    with db.copy_connection(discovered.url) as blocker:
        # Hold abc.cell: the load stages the taxonomy, genes, donors and libraries, then waits here.
        blocker.execute("LOCK TABLE abc.cell IN ACCESS EXCLUSIVE MODE")
        url = discovered.url.render_as_string(hide_password=False)
        loader = subprocess.Popen([sys.executable, "-c", script, url, OLD_RELEASE,
                                   json.dumps({k: str(v) for k, v in files.items()})], cwd=REPO)
        deadline = time.monotonic() + 60
        while not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND wait_event_type = 'Lock' AND query LIKE 'CREATE TABLE%%'").fetchone()[0]:
            assert loader.poll() is None and time.monotonic() < deadline, "the load never reached abc.cell"
            time.sleep(0.1)
        os.kill(loader.pid, signal.SIGKILL)
        loader.wait()
        blocker.rollback()
    assert counts(conn, OLD_RELEASE) == dict.fromkeys(CSV_OF_TABLE, 0)
    assert current(conn) is None

    load_release_metadata(discovered, OLD_RELEASE, files)
    assert counts(conn, OLD_RELEASE) == expected_rows(files)
    assert current(conn) == OLD_RELEASE


def test_staged_release_is_readable_before_publication(generated_bucket, discovered, conn):
    files = metadata_files(generated_bucket, OLD_RELEASE)
    report = load_release_metadata(discovered, OLD_RELEASE, files, publish_now=False)
    assert not report.published and current(conn) is None
    frame = pd.read_csv(files[f"metadata/{CONSENSUS_WMB}/{OLD_RELEASE}/cell_metadata.csv"])
    staged = cell_assignments(conn, OLD_RELEASE, CONSENSUS_WMB)
    assert list(staged.columns) == ["cell_label", "cluster_alias", "region_of_interest_acronym",
                                    "feature_matrix_label"]
    assert staged.cell_label.tolist() == sorted(frame.cell_label)
    assert counts(conn, OLD_RELEASE)["cell"] == 0

    with conn.transaction():
        publish_staged_metadata(conn, OLD_RELEASE)
    assert current(conn) == OLD_RELEASE
    pd.testing.assert_frame_equal(cell_assignments(conn, OLD_RELEASE, CONSENSUS_WMB), staged)


def test_loading_one_dataset_keeps_the_others(generated_bucket, discovered, conn, tmp_path):
    load_release_metadata(discovered, OLD_RELEASE, metadata_files(generated_bucket, OLD_RELEASE))
    before = counts(conn, OLD_RELEASE)
    macosko_before = conn.execute("SELECT count(*) FROM abc.cell WHERE dataset = %s", (MACOSKO,)).fetchone()[0]
    files = copied_files(generated_bucket, OLD_RELEASE, tmp_path)
    path = files[f"metadata/{CONSENSUS_WMB}/{OLD_RELEASE}/cell_metadata.csv"]
    frame = pd.read_csv(path, keep_default_na=False)
    frame.iloc[:-5].to_csv(path, index=False)

    load_release_metadata(discovered, OLD_RELEASE, files, datasets=[CONSENSUS_WMB])
    after = counts(conn, OLD_RELEASE)
    assert after == {**before, "cell": before["cell"] - 5}
    assert conn.execute("SELECT count(*) FROM abc.cell WHERE dataset = %s", (MACOSKO,)).fetchone()[0] == macosko_before
    assert cells_counted(conn, OLD_RELEASE) == cells_per_cluster(conn, OLD_RELEASE)
    assert sum(cells_counted(conn, OLD_RELEASE).values()) == after["cell"]


def cells_per_cluster(conn: psycopg.Connection, release: str) -> dict[tuple[str, int | None], int]:
    """Cells per dataset and cluster, counted from the cells of the published release."""
    return dict(((d, a), n) for d, a, n in conn.execute(
        "SELECT dataset, cluster_alias, count(*) FROM abc.cell_annotated WHERE release = %s GROUP BY 1, 2",
        (release,)).fetchall())


def cells_counted(conn: psycopg.Connection, release: str) -> dict[tuple[str, int | None], int]:
    """The same from abc.cluster_cell_count."""
    return dict(((d, a), n) for d, a, n in conn.execute(
        "SELECT dataset, cluster_alias, n_cells FROM abc.cluster_cell_count WHERE release = %s", (release,)).fetchall())


def expression_views_of_004() -> str:
    """Migration 004's two expression views (which 013 replaces), as CREATE OR REPLACE statements."""
    statements = (db.MIGRATIONS / "004_expression.sql").read_text(encoding="utf-8").split(";")
    code = ["\n".join(line for line in s.splitlines() if not line.startswith("--")).strip() for s in statements]
    views = [c.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1) for c in code
             if c.startswith(("CREATE VIEW abc.expression_by_gene AS", "CREATE VIEW abc.expression_profile AS"))]
    assert len(views) == 2
    return ";\n".join(views)


def test_migration_013_counts_the_releases_loaded_before_it(generated_bucket, discovered, conn):
    """A database that 012 left with a published and a staged release gets both releases' counts."""
    load_release_metadata(discovered, OLD_RELEASE, metadata_files(generated_bucket, OLD_RELEASE))
    load_release_metadata(discovered, NEW_RELEASE, metadata_files(generated_bucket, NEW_RELEASE), publish_now=False)
    published = cells_counted(conn, OLD_RELEASE)
    staged = dict(((d, a), n) for d, a, n in conn.execute(
        f"SELECT dataset, cluster_alias, n_cells FROM abc_staging.cluster_cell_count_r{NEW_RELEASE}").fetchall())
    assert published == cells_per_cluster(conn, OLD_RELEASE) and sum(staged.values()) > 0
    # Back to what 012 left: no counts, and 004's views without 013's function and index.
    conn.execute("DROP TABLE abc.cluster_cell_count CASCADE")
    conn.execute(f"DROP TABLE abc_staging.cluster_cell_count_r{NEW_RELEASE}")
    conn.execute("DROP INDEX abc.expression_gene_symbol_any_dataset_idx")
    conn.execute(expression_views_of_004())
    conn.execute("DROP FUNCTION abc.unnest_statistics")
    conn.execute("DELETE FROM abc.schema_migration WHERE number = 13")

    assert db.upgrade(discovered) == ["013_analyst_queries_at_size"]
    assert cells_counted(conn, OLD_RELEASE) == published
    with conn.transaction():
        publish_staged_metadata(conn, NEW_RELEASE)
    assert cells_counted(conn, NEW_RELEASE) == staged == cells_per_cluster(conn, NEW_RELEASE)


# The example queries of docs/schema.md.
CELLS_PER_CLASS = """SELECT dataset, class_name, count(*) AS cells FROM abc.current_cell_annotated
                     GROUP BY dataset, class_name ORDER BY dataset, class_name"""
CLUSTERS_IN_BOTH = """SELECT cluster_alias FROM abc.current_cell_annotated GROUP BY cluster_alias
                      HAVING count(DISTINCT dataset) = 2 ORDER BY cluster_alias"""
CELLS_OF_A_REGION = """SELECT cell_label, subclass_name FROM abc.current_cell_annotated
                       WHERE region_of_interest_acronym = %s"""
# The same two questions as docs/schema.md asks them: from the counts staged with the cells.
CELLS_PER_CLASS_COUNTED = """SELECT dataset, term_name AS class_name, n_cells AS cells FROM abc.current_term_cell_count
                             WHERE term_set_name = 'class' ORDER BY dataset, class_name"""
CLUSTERS_IN_BOTH_COUNTED = """SELECT cluster_alias FROM abc.current_cluster_cell_count GROUP BY cluster_alias
                              HAVING count(DISTINCT dataset) = 2 ORDER BY cluster_alias"""


def test_analyst_views_and_read_only_role(generated_bucket, discovered, conn):
    files = metadata_files(generated_bucket, OLD_RELEASE)
    load_release_metadata(discovered, OLD_RELEASE, files)
    cells = expected_cells(files)
    membership = pd.read_csv(next(p for p in files.values() if p.stem == "cluster_to_cluster_annotation_membership"))
    classes = membership[membership.cluster_annotation_term_set_name == "class"]
    expected = cells.merge(classes, on="cluster_alias").groupby(["dataset", "cluster_annotation_term_name"])
    expected = expected.size()
    per_class = {(d, c): n for d, c, n in conn.execute(CELLS_PER_CLASS).fetchall()}
    assert per_class == expected.to_dict()
    both = [a for (a,) in conn.execute(CLUSTERS_IN_BOTH).fetchall()]
    assert both == sorted(set(cells[cells.dataset == MACOSKO].cluster_alias)
                          & set(cells[cells.dataset == CONSENSUS_WMB].cluster_alias))
    with conn.transaction():
        conn.execute("SET LOCAL ROLE abc_reader")
        assert {(d, c): n for d, c, n in conn.execute(CELLS_PER_CLASS_COUNTED).fetchall()} == expected.to_dict()
        assert [a for (a,) in conn.execute(CLUSTERS_IN_BOTH_COUNTED).fetchall()] == both
    region = cells.region_of_interest_acronym.iloc[0]
    in_region = conn.execute(CELLS_OF_A_REGION, (region,)).fetchall()
    assert len(in_region) == (cells.region_of_interest_acronym == region).sum()
    annotated = conn.execute("SELECT count(*), count(class_name), count(donor_sex), count(library_method) "
                             "FROM abc.cell_annotated").fetchone()
    # Macosko's library.csv has no library_method (as in the real release): only AIBS cells have one.
    with_method = pd.concat([pd.read_csv(p) for p in files.values() if p.name == "library.csv"])
    with_method = with_method.dropna(subset=["library_method"]).library_label
    assert annotated == (len(cells),) * 3 + (cells.library_label.isin(with_method).sum(),)
    assert 0 < annotated[3] < len(cells)

    with conn.transaction():
        conn.execute("SET LOCAL ROLE abc_reader")
        assert conn.execute("SELECT count(*) FROM abc.current_cell_annotated").fetchone()[0] == len(cells)
        assert conn.execute("SELECT release FROM abc.current_release").fetchone()[0] == OLD_RELEASE
    for statement in ("SELECT count(*) FROM abc.cell",
                      "SELECT count(*) FROM abc.release",
                      "INSERT INTO abc.current_cluster (release, dataset, cluster_alias) VALUES ('20251031', 'x', -1)",
                      "UPDATE abc.current_cell SET cluster_alias = 1",
                      "DELETE FROM abc.current_gene",
                      "CREATE TABLE abc.scratch (i integer)",
                      "CREATE TABLE public.scratch (i integer)",
                      "CREATE VIEW abc.scratch AS SELECT 1"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("SET LOCAL ROLE abc_reader")
            conn.execute(statement)


def test_consensus_layout_cluster_and_coordinates_from_the_taxonomy(generated_bucket, discovered, conn):
    """As in the real consensus release: cell_metadata.csv without cluster, region or coordinates; the
    taxonomy directory holds cell_to_cluster_membership.csv and the 2-D embeddings; value_sets.csv."""
    files = metadata_files(generated_bucket, OLD_RELEASE)
    cells = expected_cells(files)
    taxonomy = generated_bucket.bucket_dir / f"metadata/{TAXONOMY}/{OLD_RELEASE}"
    embeddings = {p.stem: pd.read_csv(p) for p in taxonomy.glob("*cell_2d_embedding_coordinates.csv")}
    assert len(embeddings) >= 3
    value_sets = pd.concat([pd.read_csv(p).assign(dataset=rel.split("/")[1]) for rel, p in files.items()
                            if p.name == "value_sets.csv"])

    load_release_metadata(discovered, OLD_RELEASE, files)
    assert conn.execute("SELECT count(cluster_alias) FROM abc.cell").fetchone()[0] == 0
    assert dict(conn.execute("SELECT embedding, count(*) FROM abc.cell_embedding GROUP BY 1").fetchall()) == {
        stem: len(frame) for stem, frame in embeddings.items()}
    loaded = conn.execute("SELECT dataset, field, label, value_order, color_hex_triplet FROM abc.value_set "
                          "ORDER BY 1, 2, 3").fetchall()
    assert loaded == sorted(zip(value_sets.dataset, value_sets.field, value_sets.label, value_sets.order,
                                value_sets.color_hex_triplet, strict=True))
    annotated = pd.DataFrame(conn.execute(
        "SELECT cell_label, cluster_alias, region_of_interest_acronym, donor_sex, x, class_name, neighborhood_name, "
        "class_color FROM abc.current_cell_annotated").fetchall(),
        columns=["cell_label", "cluster_alias", "region", "donor_sex", "x", "class_name", "neighborhood_name",
                 "class_color"]).set_index("cell_label")
    assert len(annotated) == len(cells)
    expected = cells.set_index("cell_label").loc[annotated.index]
    assert (annotated.cluster_alias == expected.cluster_alias).all()
    assert (annotated.region == expected.region_of_interest_acronym).all()
    donors = pd.concat([pd.read_csv(p) for p in files.values() if p.name == "donor.csv"])
    assert (annotated.donor_sex == expected.donor_label.map(donors.set_index("donor_label").donor_sex)).all()
    coordinates = embeddings["cell_2d_embedding_coordinates"].set_index("cell_label").x
    assert annotated.x.to_numpy() == pytest.approx(coordinates.loc[annotated.index].to_numpy())
    assert annotated.class_name.notna().all() and annotated.neighborhood_name.notna().all()
    # Colours come from cluster_annotation_term.csv (the membership file has none).
    terms = pd.read_csv(taxonomy / "cluster_annotation_term.csv").set_index("name").color_hex_triplet
    assert (annotated.class_color == annotated.class_name.map(terms)).all()
    assigned = cell_assignments(conn, OLD_RELEASE, MACOSKO).set_index("cell_label")
    macosko = cells[cells.dataset == MACOSKO].set_index("cell_label").loc[assigned.index]
    assert len(assigned) == len(macosko) > 0
    assert (assigned.cluster_alias == macosko.cluster_alias).all()
    assert (assigned.region_of_interest_acronym == macosko.region_of_interest_acronym).all()


def test_cli_loads_from_the_mirror_only(generated_bucket, settings, engine, discovered, conn, monkeypatch, capsys):
    from etl.cli import EXIT_OK, EXIT_UNUSABLE, main
    from etl.mirror import mirror_release

    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    args = ["load", "--release", OLD_RELEASE, "--database-url", settings.database_url]
    assert main(args) == EXIT_UNUSABLE  # nothing mirrored yet: never read around the mirror
    assert "are not mirrored and verified" in capsys.readouterr().err and current(conn) is None

    mirror_release(settings, engine, OLD_RELEASE, kinds=["metadata"], progress=False)
    assert main(args) == EXIT_OK
    assert f"release {OLD_RELEASE} published" in capsys.readouterr().out
    assert counts(conn, OLD_RELEASE) == expected_rows(metadata_files(generated_bucket, OLD_RELEASE))


def _transform(path: Path, unknown: set[str]) -> tuple[list[list[str]], list[str]]:
    """Rows the COPY of a file with ``unknown`` columns receives (parsed back), and its header."""
    from etl.csv_stream import read_header, transformed_chunks

    header = read_header(path)
    keep = [i for i, c in enumerate(header) if c not in unknown]
    extra = [(i, c) for i, c in enumerate(header) if c in unknown]
    text = b"".join(transformed_chunks(path, f"metadata/x/1/{path.name}", keep, extra)).decode()
    rows = list(csv.reader(io.StringIO(text)))
    return rows[1:], header


def _expected(path: Path, unknown: set[str]) -> list[list[str]]:
    """The same rows by the csv module and json.dumps, row by row: what the transform must give."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return [[v for v, c in zip(row, header, strict=True) if c not in unknown]
                + [json.dumps({c: v or None for v, c in zip(row, header, strict=True) if c in unknown},
                              ensure_ascii=False)] for row in reader]


@pytest.mark.parametrize("unknown", [{"u"}, {"u", "w"}, {"a"}])
@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 20])
def test_transform_of_plain_and_quoted_lines_is_the_csv_modules(tmp_path, monkeypatch, unknown, chunk_bytes):
    """Plain lines are split as bytes, the rest of the file from the first quoted one by the csv module."""
    monkeypatch.setattr("etl.csv_stream.CHUNK_BYTES", chunk_bytes)
    lines = ["a,b,u,w"] + [f"x{i},{i % 7 or ''},{'' if i % 5 == 0 else f'é{i}'},{i}" for i in range(40)]
    lines += ['q,"1,5",u v,"say ""hi"""', 'r,2,"two\nlines",\\', "s,3,\ttab,x", "t,4,,"]
    path = tmp_path / "cell_metadata.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    rows, _ = _transform(path, unknown)
    assert rows == _expected(path, unknown)
    path.write_bytes("\n".join(lines[:30]).encode())  # no final line feed, all plain
    rows, _ = _transform(path, unknown)
    assert rows == _expected(path, unknown) and len(rows) == 29


@pytest.mark.parametrize("bad_line", [3, 30, 45])
def test_transform_names_the_line_with_a_wrong_field_count(tmp_path, monkeypatch, bad_line):
    monkeypatch.setattr("etl.csv_stream.CHUNK_BYTES", 64)
    lines = ["a,b,u"] + [f"x{i},{i},v{i}" for i in range(50)]
    lines[40] = 'q,"1,5",v'  # from here on, the csv module
    lines[bad_line - 1] = "x,1,2,3" if bad_line != 30 else ""
    path = tmp_path / "cell_metadata.csv"
    path.write_text("\n".join(lines) + "\n")
    found = 0 if bad_line == 30 else 4
    with pytest.raises(CsvFormatError, match=f"cell_metadata.csv: line {bad_line}: {found} fields, the header has 3"):
        _transform(path, {"u"})
