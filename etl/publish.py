"""Staging and atomic publication of per-release partitions.

Every warehouse table that holds release data is LIST-partitioned by ``release``. A stage
(metadata load, aggregation) writes a release into standalone staging tables in schema
``abc_staging``; :func:`publish` then swaps them in as the release's partitions and marks the
release published, all in one transaction. Readers therefore see either the previous state or
the whole new release, never a half-loaded one, and a failed or killed load leaves only staging
tables behind, which the next attempt drops and rebuilds.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

RELEASE_RE = re.compile(r"^[0-9]{8}$")
STAGING_SCHEMA = "abc_staging"
PARTITION_SCHEMA = "abc_part"
# The aggregation stage's tables, here so that publishing needs no numerical stack.
EXPRESSION_TABLES = ["expression_gene", "expression_group", "expression_gene_major", "expression_group_major",
                     "expression_file"]


def _check_release(release: str) -> str:
    if not RELEASE_RE.match(release):
        raise ValueError(f"release {release!r} is not YYYYMMDD")
    return release


def staging_name(table: str, release: str) -> str:
    return f"{table}_r{_check_release(release)}"


def staged_table(table: str, release: str) -> sql.Identifier:
    """``abc_staging.<table>_r<release>``: where a stage writes ``release`` before publication."""
    return sql.Identifier(STAGING_SCHEMA, staging_name(table, release))


def is_staged(conn: psycopg.Connection, table: str, release: str) -> bool:
    """Whether a stage has written ``table`` of ``release`` and it is not published yet."""
    name = f"{STAGING_SCHEMA}.{staging_name(table, release)}"
    return conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is not None


def staged_or_published(conn: psycopg.Connection, table: str, release: str) -> sql.Identifier:
    """The release's staging table while it is not yet published, else the published table: so that
    checks, diffs and the next stage read what the last stage wrote, published or not."""
    return staged_table(table, release) if is_staged(conn, table, release) else sql.Identifier("abc", table)


def create_staging_table(conn: psycopg.Connection, table: str, release: str) -> sql.Identifier:
    """(Re)create an empty staging table shaped like ``abc.<table>`` for one release.

    The CHECK constraint on ``release`` lets ATTACH PARTITION skip its validation scan.
    """
    name = staging_name(table, release)
    target = sql.Identifier(STAGING_SCHEMA, name)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(STAGING_SCHEMA)))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target))
    conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
        target, sql.Identifier("abc", table)))
    conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (release = {})").format(
        target, sql.Identifier(f"{name}_release_check"), sql.Literal(release)))
    return target


def index_staging_table(conn: psycopg.Connection, table: str, release: str) -> None:
    """Build, after the bulk load, the keys and indexes ``abc.<table>`` has, so ATTACH reuses them.

    Loading first and indexing once afterwards is much faster than maintaining indexes row by row.
    """
    name = staging_name(table, release)
    staged = sql.Identifier(STAGING_SCHEMA, name)
    parent = f"abc.{table}"
    keys = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype IN ('p', 'u')", (parent,)).fetchall()
    for constraint, definition in keys:
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(
            staged, sql.Identifier(f"{name}_{constraint}"[:63])) + sql.SQL(definition))
    indexes = conn.execute(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = %s::regclass "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)", (parent,)).fetchall()
    for index_name, definition in indexes:
        on_parent = f"ON ONLY {parent} "
        if on_parent not in definition:
            raise RuntimeError(f"unexpected index definition on {parent}: {definition}")
        head, tail = definition.split(on_parent, 1)
        unique = "UNIQUE " if head.startswith("CREATE UNIQUE") else ""
        conn.execute(sql.SQL("CREATE {}INDEX {} ON {} ").format(
            sql.SQL(unique), sql.Identifier(f"{name}_{index_name}"[:63]), staged) + sql.SQL(tail))


def publish(conn: psycopg.Connection, release: str, tables: list[str]) -> None:
    """Swap the staged tables in as ``release``'s partitions, atomically.

    Run inside one transaction (psycopg's ``conn.transaction()``); an old partition of the
    same release is detached and dropped first, so publishing twice never duplicates rows.
    Tables are attached in the order given: parents of foreign keys first.
    """
    _check_release(release)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(PARTITION_SCHEMA)))
    for table in reversed(tables):
        old = sql.Identifier(PARTITION_SCHEMA, staging_name(table, release))
        exists = conn.execute("SELECT to_regclass(%s)", (f"{PARTITION_SCHEMA}.{staging_name(table, release)}",))
        if exists.fetchone()[0] is not None:
            conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(sql.Identifier("abc", table), old))
            conn.execute(sql.SQL("DROP TABLE {}").format(old))
    for table in tables:
        staged = staged_table(table, release)
        conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(staged, sql.Identifier(PARTITION_SCHEMA)))
        conn.execute(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})").format(
            sql.Identifier("abc", table), sql.Identifier(PARTITION_SCHEMA, staging_name(table, release)),
            sql.Literal(release)))


def drop_staging(conn: psycopg.Connection, release: str, tables: list[str]) -> None:
    for table in tables:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(staged_table(table, release)))
