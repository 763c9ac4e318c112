"""Load a release's metadata CSVs (cells, genes, donors, libraries, taxonomy) into PostgreSQL.

Each file is streamed into a staging table of its release with ``COPY ... FROM STDIN``: when
every column of the header is one the schema types, the file's bytes go to the server
untouched (PostgreSQL parses and types them, and names the line of a bad value); otherwise a
streaming ``csv`` transform moves the unknown columns into ``extra`` (jsonb). Either way memory
stays at one chunk whatever the file size. Tables are staged several at a time, each on its own
connection. The staged release is then checked (duplicate keys, every foreign key, e.g. each
cell's cluster in the taxonomy) with errors naming file and lines, and published with
:func:`etl.publish.publish` in one transaction: readers see the previous release state until the
whole new one is there, a failed or killed load leaves only staging tables, which are dropped,
and loading a release again replaces its partitions instead of adding rows.
"""

from __future__ import annotations

import csv
import logging
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import psycopg
from psycopg import sql
from sqlalchemy.engine import Engine

from etl import csv_stream, db
from etl.config import env
from etl.publish import (
    STAGING_SCHEMA,
    analyze_published,
    claim_stage,
    create_staging_table,
    fail_stage,
    index_staging_table,
    publish,
    set_stage,
    stage_lock,
    staged_table,
)

log = logging.getLogger(__name__)

# Publication order: the tables a foreign key references come before the ones referencing them.
METADATA_TABLES = ["cluster_annotation_term_set", "cluster_annotation_term", "cluster", "cluster_membership",
                   "gene", "donor", "library", "cell", "cell_cluster_membership", "cell_embedding", "value_set"]
# Derived from the staged cells and published with the metadata: cells per dataset and cluster, so that
# counts per class or cluster read thousands of rows, not millions of cells (etl/sql/013).
CELL_COUNT_TABLE = "cluster_cell_count"
PUBLISHED_TABLES = [*METADATA_TABLES, CELL_COUNT_TABLE]
# Manifest tag (file stem) -> table.
TABLE_OF_TAG = {
    "cell_metadata": "cell",
    "gene": "gene",
    "donor": "donor",
    "library": "library",
    "cluster": "cluster",
    "cluster_annotation_term_set": "cluster_annotation_term_set",
    "cluster_annotation_term": "cluster_annotation_term",
    "cluster_to_cluster_annotation_membership": "cluster_membership",
    "cell_to_cluster_membership": "cell_cluster_membership",
    "value_sets": "value_set",
}
# cell_2d_embedding_coordinates and <neighborhood>_cell_2d_embedding_coordinates: one table, the stem as a column.
EMBEDDING_SUFFIX = "cell_2d_embedding_coordinates"
STEM_COLUMN = {"cell_embedding": "embedding"}
# Header names that differ from the column they fill.
RENAMED_COLUMNS = {"cluster_annotation_term_set": {"order": "term_set_order"},
                   "value_set": {"table": "table_name", "order": "value_order"}}
SKIPPED_TAGS = {
    "cluster_to_cluster_annotation_membership_pivoted":
        "derivable: abc.cluster_taxonomy pivots abc.cluster_membership",
    "cluster_to_cluster_annotation_membership_color":
        "derivable: abc.cluster_taxonomy carries each level's color_hex_triplet",
    "example_gene_expression": "derivable: a few genes' expression per cell, from the expression matrices",
}
BOOKKEEPING_COLUMNS = ("release", "dataset", "extra")
MAX_REPORTED = 10
COPY_CONTEXT_RE = re.compile(r"line (\d+)(?:, column ([^:]+))?")


class LoadError(RuntimeError):
    """The release could not be loaded; the message names the file, lines and problem."""


@dataclass(frozen=True)
class MetadataFile:
    relative_path: str
    path: Path
    dataset: str
    tag: str
    table: str | None
    note: str | None = None


@dataclass
class FileLoad:
    file: MetadataFile
    rows: int = 0
    unknown_columns: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class LoadReport:
    release: str
    published: bool = False
    loaded: list[FileLoad] = field(default_factory=list)
    ignored: list[MetadataFile] = field(default_factory=list)
    table_rows: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"{f.file.relative_path} -> abc.{f.file.table}: {f.rows} rows in {f.seconds:.1f} s"
               + (f"; unknown columns kept in extra: {', '.join(f.unknown_columns)}" if f.unknown_columns else "")
               for f in self.loaded]
        out += [f"{f.relative_path}: not loaded ({f.note})" for f in self.ignored]
        out += [f"abc.{t}: {n} rows in release {self.release}" for t, n in self.table_rows.items()]
        out.append(f"release {self.release} " + ("published" if self.published else "staged in abc_staging"))
        return out


