"""The statistics of aggregation: groupings and taxonomy, per-group statistics of one file, their
partial files on disk, their merge over a dataset's files and their roll-up to coarser levels.

Per grouping, group and gene four additive statistics of the log2 expression are kept: cells in
the group, cells with non-zero expression, sum and sum of squares. Because they are additive a
file's statistics merge with the other files' by summing, and coarser taxonomy levels roll up
from ``cluster``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from etl.aggregate import kernels
from etl.aggregate.kernels import SUM, SUM_SQ
from etl.transfer import open_nofollow

TAXONOMY_LEVELS = ("cluster", "supertype", "subclass", "class")
REGION_SUBCLASS = "region_subclass"
GROUPINGS = (*TAXONOMY_LEVELS, REGION_SUBCLASS)


class AggregationError(ValueError):
    """Input that cannot be aggregated; the message names the file and the problem."""


# --- what is aggregated over: groupings of the taxonomy -----------------------------------------

class ClusterTaxonomy:
    """Cluster membership of the taxonomy, as labels and names per level, indexed by cluster_alias."""

    def __init__(self, membership: pd.DataFrame) -> None:
        needed = {"cluster_alias", "cluster_annotation_term_set_name", "cluster_annotation_term_label",
                  "cluster_annotation_term_name"}
        missing = needed - set(membership.columns)
        if missing:
            raise AggregationError(f"taxonomy membership lacks columns {sorted(missing)}")
        levels = set(membership["cluster_annotation_term_set_name"])
        if not set(TAXONOMY_LEVELS) <= levels:
            raise AggregationError(f"taxonomy has term sets {sorted(levels)}, needs {list(TAXONOMY_LEVELS)}")
        frame = membership.assign(cluster_alias=membership["cluster_alias"].astype(str))
        self.labels = frame.pivot(index="cluster_alias", columns="cluster_annotation_term_set_name",
                                  values="cluster_annotation_term_label")
        self.names = dict(zip(frame["cluster_annotation_term_label"], frame["cluster_annotation_term_name"],
                              strict=True))
        self.clusters = pd.Index(self.labels["cluster"].to_numpy())
        if self.clusters.has_duplicates:
            raise AggregationError("taxonomy maps one cluster label to several cluster_alias values")

    def parent_of_cluster(self, level: str) -> pd.Series:
        """Cluster label -> label of its ancestor at ``level``."""
        return pd.Series(self.labels[level].to_numpy(), index=self.clusters)


# --- statistics of one grouping ----------------------------------------------------------------

@dataclass
class GroupStats:
    """Additive statistics of one grouping, groups x genes, in CSR layout (no zero entries)."""

    grouping: str
    groups: pd.DataFrame  # group_label, region_of_interest_acronym ('' unless region_subclass), n_cells
    genes: pd.DataFrame  # gene_identifier, gene_symbol
    indptr: np.ndarray
    indices: np.ndarray
    sums: np.ndarray  # n_pairs x 2 float64: sum, sum of squares
    nonzero: np.ndarray  # n_pairs uint32: cells with non-zero expression

    @property
    def sum(self) -> np.ndarray:
        return self.sums[:, SUM]

    @property
    def sum_sq(self) -> np.ndarray:
        return self.sums[:, SUM_SQ]

    @property
    def n_nonzero(self) -> np.ndarray:
        return self.nonzero.astype(np.int32)

    def matrix(self, statistic: str) -> sp.csr_matrix:
        """One statistic as a groups x genes sparse matrix."""
        return sp.csr_matrix((getattr(self, statistic), self.indices, self.indptr),
                             shape=(len(self.groups), len(self.genes)))

    @property
    def n_pairs(self) -> int:
        return int(self.indptr[-1])


@dataclass
class FileStats:
    """Base-grouping statistics of one matrix file, before merging with the dataset's other files
    (saved to disk, it is the file's *partial*: :func:`save_partial`)."""

    source: str
    normalization: str
    n_cells_in_file: int
    n_cells_aggregated: int
    stats: dict[str, GroupStats]


def base_groupings(groupings: Sequence[str]) -> list[str]:
    """The groupings read from the matrices for ``groupings``: ``cluster`` for any taxonomy level (the
    others roll up from it), and ``region_subclass``."""
    unknown = set(groupings) - set(GROUPINGS)
    if unknown:
        raise AggregationError(f"unknown groupings {sorted(unknown)}; known: {list(GROUPINGS)}")
    base = ["cluster"] if set(groupings) & set(TAXONOMY_LEVELS) else []
    return base + ([REGION_SUBCLASS] if REGION_SUBCLASS in groupings else [])


class Accumulator:
    """Two-pass accumulation of group x gene statistics: mark all pairs, then add values in place."""

    def __init__(self, n_groups: int, n_genes: int) -> None:
        self.bitmap = np.zeros((n_groups, (n_genes + 63) // 64), np.uint64)
        self.n_genes = n_genes

    def mark(self, row_group: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> int:
        """Mark the chunk's pairs; the number of gene indices out of range (not marked)."""
        with kernels.PARALLEL:
            return int(kernels.mark(self.bitmap, row_group, indptr, indices, self.n_genes, kernels.threads()))

    def allocate(self) -> None:
        self.offsets, self.indptr = kernels.rank(self.bitmap)
        # Sum and sum of squares side by side: an update touches one cache line, not two; the
        # counts apart, as uint32 (20 B a pair, not 24: memory is what this costs). numpy asks
        # the kernel for transparent huge pages for arrays this large (fewer TLB misses).
        n_pairs = int(self.indptr[-1])
        self.sums = np.zeros((n_pairs, 2), np.float64)
        self.nonzero = np.zeros(n_pairs, np.uint32)

    def add_values(self, row_group, indptr, indices, data) -> None:
        with kernels.PARALLEL:
            kernels.add_values(self.bitmap, self.offsets, row_group, indptr, indices, data, self.sums,
                               self.nonzero, kernels.threads())

    def add_stats(self, row_group: np.ndarray, stats: GroupStats, indices: np.ndarray) -> None:
        kernels.add_stats(self.bitmap, self.offsets, row_group, stats.indptr, indices, stats.sums,
                          stats.nonzero, self.sums, self.nonzero)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """indptr, indices, sums and nonzero of the pairs with a non-zero value, in CSR order."""
        del self.offsets  # freed before the gene indices are allocated, at the peak of memory
        indices = kernels.genes_of_bitmap(self.bitmap, int(self.indptr[-1]))
        indptr = self.indptr
        if kernels.has_empty(self.nonzero):
            indptr = kernels.drop_empty(indptr, indices, self.sums, self.nonzero)
        n = int(indptr[-1])
        del self.bitmap
        return indptr, indices[:n], self.sums[:n], self.nonzero[:n]


# --- partials on disk --------------------------------------------------------------------------

_STAT_ARRAYS = ("indptr", "indices", "sums", "nonzero")
# Bump when what a partial holds or how it is computed changes: older partials are then never reused.
PARTIAL_FORMAT = 1


def save_partial(file_stats: FileStats, path: Path, inputs: str | None = None) -> Path:
    """Write one file's statistics as its partial, one uncompressed .npz, atomically (temporary name,
    then rename)."""
    arrays: dict[str, np.ndarray] = {}
    genes = next(iter(file_stats.stats.values())).genes if file_stats.stats else pd.DataFrame(
        {"gene_identifier": [], "gene_symbol": []})
    arrays["gene_identifier"] = genes["gene_identifier"].to_numpy(dtype=str)
    arrays["gene_symbol"] = genes["gene_symbol"].to_numpy(dtype=str)
    for grouping, stats in file_stats.stats.items():
        for column in ("group_label", "region_of_interest_acronym"):
            arrays[f"{grouping}.{column}"] = stats.groups[column].to_numpy(dtype=str)
        arrays[f"{grouping}.n_cells"] = stats.groups["n_cells"].to_numpy(np.int64)
        for name in _STAT_ARRAYS:
            arrays[f"{grouping}.{name}"] = getattr(stats, name)
    info = {"source": file_stats.source, "normalization": file_stats.normalization,
            "n_cells_in_file": file_stats.n_cells_in_file, "n_cells_aggregated": file_stats.n_cells_aggregated,
            "groupings": list(file_stats.stats), "inputs": inputs}
    arrays["info"] = np.array(json.dumps(info))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    with os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)
    return path


def load_partial(path: Path) -> FileStats:
    """One file's statistics, read back from its partial."""
    with np.load(path) as stored:
        info = json.loads(str(stored["info"]))
        expected = {f"{grouping}.{name}" for grouping in info["groupings"] for name in _STAT_ARRAYS}
        if missing := expected - set(stored.files):
            raise AggregationError(f"{path}: partial lacks {sorted(missing)[:3]} (written by another version "
                                   "of abc-mirror?): aggregate its file again")
        genes = pd.DataFrame({"gene_identifier": stored["gene_identifier"], "gene_symbol": stored["gene_symbol"]})
        stats = {}
        for grouping in info["groupings"]:
            groups = pd.DataFrame({column: stored[f"{grouping}.{column}"]
                                   for column in ("group_label", "region_of_interest_acronym", "n_cells")})
            stats[grouping] = GroupStats(grouping, groups, genes,
                                         *(stored[f"{grouping}.{name}"] for name in _STAT_ARRAYS))
    return FileStats(info["source"], info["normalization"], info["n_cells_in_file"], info["n_cells_aggregated"],
                     stats)


def partial_inputs(path: Path) -> str | None:
    """The inputs digest a partial was written with (None for a partial without one)."""
    with np.load(path) as stored:
        return json.loads(str(stored["info"])).get("inputs")


# --- merging files and rolling up --------------------------------------------------------------

def _merge(grouping: str, parts: Sequence[GroupStats], group_of_row: Sequence[np.ndarray],
           groups: pd.DataFrame, genes: pd.DataFrame) -> GroupStats:
    """Sum the rows of ``parts`` into ``groups`` (row i of part p goes to group group_of_row[p][i])."""
    gene_index = pd.Index(genes["gene_identifier"])
    remapped = []
    for part in parts:
        same = part.genes["gene_identifier"].equals(genes["gene_identifier"])
        mapping = np.arange(len(genes), dtype=np.int32) if same else gene_index.get_indexer(
            part.genes["gene_identifier"]).astype(np.int32)
        remapped.append(part.indices if same else mapping[part.indices])
    accumulator = Accumulator(len(groups), len(genes))
    for part, rows, indices in zip(parts, group_of_row, remapped, strict=True):
        accumulator.mark(rows, part.indptr, indices)
    accumulator.allocate()
    for part, rows, indices in zip(parts, group_of_row, remapped, strict=True):
        accumulator.add_stats(rows, part, indices)
    n_cells = np.zeros(len(groups), np.int64)
    for part, rows in zip(parts, group_of_row, strict=True):
        np.add.at(n_cells, rows[rows >= 0], part.groups["n_cells"].to_numpy()[rows >= 0])
    return GroupStats(grouping, groups.assign(n_cells=n_cells).reset_index(drop=True), genes, *accumulator.finish())


def _union_genes(parts: Iterable[GroupStats]) -> pd.DataFrame:
    genes = pd.concat([p.genes for p in parts], ignore_index=True)
    return genes.drop_duplicates("gene_identifier", ignore_index=True)


def merge_file_stats(files: Sequence[FileStats], grouping: str) -> GroupStats:
    """Sum one base grouping over a dataset's files; groups with no cells are left out."""
    parts = [f.stats[grouping] for f in files if grouping in f.stats]
    if not parts:
        raise AggregationError(f"no partial holds grouping {grouping!r}")
    keys = ["group_label", "region_of_interest_acronym"]
    every = pd.concat([p.groups for p in parts], ignore_index=True)
    groups = every[every["n_cells"] > 0][keys].drop_duplicates().sort_values(keys, ignore_index=True)
    lookup = pd.MultiIndex.from_frame(groups)
    rows = [lookup.get_indexer(pd.MultiIndex.from_frame(p.groups[keys])).astype(np.int32) for p in parts]
    return _merge(grouping, parts, rows, groups, _union_genes(parts))


def roll_up(clusters: GroupStats, taxonomy: ClusterTaxonomy, level: str) -> GroupStats:
    """Statistics of a coarser taxonomy level, summed from the cluster level."""
    parent = taxonomy.parent_of_cluster(level).reindex(clusters.groups["group_label"]).to_numpy()
    labels = pd.Index(sorted(set(parent[pd.notna(parent)])))
    rows = labels.get_indexer(parent).astype(np.int32)
    groups = pd.DataFrame({"group_label": labels.to_numpy(), "region_of_interest_acronym": ""})
    return _merge(level, [clusters], [rows], groups, clusters.genes)


def dataset_stats(files: Sequence[FileStats], taxonomy: pd.DataFrame | ClusterTaxonomy,
                  groupings: Sequence[str] = GROUPINGS) -> Iterator[GroupStats]:
    """Every requested grouping of one dataset, one at a time, so memory holds at most two levels."""
    tax = taxonomy if isinstance(taxonomy, ClusterTaxonomy) else ClusterTaxonomy(taxonomy)
    base = base_groupings(groupings)
    if "cluster" in base:
        clusters = merge_file_stats(files, "cluster")
        for level in TAXONOMY_LEVELS:
            if level in groupings:
                yield clusters if level == "cluster" else roll_up(clusters, tax, level)
        del clusters
    if REGION_SUBCLASS in base:
        yield merge_file_stats(files, REGION_SUBCLASS)
