"""The quality gate: data checks of a loaded release (staged or published), stored per release in
``abc.quality_check``; :func:`require_passing` is what a publish step calls to refuse a release whose
checks failed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg import sql
from sqlalchemy.engine import Engine

from etl import db
from etl.publish import staged_or_published

log = logging.getLogger(__name__)


class QualityCheckFailed(RuntimeError):
    """A release failed data-quality checks and must not be published."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    failing: int = 0
    details: str = ""


# name -> (what it guards, SQL giving (failing count, details) over {cell}, {cluster}, ... of the release).
# Keys are not re-checked here: each staged table has its primary key (no cell_label twice in a release),
# the load checks every foreign key with errors naming file and line (etl.load), and PostgreSQL enforces
# them on the published partitions. A check repeating them could not fail, and read every cell twice:
# 3.1 s at 7.65 M cells on a quiet machine, 55 s at load 11.
CHECKS: dict[str, tuple[str, str]] = {
    "row_counts_match_files": (
        "each loaded table holds, per dataset, exactly the rows of the files loaded into it",
        """SELECT count(*), string_agg(format('abc.%%s %%s: %%s rows, files hold %%s', f.table_name, f.dataset,
                                              coalesce(t.n, 0), f.rows), '; ') FROM (
               SELECT table_name, dataset, sum(row_count) AS rows FROM abc.metadata_file
               WHERE release = %(r)s AND table_name IS NOT NULL GROUP BY table_name, dataset) f
           LEFT JOIN (SELECT 'cell' AS table_name, dataset, count(*) AS n FROM {cell} WHERE release = %(r)s
                      GROUP BY dataset
                      UNION ALL SELECT 'gene', dataset, count(*) FROM {gene} WHERE release = %(r)s GROUP BY dataset
                      UNION ALL SELECT 'cluster', dataset, count(*) FROM {cluster} WHERE release = %(r)s
                      GROUP BY dataset) t
             ON t.table_name = f.table_name AND t.dataset = f.dataset
           WHERE f.table_name IN ('cell', 'gene', 'cluster') AND coalesce(t.n, 0) <> f.rows"""),
    "gene_symbol_present": (
        "every gene has a symbol",
        """SELECT count(*), string_agg(gene_identifier, ', ') FROM (
               SELECT gene_identifier FROM {gene} WHERE release = %(r)s AND coalesce(btrim(gene_symbol), '') = ''
               ORDER BY gene_identifier LIMIT 1000) g"""),
    "expression_cells_match_metadata": (
        "aggregated expression counts, per dataset and cluster, the cells the metadata assigns to it",
        """SELECT count(*), string_agg(format('%%s %%s: %%s aggregated, %%s in metadata',
                                              coalesce(e.dataset, m.dataset), coalesce(e.group_label, m.label),
                                              coalesce(e.n_cells, 0), coalesce(m.n, 0)), '; ') FROM
               (SELECT dataset, group_label, n_cells FROM {expression_group}
                WHERE release = %(r)s AND grouping = 'cluster') e
           FULL JOIN (SELECT x.dataset, t.cluster_annotation_term_label AS label, sum(x.n)::bigint AS n
                      FROM (SELECT c.dataset, coalesce(c.cluster_alias, a.cluster_alias) AS cluster_alias,
                                   count(*) AS n
                            FROM {cell} c LEFT JOIN {cell_cluster_membership} a
                                 ON a.release = c.release AND a.cell_label = c.cell_label
                            WHERE c.release = %(r)s
                              AND c.dataset IN (SELECT dataset FROM {expression_group} WHERE release = %(r)s)
                            GROUP BY 1, 2) x
                      JOIN {cluster_membership} t ON t.release = %(r)s AND t.cluster_alias = x.cluster_alias
                           AND t.cluster_annotation_term_set_name = 'cluster'
                      GROUP BY 1, 2) m
             ON m.dataset = e.dataset AND m.label = e.group_label
           WHERE coalesce(e.n_cells, 0) <> coalesce(m.n, 0)"""),
}


CHECKED_TABLES = ["cell", "cell_cluster_membership", "gene", "cluster", "cluster_membership", "expression_group"]


def check_queries(conn: psycopg.Connection, release: str) -> dict[str, sql.Composed]:
    """Each check's query over ``release``'s staged or published tables; their parameter ``r`` is the release."""
    relations = {t: staged_or_published(conn, t, release) for t in CHECKED_TABLES}
    return {name: sql.SQL(query).format(**relations) for name, (_, query) in CHECKS.items()}


def run_quality_checks(engine: Engine, release: str) -> list[CheckResult]:
    """Run every check on ``release`` (its staged load when not yet published) and store the results."""
    results = []
    with db.copy_connection(engine.url) as conn:
        for name, query in check_queries(conn, release).items():
            failing, details = conn.execute(query, {"r": release}).fetchone()
            results.append(CheckResult(name, failing == 0, failing, (details or "")[:2000]))
        with conn.transaction():
            conn.execute("DELETE FROM abc.quality_check WHERE release = %s", (release,))
            with conn.cursor() as cursor:
                cursor.executemany("INSERT INTO abc.quality_check (release, name, passed, failing, details) "
                                   "VALUES (%s, %s, %s, %s, %s)",
                                   [(release, r.name, r.passed, r.failing, r.details) for r in results])
    for r in results:
        (log.info if r.passed else log.error)("release %s check %s: %s%s", release, r.name,
                                              "passed" if r.passed else f"FAILED ({r.failing})",
                                              f": {r.details}" if r.details else "")
    return results


def require_passing(results: list[CheckResult], release: str) -> None:
    """Raise :class:`QualityCheckFailed` naming the failed checks; publish steps call this first."""
    failed = [r for r in results if not r.passed]
    if failed:
        raise QualityCheckFailed(f"release {release}: " + "; ".join(
            f"{r.name} failed ({r.failing}): {r.details}" for r in failed))