def classify(files: dict[str, Path]) -> list[MetadataFile]:
    """Recognise each ``metadata/<dataset>/<version>/[<sub>/]<name>`` file by its stem."""
    found = []
    for relative_path, path in sorted(files.items()):
        parts = PurePosixPath(relative_path).parts
        if len(parts) < 4 or parts[0] != "metadata":
            continue
        name = PurePosixPath(relative_path)
        dataset, tag = parts[1], name.stem
        if name.suffix != ".csv":
            found.append(MetadataFile(relative_path, path, dataset, tag, None, f"not a CSV ({name.suffix})"))
        elif tag in SKIPPED_TAGS:
            found.append(MetadataFile(relative_path, path, dataset, tag, None, SKIPPED_TAGS[tag]))
        elif tag in TABLE_OF_TAG:
            found.append(MetadataFile(relative_path, path, dataset, tag, TABLE_OF_TAG[tag]))
        elif tag.endswith(EMBEDDING_SUFFIX):
            found.append(MetadataFile(relative_path, path, dataset, tag, "cell_embedding"))
        else:
            found.append(MetadataFile(relative_path, path, dataset, tag, None, "no table for this file yet"))
    return found


def typed_columns(conn: psycopg.Connection, table: str) -> list[str]:
    """The columns of ``abc.<table>`` a file can fill, from the catalog (the SQL is the one source)."""
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum", (f"abc.{table}",)).fetchall()
    return [name for (name,) in rows if name not in BOOKKEEPING_COLUMNS and name != STEM_COLUMN.get(table)]


def _copy_statement(target: sql.Identifier, columns: list[str]) -> sql.Composed:
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv, HEADER true, FREEZE true, FORCE_NULL ({}))").format(
        target, names, names)


def _copy_file(conn: psycopg.Connection, release: str, file: MetadataFile, known: list[str]) -> FileLoad:
    try:
        header = csv_stream.read_header(file.path)
    except csv_stream.CsvFormatError as exc:
        raise LoadError(str(exc)) from None
    renames = RENAMED_COLUMNS.get(file.table, {})
    columns = [renames.get(name, name) for name in header]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise LoadError(f"{file.relative_path}: line 1: column(s) {', '.join(repeated)} appear more than once")
    keep = [i for i, c in enumerate(columns) if c in known]
    unknown = [(i, header[i]) for i, c in enumerate(columns) if c not in known]
    target = staged_table(file.table, release)
    conn.execute(sql.SQL("ALTER TABLE {} ").format(target) + sql.SQL(", ").join(
        sql.SQL("ALTER COLUMN {} SET DEFAULT {}").format(sql.Identifier(column), sql.Literal(value))
        for column, value in _file_constants(release, file).items()))
    if unknown:
        statement = _copy_statement(target, [columns[i] for i in keep] + ["extra"])
        chunks = csv_stream.transformed_chunks(file.path, file.relative_path, keep, unknown)
    else:
        statement, chunks = _copy_statement(target, columns), csv_stream.raw_chunks(file.path)
    started = time.perf_counter()
    try:
        with conn.cursor() as cursor:
            with cursor.copy(statement) as copy:
                for chunk in chunks:
                    copy.write(chunk)
            rows = cursor.rowcount
    except psycopg.Error as exc:
        raise LoadError(f"{file.relative_path}: {_describe_copy_error(exc)}") from None
    except csv_stream.CsvFormatError as exc:
        raise LoadError(str(exc)) from None
    if unknown:
        log.warning("%s: columns not in abc.%s kept in extra: %s", file.relative_path, file.table,
                    ", ".join(name for _, name in unknown))
    return FileLoad(file, rows, [name for _, name in unknown], time.perf_counter() - started)


def _file_constants(release: str, file: MetadataFile) -> dict[str, str]:
    """Columns every row of the file shares, filled as column defaults during its COPY."""
    constants = {"release": release, "dataset": file.dataset}
    if file.table in STEM_COLUMN:
        constants[STEM_COLUMN[file.table]] = file.tag
    return constants


def _describe_copy_error(exc: psycopg.Error) -> str:
    diag = exc.diag
    where = COPY_CONTEXT_RE.search(diag.context or "")
    location = f"line {where.group(1)}" + (f", column {where.group(2)}" if where.group(2) else "") if where else ""
    problem = diag.message_primary or str(exc)
    return f"{location}: {problem}" if location else problem


