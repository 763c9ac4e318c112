"""The warehouse side of aggregation: a dataset's merged statistics staged as PostgreSQL arrays
(binary COPY), the other datasets of the release carried over, the expression tables published.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import scipy.sparse as sp
from psycopg import sql

from etl.aggregate.stats import GROUPINGS, AggregationError, ClusterTaxonomy, GroupStats, dataset_stats, load_partial
from etl.publish import (
    EXPRESSION_TABLES,
    analyze_published,
    claim_stage,
    create_staging_table,
    index_staging_table,
    publish,
    set_stage,
    stage_lock,
    staged_or_published,
)

log = logging.getLogger(__name__)

# --- binary COPY of array rows ----------------------------------------------------------------

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
INT4, FLOAT8 = 23, 701


def array_field(values: np.ndarray, oid: int) -> bytes:
    """One int4[]/float8[] value in PostgreSQL's binary array format."""
    if len(values) == 0:
        body = struct.pack(">iii", 0, 0, oid)
    else:
        kind = ">i4" if oid == INT4 else ">f8"
        elements = np.empty(len(values), dtype=[("length", ">i4"), ("value", kind)])
        elements["length"] = elements.dtype["value"].itemsize
        elements["value"] = values
        body = struct.pack(">iiiii", 1, 0, oid, len(values), 1) + elements.tobytes()
    return struct.pack(">i", len(body)) + body


def text_field(value: str) -> bytes:
    """One text value (UTF-8) in COPY's binary format."""
    encoded = value.encode()
    return struct.pack(">i", len(encoded)) + encoded


def int_field(value: int) -> bytes:
    """One int4 value in COPY's binary format."""
    return struct.pack(">ii", 4, value)


