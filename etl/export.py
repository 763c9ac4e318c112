"""Pseudobulk export: one grouping of a published release's aggregated expression, as the AnnData
(``.h5ad``) scverse tools read, or as long-format parquet.

AnnData: one obs row per (dataset, group) of the grouping (``<dataset>/<group_label>``, for
``region_subclass`` ``<dataset>/<region>/<subclass_label>``) with ``dataset``, ``n_cells`` (cells
aggregated), the region for ``region_subclass``, and the label, name and colour of every taxonomy
level the group determines (its own and the coarser ones; ``abc.cluster_taxonomy``); var the genes
of the datasets' matrices by ``gene_identifier``, with ``gene_symbol`` (the first dataset's, by name)
and one boolean column per dataset saying whether its matrices hold the gene (a gene a dataset does
not measure reads 0 in that dataset's rows). Layers ``mean`` (of log2(CPM+1), float32), ``fraction``
of cells expressing (float32) and ``n_nonzero`` (int32), sparse CSR: a (group, gene) pair with no
expressing cell is not stored, as in the warehouse, and reads 0. X is left empty, as scanpy's
``sc.get.aggregate`` leaves it. uns: ``release``, ``data_release`` (where its rows are: another
release when published by reference), ``grouping``, ``datasets``, ``source_files``
(``abc.expression_file``), ``lineage`` (``abc.lineage_sources`` of the grouping's view) and
``<level>_name_colors`` for scanpy's plots.

Parquet: one row per stored (dataset, group, gene) pair with the obs columns, ``gene_identifier``,
``gene_symbol``, ``mean``, ``fraction``, ``n_nonzero``; absent pairs are 0. The uns fields are the
file's key-value metadata ``abc_mirror`` (JSON).

Only published releases are exported, read from their partitions in one read-only snapshot.
Memory: obs, var and one batch of :data:`BATCH_GROUPS` groups, never the whole grouping: about 120 B
per stored pair of the batch (the arrays as read, then building the layers: 96 B at peak measured with
tracemalloc), about 100 MB for 64 groups x 32,285 genes with 40 % of the pairs present. The
group-major arrays stream through a server-side cursor in binary (decoded straight into numpy),
each batch appended to the h5ad's layers (anndata's ``sparse_dataset.append``) or written as a
parquet row group. With genes selected, only those genes' gene-major rows are read (one row per gene
and dataset) and held together: their pairs over one grouping, at most the grouping itself.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import psycopg
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.postgres import types as postgres_types
from psycopg.pq import Format

from etl.aggregate import GROUPINGS, REGION_SUBCLASS
from etl.publish import EXPRESSION_TABLES, PARTITION_SCHEMA, staging_name

FORMATS = (".h5ad", ".parquet")
LAYERS = {"mean": np.float32, "fraction": np.float32, "n_nonzero": np.int32}
BATCH_GROUPS = 64  # group-major rows per batch (about 120 B per stored pair of the batch in memory)
H5_CHUNK = 1 << 16  # elements per HDF5 chunk of the layers' resizable arrays
PARQUET_METADATA_KEY = b"abc_mirror"


class ExportError(ValueError):
    """A release, grouping, dataset, gene or output path that cannot be exported; the message names it."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    release: str
    data_release: str
    grouping: str
    n_groups: int
    n_genes: int
    n_pairs: int

    def line(self) -> str:
        shared = f" (data of {self.data_release})" if self.data_release != self.release else ""
        return (f"release {self.release}{shared}, {self.grouping}: {self.n_groups} groups x {self.n_genes} genes, "
                f"{self.n_pairs} stored pairs -> {self.path}")


class _BinaryArrayLoader(Loader):
    """A one-dimensional PostgreSQL array without NULLs, in binary, as a numpy array."""

    format = Format.BINARY
    element: np.dtype

    def load(self, data: bytes | memoryview) -> np.ndarray:
        ndim, has_null, _ = struct.unpack_from(">iii", data)
        if has_null:
            raise ExportError("an expression array holds NULL elements")
        if ndim == 0:
            return np.empty(0, self.element.newbyteorder("="))
        (length,) = struct.unpack_from(">i", data, 12)
        # After the header (ndim, flags, element oid, length, lower bound) each element is its size, then its bytes.
        items = np.frombuffer(data, np.dtype([("size", ">i4"), ("value", self.element)]), count=length, offset=20)
        return items["value"].astype(self.element.newbyteorder("="))