def find_lines(file: MetadataFile, columns: list[str], values: set[tuple[str, ...]],
               limit: int = MAX_REPORTED) -> list[int]:
    """Lines of ``file`` (1 = header) whose ``columns`` hold one of ``values``: for error messages."""
    renames = {v: k for k, v in RENAMED_COLUMNS.get(file.table, {}).items()}
    with open(file.path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        names = [renames.get(c, c) for c in columns]
        if not set(names) <= set(header):
            return []
        indexes = [header.index(name) for name in names]
        found = []
        for row in reader:
            if len(row) == len(header) and tuple(row[i].strip() for i in indexes) in values:
                found.append(reader.line_num)
                if len(found) >= limit:
                    break
    return found


def _locate(files: list[MetadataFile], columns: list[str], values: set[tuple[str, ...]]) -> str:
    places = []
    for file in files:
        lines = find_lines(file, columns, values)
        if lines:
            places.append(f"{file.relative_path} line(s) {', '.join(map(str, lines))}")
    return "; ".join(places) or "(rows not found again in the files)"


def _text_tuples(conn: psycopg.Connection, query: sql.Composable) -> set[tuple[str, ...]]:
    return {tuple(row) for row in conn.execute(query).fetchall()}


def _describe_values(columns: list[str], values: set[tuple[str, ...]]) -> str:
    return ", ".join(f"({', '.join(columns)})=({', '.join(v)})" for v in sorted(values))


def _key_columns(conn: psycopg.Connection, table: str) -> list[str]:
    row = conn.execute(
        "SELECT array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i) "
        "JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i) "
        "FROM pg_constraint k WHERE k.conrelid = %s::regclass AND k.contype = 'p'", (f"abc.{table}",)).fetchone()
    return [c for c in row[0] if c != "release"]


def _index_or_report_duplicates(conn: psycopg.Connection, table: str, release: str,
                                files: list[MetadataFile]) -> None:
    """Build keys and indexes; on a duplicate key, name the files and lines holding it."""
    try:
        with conn.transaction():
            index_staging_table(conn, table, release)
    except psycopg.errors.UniqueViolation:
        key = [c for c in _key_columns(conn, table) if c not in ("dataset", STEM_COLUMN.get(table))]
        names = sql.SQL(", ").join(map(sql.Identifier, key))
        values = _text_tuples(conn, sql.SQL(
            "SELECT {} FROM {} GROUP BY {} HAVING count(*) > 1 ORDER BY 1 LIMIT {}").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in key),
            staged_table(table, release), names, sql.Literal(MAX_REPORTED)))
        raise LoadError(f"abc.{table}: duplicate key {_describe_values(key, values)} at "
                        f"{_locate(files, key, values)}") from None


def _foreign_keys(conn: psycopg.Connection, table: str) -> list[tuple[str, list[str], list[str]]]:
    rows = conn.execute(
        "SELECT k.confrelid::regclass::text, "
        "array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i) JOIN pg_attribute a "
        "      ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i), "
        "array(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, i) JOIN pg_attribute a "
        "      ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.i) "
        "FROM pg_constraint k WHERE k.conrelid = %s::regclass AND k.contype = 'f' ORDER BY k.conname",
        (f"abc.{table}",)).fetchall()
    return [(ref.removeprefix("abc."), cols, ref_cols) for ref, cols, ref_cols in rows]


def _check_references(conn: psycopg.Connection, table: str, release: str,
                      files: dict[str, list[MetadataFile]]) -> None:
    """Every foreign key of ``abc.<table>`` holds within the staged release (e.g. cell -> cluster)."""
    for ref, columns, ref_columns in _foreign_keys(conn, table):
        if ref not in METADATA_TABLES:
            continue
        shown = [c for c in columns if c != "release"]
        match = sql.SQL(" AND ").join(
            sql.SQL("r.{} = s.{}").format(sql.Identifier(rc), sql.Identifier(c))
            for c, rc in zip(columns, ref_columns, strict=True))
        present = sql.SQL(" AND ").join(sql.SQL("s.{} IS NOT NULL").format(sql.Identifier(c)) for c in columns)
        missing = _text_tuples(conn, sql.SQL(
            "SELECT DISTINCT {} FROM {} s WHERE {} AND NOT EXISTS (SELECT 1 FROM {} r WHERE {}) "
            "ORDER BY 1 LIMIT {}").format(
            sql.SQL(", ").join(sql.SQL("s.{}::text").format(sql.Identifier(c)) for c in shown),
            staged_table(table, release), present, staged_table(ref, release), match, sql.Literal(MAX_REPORTED)))
        if missing:
            raise LoadError(
                f"abc.{table}: {_describe_values(shown, missing)} not in abc.{ref} of release {release}, at "
                f"{_locate(files.get(table, []), shown, missing)}")