@contextmanager
def binary_copy(conn: psycopg.Connection, table: sql.Identifier,
                columns: Sequence[str]) -> Iterator[Callable[..., None]]:
    """COPY ... FROM STDIN (FORMAT BINARY) into ``table``; yields ``row(*encoded_fields)``."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        table, sql.SQL(", ").join(map(sql.Identifier, columns)))
    field_count = struct.pack(">h", len(columns))
    buffer = bytearray(_COPY_HEADER)
    with conn.cursor() as cursor, cursor.copy(statement) as copy:
        def row(*fields: bytes) -> None:
            buffer.extend(field_count)
            for field in fields:
                buffer.extend(field)
            if len(buffer) > 1 << 23:
                copy.write(buffer)
                buffer.clear()

        yield row
        buffer.extend(struct.pack(">h", -1))
        copy.write(buffer)


# --- staging and publication of the expression tables -------------------------------------------

def _stage_grouping(conn: psycopg.Connection, release: str, dataset: str, stats: GroupStats,
                    names: Mapping[str, str], staged: Mapping[str, sql.Identifier]) -> int:
    """Copy one grouping into the staging tables: its groups, group-major and gene-major arrays."""
    head = (text_field(release), text_field(dataset), text_field(stats.grouping))
    groups = stats.groups
    with conn.cursor().copy(sql.SQL(
            "COPY {} (release, dataset, grouping, group_index, group_label, group_name, "
            "region_of_interest_acronym, n_cells) FROM STDIN").format(staged["expression_group"])) as copy:
        for index, row in enumerate(groups.itertuples(index=False)):
            copy.write_row((release, dataset, stats.grouping, index, row.group_label,
                            names.get(row.group_label, row.group_label), row.region_of_interest_acronym,
                            int(row.n_cells)))
    columns = ["release", "dataset", "grouping"]
    n_nonzero, total, total_sq = stats.n_nonzero, stats.sum, stats.sum_sq
    with binary_copy(conn, staged["expression_group_major"],
                     [*columns, "group_index", "gene_index", "n_nonzero", "sum", "sum_sq"]) as row:
        for group in range(len(groups)):
            lo, hi = stats.indptr[group], stats.indptr[group + 1]
            if hi > lo:
                row(*head, int_field(group), array_field(stats.indices[lo:hi], INT4),
                    array_field(n_nonzero[lo:hi], INT4), array_field(total[lo:hi], FLOAT8),
                    array_field(total_sq[lo:hi], FLOAT8))
    order = sp.csr_matrix((np.arange(stats.n_pairs, dtype=np.int64), stats.indices, stats.indptr),
                          shape=(len(groups), len(stats.genes))).tocsc()
    order.sort_indices()
    with binary_copy(conn, staged["expression_gene_major"],
                     [*columns, "gene_index", "group_index", "n_nonzero", "sum", "sum_sq"]) as row:
        for gene in range(len(stats.genes)):
            lo, hi = order.indptr[gene], order.indptr[gene + 1]
            if hi > lo:
                pick = order.data[lo:hi]
                row(*head, int_field(gene), array_field(order.indices[lo:hi], INT4),
                    array_field(n_nonzero[pick], INT4), array_field(total[pick], FLOAT8),
                    array_field(total_sq[pick], FLOAT8))
    return stats.n_pairs


def _stage_genes(conn: psycopg.Connection, release: str, dataset: str, genes: pd.DataFrame,
                 table: sql.Identifier) -> None:
    with conn.cursor().copy(sql.SQL(
            "COPY {} (release, dataset, gene_index, gene_identifier, gene_symbol) FROM STDIN").format(table)) as copy:
        for index, row in enumerate(genes.itertuples(index=False)):
            copy.write_row((release, dataset, index, row.gene_identifier, row.gene_symbol))


def merge_and_publish(conn: psycopg.Connection, release: str, partials: Mapping[str, Sequence[Path]],
                      taxonomy: pd.DataFrame | ClusterTaxonomy, groupings: Sequence[str] = GROUPINGS) -> dict[str, int]:
    """:func:`merge_and_stage`, then publish the staged expression tables in one transaction."""
    with stage_lock(conn, release):
        entries = merge_and_stage(conn, release, partials, taxonomy, groupings)
        with conn.transaction():
            publish(conn, release, EXPRESSION_TABLES)
            set_stage(conn, release, "published")
        analyze_published(conn, EXPRESSION_TABLES)
    return entries


def merge_and_stage(conn: psycopg.Connection, release: str, partials: Mapping[str, Sequence[Path]],
                    taxonomy: pd.DataFrame | ClusterTaxonomy, groupings: Sequence[str] = GROUPINGS) -> dict[str, int]:
    """Merge each dataset's file partials, roll up, and stage (committed, indexed) the release's expression tables.

    ``partials`` maps a metadata dataset to its files' partial paths. Datasets of the release
    already published and not named here are carried over unchanged, so aggregating one dataset
    again replaces only that dataset. Nothing is visible to readers until the staged tables are
    published, by :func:`merge_and_publish` or with the metadata by ``etl.pipeline.publish_release``.
    Returns the number of (group, gene) entries per dataset.

    Runs under the release's stage lock, in this run's stage (``etl.publish.claim_stage``): another
    run staging the release makes it wait, then fail naming that run. A failure rolls back what
    this merge staged and keeps the rest of the stage (the staged metadata), so a retry can merge.
    """
    with stage_lock(conn, release):
        claim_stage(conn, release)
        try:
            entries = _merge_and_stage(conn, release, partials, taxonomy, groupings)
            set_stage(conn, release, "staged")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    return entries


def _merge_and_stage(conn: psycopg.Connection, release: str, partials: Mapping[str, Sequence[Path]],
                     taxonomy: pd.DataFrame | ClusterTaxonomy, groupings: Sequence[str]) -> dict[str, int]:
    tax = taxonomy if isinstance(taxonomy, ClusterTaxonomy) else ClusterTaxonomy(taxonomy)
    staged = {table: create_staging_table(conn, table, release) for table in EXPRESSION_TABLES}
    for table, index_column in (("expression_gene_major", "group_index"), ("expression_group_major", "gene_index")):
        for column in ("sum", "sum_sq"):  # float arrays do not compress: store them out of line, as is
            conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STORAGE EXTERNAL").format(
                staged[table], sql.Identifier(column)))
        # No statistics of the arrays, as on the parent (etl/sql/013): no query filters on them, and
        # sampling them reads them whole (67 s for a full release's gene-major arrays).
        conn.execute(sql.SQL("ALTER TABLE {} ").format(staged[table]) + sql.SQL(", ").join(
            sql.SQL("ALTER COLUMN {} SET STATISTICS 0").format(sql.Identifier(column))
            for column in (index_column, "n_nonzero", "sum", "sum_sq")))
    entries: dict[str, int] = {}
    for dataset, paths in partials.items():
        loaded = [load_partial(Path(p)) for p in paths]
        if not loaded:
            raise AggregationError(f"dataset {dataset}: no partial results to merge")
        genes = None
        entries[dataset] = 0
        for stats in dataset_stats(loaded, tax, groupings):
            if genes is None:
                genes = stats.genes
                _stage_genes(conn, release, dataset, genes, staged["expression_gene"])
            elif not stats.genes["gene_identifier"].equals(genes["gene_identifier"]):
                raise AggregationError(f"dataset {dataset}: groupings disagree on the gene list")
            entries[dataset] += _stage_grouping(conn, release, dataset, stats, tax.names, staged)
            log.info("staged %s %s: %d groups, %d entries", dataset, stats.grouping, len(stats.groups),
                     stats.n_pairs)
        with conn.cursor().copy(sql.SQL(
                "COPY {} (release, dataset, source, normalization, n_cells_in_file, n_cells_aggregated) "
                "FROM STDIN").format(staged["expression_file"])) as copy:
            for file_stats in loaded:
                copy.write_row((release, dataset, file_stats.source, file_stats.normalization,
                                file_stats.n_cells_in_file, file_stats.n_cells_aggregated))
    _carry_over(conn, release, list(partials), staged)
    for table in EXPRESSION_TABLES:
        index_staging_table(conn, table, release)
        conn.execute(sql.SQL("ANALYZE {}").format(staged[table]))  # checks and readers plan on its statistics
    return entries


def _carry_over(conn: psycopg.Connection, release: str, replaced: list[str],
                staged: Mapping[str, sql.Identifier]) -> None:
    """Copy the published rows of the release's other datasets into staging."""
    for table, target in staged.items():
        conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE release = %s AND dataset <> ALL(%s)").format(
            target, sql.Identifier("abc", table)), (release, replaced))


def release_taxonomy(conn: psycopg.Connection, release: str) -> pd.DataFrame:
    """The release's cluster membership, as loaded by the metadata stage."""
    columns = ["cluster_alias", "cluster_annotation_term_set_name", "cluster_annotation_term_label",
               "cluster_annotation_term_name"]
    rows = conn.execute(sql.SQL("SELECT {} FROM {} WHERE release = %s").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), staged_or_published(conn, "cluster_membership", release)),
        (release,)).fetchall()
    if not rows:
        raise AggregationError(f"release {release}: no taxonomy loaded; load the release's metadata first")
    return pd.DataFrame(rows, columns=columns)