class _Int4ArrayLoader(_BinaryArrayLoader):
    element = np.dtype(">i4")


class _Float8ArrayLoader(_BinaryArrayLoader):
    element = np.dtype(">f8")


def _arrays_as_numpy(cursor: psycopg.Cursor) -> None:
    cursor.adapters.register_loader(postgres_types["int4"].array_oid, _Int4ArrayLoader)
    cursor.adapters.register_loader(postgres_types["float8"].array_oid, _Float8ArrayLoader)


def _data_release(conn: psycopg.Connection, release: str) -> str:
    row = conn.execute("SELECT r.status, p.data_release FROM abc.release r "
                       "LEFT JOIN abc.published_release p ON p.release = r.version WHERE r.version = %s",
                       (release,)).fetchone()
    if row is None:
        raise ExportError(f"release {release}: unknown (not in abc.release)")
    if row[1] is None:
        raise ExportError(f"release {release}: not published (status {row[0]}); only published releases are exported")
    return row[1]


def _tables(conn: psycopg.Connection, release: str, data_release: str) -> dict[str, sql.Identifier]:
    """The published expression partitions of ``data_release``."""
    names = {table: staging_name(table, data_release) for table in EXPRESSION_TABLES}
    published = conn.execute("SELECT to_regclass(%s)", (f"{PARTITION_SCHEMA}.{names['expression_group']}",))
    if published.fetchone()[0] is None:
        raise ExportError(f"release {release}: no aggregated expression published (abc-mirror aggregate --release "
                          f"{data_release})")
    return {table: sql.Identifier(PARTITION_SCHEMA, name) for table, name in names.items()}


def _datasets(conn: psycopg.Connection, release: str, tables: dict[str, sql.Identifier],
              wanted: Sequence[str] | None) -> list[str]:
    present = [row[0] for row in conn.execute(sql.SQL("SELECT DISTINCT dataset FROM {} ORDER BY 1").format(
        tables["expression_group"]))]
    unknown = sorted(set(wanted or ()) - set(present))
    if unknown:
        raise ExportError(f"release {release}: no aggregated expression of datasets {unknown}; it has {present}")
    return [d for d in present if d in wanted] if wanted else present


def _frame(cursor: psycopg.Cursor) -> pd.DataFrame:
    return pd.DataFrame(cursor.fetchall(), columns=[c.name for c in cursor.description])


def _taxonomy(conn: psycopg.Connection, data_release: str, level: str) -> pd.DataFrame:
    """One row per term of ``level``: the ``abc.cluster_taxonomy`` columns that term determines (its own
    level's and the coarser levels'; a finer level, or a neighborhood spanning several of its terms, varies)."""
    frame = _frame(conn.execute("SELECT * FROM abc.cluster_taxonomy WHERE release = %s", (data_release,)))
    key = f"{level}_label"
    frame = frame.drop(columns=["release", "cluster_alias"])
    frame = frame[frame[key].notna()]
    determined = frame.groupby(key).nunique(dropna=False).le(1).all()
    return frame[[c for c in frame.columns if c == key or determined.get(c, False)]].drop_duplicates(key)