def _release_status(conn: psycopg.Connection, release: str) -> str:
    row = conn.execute("SELECT status FROM abc.release WHERE version = %s FOR UPDATE", (release,)).fetchone()
    if row is None:
        raise LoadError(f"release {release} is not recorded in abc.release; run `abc-mirror discover` first")
    return row[0]


def _mark_failed(engine: Engine, release: str, error: str) -> None:
    """Record the failure; a release that is already published stays published (its old state is intact)."""
    with db.copy_connection(engine.url) as conn:
        conn.execute("UPDATE abc.release SET last_error = %s, "
                     "status = CASE WHEN status = 'published' THEN status ELSE 'failed' END "
                     "WHERE version = %s", (error, release))


def _record_files(conn: psycopg.Connection, release: str, report: LoadReport) -> None:
    conn.execute("DELETE FROM abc.metadata_file WHERE release = %s", (release,))
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO abc.metadata_file (release, relative_path, dataset, table_name, row_count, "
            "unknown_columns, note) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [(release, x.file.relative_path, x.file.dataset, x.file.table, x.rows, x.unknown_columns, None)
             for x in report.loaded]
            + [(release, f.relative_path, f.dataset, None, None, [], f.note) for f in report.ignored])


def load_release_metadata(
    engine: Engine,
    release: str,
    files: dict[str, Path],
    datasets: list[str] | None = None,
    publish_now: bool = True,
) -> LoadReport:
    """Load the metadata ``files`` (relative path in the bucket -> local verified copy) of ``release``.

    With ``datasets``, only those datasets' files are read; the other datasets' rows of the
    release already published are carried over, so the release is always published whole.
    With ``publish_now`` False the release stays in ``abc_staging`` (status 'loaded') for a
    later stage to publish together with its own tables.
    """
    classified = [f for f in classify(files) if not datasets or f.dataset in datasets]
    report = LoadReport(release, ignored=[f for f in classified if f.table is None])
    to_load = [f for f in classified if f.table is not None]
    if not to_load:
        raise LoadError(f"release {release}: no metadata file to load among {len(files)} given")
    by_table: dict[str, list[MetadataFile]] = defaultdict(list)
    for f in to_load:
        by_table[f.table].append(f)

    with db.copy_connection(engine.url) as conn, stage_lock(conn, release):
        claim_stage(conn, release, new=True)
        if _release_status(conn, release) != "published":
            conn.execute("UPDATE abc.release SET status = 'loading', last_error = NULL WHERE version = %s", (release,))
        conn.commit()
        try:
            _stage_and_publish(engine, conn, release, datasets, by_table, report, publish_now)
        except (LoadError, psycopg.Error) as exc:
            if conn.broken:  # the server ended the session (a restart): the transaction and the stage lock with it
                raise
            conn.rollback()
            fail_stage(conn, release, str(exc))
            _mark_failed(engine, release, str(exc))
            raise
        if report.published:
            analyze_published(conn, PUBLISHED_TABLES)
    for line in report.lines():
        log.info("%s", line)
    return report


def _stage_and_publish(engine: Engine, conn: psycopg.Connection, release: str, datasets: list[str] | None,
                       by_table: dict[str, list[MetadataFile]], report: LoadReport, publish_now: bool) -> None:
    """Stage every table (:func:`_stage_tables`), then in one transaction check the references across
    them and publish (or commit the staged release)."""
    loads = _stage_tables(engine, conn, release, datasets, by_table, report)
    for table in METADATA_TABLES:
        _check_references(conn, table, release, by_table)
    report.table_rows[CELL_COUNT_TABLE] = _stage_cell_counts(conn, release)
    report.loaded = [x for table in METADATA_TABLES for x in loads[table]]
    _record_files(conn, release, report)
    if publish_now:
        publish(conn, release, PUBLISHED_TABLES)
        conn.execute("UPDATE abc.release SET status = 'published', loaded_at = now(), published_at = now(), "
                     "last_error = NULL WHERE version = %s", (release,))
        set_stage(conn, release, "published")
    else:
        set_stage(conn, release, "staged")
        conn.execute("UPDATE abc.release SET loaded_at = now(), last_error = NULL, "
                     "status = CASE WHEN status = 'published' THEN status ELSE 'loaded' END WHERE version = %s",
                     (release,))
    conn.commit()
    report.published = publish_now


def _stage_tables(engine: Engine, conn: psycopg.Connection, release: str, datasets: list[str] | None,
                  by_table: dict[str, list[MetadataFile]], report: LoadReport) -> dict[str, list[FileLoad]]:
    """Stage the tables ``ABC_LOAD_CONNECTIONS`` at a time, the largest inputs first, each table in its own
    transaction on its own connection: one COPY or index build keeps one server core busy, and staging
    needs no single transaction (publication is the atomic step; a failed stage's tables are dropped).

    Measured at 7.65 M cells (benchmarks/RESULTS.md, "Staging tables in parallel"). On the first error
    the statements still running are cancelled and that error is raised.
    """
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(STAGING_SCHEMA)))
    conn.commit()
    order = sorted(METADATA_TABLES, key=lambda t: -sum(f.path.stat().st_size for f in by_table.get(t, [])))
    loads: dict[str, list[FileLoad]] = {}
    connections: list[psycopg.Connection] = []
    claimed = threading.local()
    failed = threading.Event()

    def stage(table: str) -> tuple[str, list[FileLoad], int]:
        if failed.is_set():
            raise _Cancelled()
        if not hasattr(claimed, "conn"):
            claimed.conn = db.copy_connection(engine.url)
            connections.append(claimed.conn)
        with claimed.conn.transaction():
            return (table, *_stage_table(claimed.conn, release, table, by_table.get(table, []), datasets))

    workers = max(1, int(env("ABC_LOAD_CONNECTIONS")))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix=f"stage-{release}") as pool:
            pending = [pool.submit(stage, table) for table in order]
            try:
                for future in as_completed(pending):
                    table, loads[table], report.table_rows[table] = future.result()
            except BaseException:
                failed.set()
                for other in connections:
                    other.cancel_safe()
                raise
    finally:
        for other in connections:
            other.close()
    report.table_rows = {t: report.table_rows[t] for t in METADATA_TABLES}
    return loads


class _Cancelled(Exception):
    """A table not started because another one failed."""


def _stage_table(conn: psycopg.Connection, release: str, table: str, files: list[MetadataFile],
                 datasets: list[str] | None) -> tuple[list[FileLoad], int]:
    """COPY one table's files into its staging table, carry over the other datasets' rows of a partial
    load, build its keys and indexes, ANALYZE it. Returns the loads and the rows staged."""
    conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
    target = create_staging_table(conn, table, release)
    known = typed_columns(conn, table)
    loads = [_copy_file(conn, release, file, known) for file in files]
    if files:
        conn.execute(sql.SQL("ALTER TABLE {} ").format(target) + sql.SQL(", ").join(
            sql.SQL("ALTER COLUMN {} DROP DEFAULT").format(sql.Identifier(column))
            for column in _file_constants(release, files[0])))
    carried = 0
    if datasets:
        carried = conn.execute(sql.SQL(
            "INSERT INTO {} SELECT * FROM {} WHERE release = %s AND dataset <> ALL(%s)").format(
            target, sql.Identifier("abc", table)), (release, datasets)).rowcount
    _index_or_report_duplicates(conn, table, release, files)
    conn.execute(sql.SQL("ANALYZE {}").format(target))
    # COPY counts the rows it stores, per file (kept in abc.metadata_file, which the quality check
    # row_counts_match_files compares with the published tables): no count(*) of the staged table.
    return loads, carried + sum(x.rows for x in loads)


def _stage_cell_counts(conn: psycopg.Connection, release: str) -> int:
    """Stage abc.cluster_cell_count from the staged cells (a cell's own cluster or its membership row)."""
    target = create_staging_table(conn, CELL_COUNT_TABLE, release)
    rows = conn.execute(sql.SQL(
        "INSERT INTO {} (release, dataset, cluster_alias, n_cells) "
        "SELECT c.release, c.dataset, coalesce(c.cluster_alias, m.cluster_alias), count(*) "
        "FROM {} c LEFT JOIN {} m ON m.cell_label = c.cell_label GROUP BY 1, 2, 3").format(
        target, staged_table("cell", release), staged_table("cell_cluster_membership", release))).rowcount
    index_staging_table(conn, CELL_COUNT_TABLE, release)
    conn.execute(sql.SQL("ANALYZE {}").format(target))
    return rows


def publish_staged_metadata(conn: psycopg.Connection, release: str) -> None:
    """Publish a release staged with ``publish_now=False``; call inside ``conn.transaction()``, and
    :func:`etl.publish.analyze_published` with :data:`PUBLISHED_TABLES` after it commits."""
    publish(conn, release, PUBLISHED_TABLES)
    conn.execute("UPDATE abc.release SET status = 'published', published_at = now(), last_error = NULL "
                 "WHERE version = %s", (release,))