def _obs(conn: psycopg.Connection, tables: dict[str, sql.Identifier], data_release: str, grouping: str,
         datasets: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """obs, and the (dataset, group_index) of each of its rows (index: the obs row), in group-major order."""
    level = "subclass" if grouping == REGION_SUBCLASS else grouping
    groups = _frame(conn.execute(sql.SQL(
        "SELECT dataset, group_index, region_of_interest_acronym, group_label, group_name, n_cells FROM {} "
        "WHERE grouping = %s AND dataset = ANY(%s) ORDER BY dataset, group_index").format(tables["expression_group"]),
        (grouping, datasets)))
    label, name = f"{level}_label", f"{level}_name"
    obs = groups.rename(columns={"group_label": label, "group_name": name})
    keys = ["dataset", "region_of_interest_acronym", label] if grouping == REGION_SUBCLASS else ["dataset", label]
    taxonomy = _taxonomy(conn, data_release, level)
    obs = obs.merge(taxonomy.drop(columns=name, errors="ignore"), on=label, how="left")
    obs.index = pd.Index(obs[keys].agg("/".join, axis=1), name="group")
    obs = obs[[*keys[:-1], "n_cells", *(c for c in taxonomy.columns.union([name], sort=False) if c in obs)]]
    for column in obs.select_dtypes("object").columns:
        obs[column] = pd.Categorical(obs[column])
    return obs, groups[["dataset", "group_index"]]


def _var(conn: psycopg.Connection, tables: dict[str, sql.Identifier], release: str, datasets: list[str],
         genes: Sequence[str] | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """var (genes selected by identifier or symbol, else all), and every gene of each dataset."""
    rows = _frame(conn.execute(sql.SQL(
        "SELECT dataset, gene_index, gene_identifier, gene_symbol FROM {} WHERE dataset = ANY(%s) "
        "ORDER BY dataset, gene_index").format(tables["expression_gene"]), (datasets,)))
    var = rows.drop_duplicates("gene_identifier").set_index("gene_identifier")[["gene_symbol"]]
    for dataset in datasets:
        var[dataset] = var.index.isin(rows.loc[rows["dataset"] == dataset, "gene_identifier"])
    if genes:
        unknown = sorted(set(genes) - set(var.index) - set(var["gene_symbol"]))
        if unknown:
            raise ExportError(f"release {release}: genes {unknown} are in none of the matrices of {datasets}")
        var = var[var.index.isin(genes) | var["gene_symbol"].isin(genes)]
    return var, rows


def _lookup(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """An array indexed by a dataset's group (or gene) index: ``positions[i]`` at ``keys[i]``, -1 elsewhere."""
    lookup = np.full(int(keys.max()) + 1 if len(keys) else 0, -1, np.int64)
    lookup[keys] = positions
    return lookup


def _layers(rows: np.ndarray, columns: np.ndarray, nonzero: np.ndarray, sums: np.ndarray, n_cells: np.ndarray,
            first: int, n_rows: int, n_vars: int) -> dict[str, sp.csr_matrix]:
    """Rows ``first..first+n_rows`` of each layer from the stored pairs (obs row, var column) among them."""
    cells = n_cells[rows]
    values = {"mean": sums / cells, "fraction": nonzero / cells, "n_nonzero": nonzero}
    return {name: sp.csr_matrix((values[name].astype(dtype), (rows - first, columns)), shape=(n_rows, n_vars))
            for name, dtype in LAYERS.items()}


def _empty_layers(n_rows: int, n_vars: int) -> dict[str, sp.csr_matrix]:
    return {name: sp.csr_matrix((n_rows, n_vars), dtype=dtype) for name, dtype in LAYERS.items()}


@dataclass
class _Reading:
    """Where the stored pairs of one grouping go: obs rows and var columns by dataset."""

    tables: dict[str, sql.Identifier]
    grouping: str
    datasets: list[str]
    obs_row: dict[str, np.ndarray]  # dataset -> obs row by group_index
    var_column: dict[str, np.ndarray]  # dataset -> var column by gene_index (-1: not exported)
    n_cells: np.ndarray
    n_obs: int
    n_vars: int


def _group_major_blocks(conn: psycopg.Connection, reading: _Reading) -> Iterator[tuple[int, dict[str, sp.csr_matrix]]]:
    """(first row, layers) of consecutive obs rows, BATCH_GROUPS group-major rows at a time; every obs row once."""
    done = 0
    with conn.cursor(name="abc_export_group_major", binary=True) as cursor:
        _arrays_as_numpy(cursor)
        cursor.execute(sql.SQL("SELECT dataset, group_index, gene_index, n_nonzero, sum FROM {} "
                               "WHERE grouping = %s AND dataset = ANY(%s) ORDER BY dataset, group_index").format(
            reading.tables["expression_group_major"]), (reading.grouping, reading.datasets))
        while batch := cursor.fetchmany(BATCH_GROUPS):
            rows = np.array([reading.obs_row[dataset][group] for dataset, group, *_ in batch])
            end = int(rows[-1]) + 1
            yield done, _layers(np.repeat(rows, [len(genes) for _, _, genes, _, _ in batch]),
                                np.concatenate([reading.var_column[d][genes] for d, _, genes, _, _ in batch]),
                                np.concatenate([nonzero for *_, nonzero, _ in batch]),
                                np.concatenate([sums for *_, sums in batch]), reading.n_cells, done, end - done,
                                reading.n_vars)
            done = end
    if done < reading.n_obs:  # groups after the last stored pair (none of their genes expressed)
        yield done, _empty_layers(reading.n_obs - done, reading.n_vars)


def _gene_major_block(conn: psycopg.Connection, reading: _Reading) -> Iterator[tuple[int, dict[str, sp.csr_matrix]]]:
    """Every obs row at once from the gene-major rows of the exported genes (one row per gene and dataset)."""
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    with conn.cursor(binary=True) as cursor:
        _arrays_as_numpy(cursor)
        for dataset in reading.datasets:
            columns = reading.var_column[dataset]
            wanted = np.flatnonzero(columns >= 0).tolist()
            cursor.execute(sql.SQL("SELECT gene_index, group_index, n_nonzero, sum FROM {} "
                                   "WHERE dataset = %s AND grouping = %s AND gene_index = ANY(%s)").format(
                reading.tables["expression_gene_major"]), (dataset, reading.grouping, wanted))
            for gene, groups, nonzero, sums in cursor:
                found.append((reading.obs_row[dataset][groups], np.full(len(groups), columns[gene]), nonzero, sums))
    rows, columns, nonzero, sums = (np.concatenate([part[i] for part in found] or [np.empty(0, np.int64)])
                                    for i in range(4))
    yield 0, _layers(rows, columns, nonzero, sums, reading.n_cells, 0, reading.n_obs, reading.n_vars)


def _provenance(conn: psycopg.Connection, tables: dict[str, sql.Identifier], release: str, data_release: str,
                grouping: str, datasets: list[str]) -> dict[str, object]:
    files = _frame(conn.execute(sql.SQL(
        "SELECT dataset, source, normalization, n_cells_in_file, n_cells_aggregated FROM {} "
        "WHERE dataset = ANY(%s) ORDER BY dataset, source").format(tables["expression_file"]), (datasets,)))
    lineage = _frame(conn.execute("SELECT * FROM abc.lineage_sources(%s, %s) ORDER BY step, source_key",
                                  (f"abc.expression_by_{grouping}", release)))
    for column in lineage.select_dtypes(["object", "datetimetz"]).columns:
        lineage[column] = lineage[column].map(lambda value: "" if pd.isna(value) else str(value))
    return {"release": release, "data_release": data_release, "grouping": grouping, "datasets": datasets,
            "source_files": files, "lineage": lineage}


def _scanpy_colors(obs: pd.DataFrame) -> dict[str, list[str]]:
    """``<level>_name_colors``: each level's colour per category of its name column, as scanpy plots them."""
    colors = {}
    for color in [c for c in obs.columns if c.endswith("_color")]:
        name = color.removesuffix("_color") + "_name"
        if name in obs and obs[color].notna().all():
            of_name = obs.drop_duplicates(name).set_index(name)[color]
            colors[f"{name}_colors"] = [str(of_name[category]) for category in obs[name].cat.categories]
    return colors


def _write_h5ad(path: Path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict[str, object],
                blocks: Iterator[tuple[int, dict[str, sp.csr_matrix]]]) -> int:
    """Write obs, var and uns with anndata, then append the layers block by block; return the pairs stored."""
    ad.AnnData(obs=obs, var=var, uns={**uns, **_scanpy_colors(obs)}).write_h5ad(path)
    stored = 0
    with h5py.File(path, "a") as store:
        layers = {}
        for name, dtype in LAYERS.items():
            write_elem(store["layers"], name, sp.csr_matrix((0, len(var)), dtype=dtype),
                       dataset_kwargs={"indptr_dtype": np.int64, "chunks": (H5_CHUNK,)})
            layers[name] = sparse_dataset(store["layers"][name])
        for _, block in blocks:
            for name, matrix in block.items():
                layers[name].append(matrix)
            stored += block["mean"].nnz
    return stored


def _write_parquet(path: Path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict[str, object],
                   blocks: Iterator[tuple[int, dict[str, sp.csr_matrix]]]) -> int:
    """One row group per block of stored pairs; return the pairs written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    obs_columns = {c: pa.Array.from_pandas(obs[c].astype(object) if c != "n_cells" else obs[c])
                   for c in obs.columns}
    gene_columns = {"gene_identifier": pa.array(var.index.to_numpy(dtype=object)),
                    "gene_symbol": pa.Array.from_pandas(var["gene_symbol"])}
    metadata = {PARQUET_METADATA_KEY: json.dumps(
        {k: json.loads(v.to_json(orient="records")) if isinstance(v, pd.DataFrame) else v for k, v in uns.items()})}
    stored, writer = 0, None
    try:
        for first, block in blocks:
            mean = block["mean"]
            rows = pa.array(first + np.repeat(np.arange(mean.shape[0]), np.diff(mean.indptr)))
            columns = pa.array(mean.indices)
            table = pa.table({**{c: values.take(rows) for c, values in obs_columns.items()},
                              **{c: values.take(columns) for c, values in gene_columns.items()},
                              **{name: block[name].data for name in LAYERS}})
            writer = writer or pq.ParquetWriter(path, table.schema.with_metadata(metadata))
            if table.num_rows:
                writer.write_table(table)
                stored += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return stored


def export_expression(conn: psycopg.Connection, release: str, grouping: str, out: Path,
                      genes: Sequence[str] | None = None, datasets: Sequence[str] | None = None) -> ExportResult:
    """Write ``grouping`` of published ``release`` to ``out`` (``.h5ad`` or ``.parquet``, by its suffix),
    all genes or those named (identifier or symbol), all datasets or those named. ``conn`` must be idle:
    the export reads in a read-only snapshot of its own. The file appears whole or not at all."""
    if out.suffix not in FORMATS:
        raise ExportError(f"{out}: unknown output format {out.suffix!r}; use one of {list(FORMATS)}")
    if not out.parent.is_dir():
        raise ExportError(f"{out}: directory {out.parent} does not exist")
    if grouping not in GROUPINGS:
        raise ExportError(f"unknown grouping {grouping!r}; use one of {list(GROUPINGS)}")
    partial = out.with_name(out.name + ".partial")
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        data_release = _data_release(conn, release)
        tables = _tables(conn, release, data_release)
        chosen = _datasets(conn, release, tables, datasets)
        obs, groups = _obs(conn, tables, data_release, grouping, chosen)
        var, dataset_genes = _var(conn, tables, release, chosen, genes)
        reading = _Reading(
            tables, grouping, chosen,
            obs_row={d: _lookup(g["group_index"].to_numpy(), g.index.to_numpy()) for d, g in groups.groupby("dataset")},
            var_column={d: _lookup(g["gene_index"].to_numpy(), var.index.get_indexer(g["gene_identifier"]))
                        for d, g in dataset_genes.groupby("dataset")},
            n_cells=obs["n_cells"].to_numpy(), n_obs=len(obs), n_vars=len(var))
        blocks = _gene_major_block(conn, reading) if genes else _group_major_blocks(conn, reading)
        uns = _provenance(conn, tables, release, data_release, grouping, chosen)
        write = _write_h5ad if out.suffix == ".h5ad" else _write_parquet
        try:
            stored = write(partial, obs, var, uns, blocks)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    return ExportResult(out, release, data_release, grouping, len(obs), len(var), stored)
