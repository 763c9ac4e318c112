"""One h5ad expression matrix streamed out of core into the statistics of its base groupings
(``cluster`` and ``region_subclass``): cells to groups, then the rows read in group or in file order.

Memory is bounded by the output, never by the input. numba kernels do the work on every core,
without the GIL, each thread taking its own run of groups (so no two threads ever write the same
statistics). A file is read one of two ways:

- **in group order**, where X is stored unfiltered and the file is in the page cache: the rows
  of each group are read together (``pread`` at their offsets, a row at a time into a per-thread
  buffer that stays in cache), summed in a dense per-thread accumulator of genes x 20 B that
  stays in cache too, and the group's present genes are written out once, already in CSR order,
  in batches of ``chunk_cells`` rows. One pass, no bitmap; the reads are scattered, which is why
  a file not in the page cache is read the other way.
- **in file order** otherwise, in two sequential passes over row chunks (``os.preadv`` straight
  from the file where X is unfiltered, else through h5py): the first reads only column indices
  and sets one bit per (group, gene) pair present in a bitmap (groups x genes / 8 bytes: 27 MB
  for 6,756 clusters x 32,000 genes); the bitmap's prefix popcounts give every pair a fixed
  slot, and the second pass adds each non-zero value into its slot in place.

Peak memory of :func:`aggregate_file` is therefore about
``24 B x present (group, gene) pairs of the base groupings`` (20 B of statistics, 4 B of gene
index) plus, in group order, a batch's staged pairs (at most 24 B x the non-zeros of its
``chunk_cells`` rows) or, in file order, ``8 B x non-zeros of one chunk + groups x genes / 4 B``,
and the interpreter; ``chunk_cells`` trades the chunk terms for speed.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from etl.aggregate import h5ad, kernels
from etl.aggregate.stats import (
    GROUPINGS,
    REGION_SUBCLASS,
    Accumulator,
    AggregationError,
    ClusterTaxonomy,
    FileStats,
    GroupStats,
    base_groupings,
    save_partial,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_CELLS = 20_000
_CACHED_ENOUGH = 0.9  # fraction of a file in the page cache above which it is read in group order


def _alias_text(values: pd.Series) -> pd.Series:
    """cluster_alias as text, whether it came as int, float (NaN present) or str."""
    numeric = pd.to_numeric(values, errors="coerce")
    whole = numeric.notna() & (numeric == numeric.round())
    text = values.astype(str)
    text[whole] = numeric[whole].astype("int64").astype(str)
    return text.where(values.notna())


def row_group_codes(matrix: h5ad.Matrix, assignments: pd.DataFrame, taxonomy: ClusterTaxonomy,
                    groupings: Sequence[str]) -> dict[str, tuple[np.ndarray, pd.DataFrame]]:
    """For each base grouping: the group code of every matrix row (-1: not aggregated) and the groups."""
    needed = {"cell_label", "cluster_alias", "region_of_interest_acronym"}
    if missing := needed - set(assignments.columns):
        raise AggregationError(f"cell assignments lack columns {sorted(missing)}")
    cells = assignments.drop_duplicates("cell_label").set_index("cell_label")
    listed = cells.reindex(matrix.cell_labels)
    # Per distinct cluster_alias (thousands), not per cell (millions): text, taxonomy checks, lookups.
    alias_of_row, distinct = pd.factorize(listed["cluster_alias"])
    alias = _alias_text(pd.Series(distinct))
    unknown = ~alias.isin(taxonomy.labels.index).to_numpy()
    if unknown.any():
        n_cells = int(np.isin(alias_of_row, np.flatnonzero(unknown)).sum())
        raise AggregationError(f"{matrix.path}: {n_cells} cells have a cluster_alias the taxonomy "
                               f"does not know, e.g. {sorted(set(alias[unknown]))[:5]}")
    out: dict[str, tuple[np.ndarray, pd.DataFrame]] = {}
    if "cluster" in groupings:
        cluster_code = taxonomy.clusters.get_indexer(alias.map(taxonomy.labels["cluster"]))
        codes = np.append(cluster_code, -1).astype(np.int32)[alias_of_row]  # alias -1 (not listed): -1
        out["cluster"] = (codes, pd.DataFrame({"group_label": taxonomy.clusters.to_numpy(),
                                               "region_of_interest_acronym": ""}))
    if REGION_SUBCLASS in groupings:
        subclass = np.append(alias.map(taxonomy.labels["subclass"]).to_numpy(dtype=object), None)[alias_of_row]
        present = pd.notna(subclass)
        region = listed["region_of_interest_acronym"].fillna("").astype(str).to_numpy()
        keys = pd.DataFrame({"group_label": subclass[present], "region_of_interest_acronym": region[present]})
        codes = np.full(matrix.n_cells, -1, np.int32)
        groups = keys.drop_duplicates().sort_values(list(keys.columns), ignore_index=True)
        lookup = pd.MultiIndex.from_frame(groups)
        codes[present] = lookup.get_indexer(pd.MultiIndex.from_frame(keys)).astype(np.int32)
        out[REGION_SUBCLASS] = (codes, groups)
    return out


def _bad_gene_index(path: Path, n_genes: int) -> AggregationError:
    return AggregationError(f"{path}: X/indices holds a gene index outside 0..{n_genes - 1}")


def _in_small_pages(shape: int | tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised array in 4 KB pages, for memory written in order and once: numpy asks for
    transparent huge pages for large arrays, whose first touch measured about 6x slower on the
    VMs this ran on (benchmarks/first_touch.py) and which only pay back in fewer TLB misses under
    random access; the file-order slots, updated at random, keep them (measured faster there)."""
    count = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)


def _aggregate_in_group_order(matrix: h5ad.Matrix, ranges: Mapping[str, h5ad.FileRanges],
                              codes: Mapping[str, tuple[np.ndarray, pd.DataFrame]],
                              chunk_cells: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Per base grouping: the rows of each group read together (``pread`` at their offsets, a row at
    a time into a per-thread buffer that stays in cache, in batches of ``chunk_cells`` rows) and
    summed in dense per-thread accumulators, so each group's pairs are written once, already in
    CSR order. Returns indptr, indices, sums, nonzero."""
    path, indptr, n_genes, raw = matrix.path, matrix.indptr, len(matrix.genes), matrix.normalization == "raw"
    lengths = np.diff(indptr)
    threads = kernels.threads()
    readers = {name: r.reader for name, r in ranges.items()}
    longest = int(lengths.max()) if len(lengths) else 0
    row_buffers = {name: np.empty((threads, longest), r.dtype) for name, r in ranges.items()}
    stage = (np.empty((threads, 0), np.int32), np.empty((threads, 0, 2)), np.empty((threads, 0), np.uint32))
    scratch, scratch_nonzero = np.zeros((threads, n_genes, 2)), np.zeros((threads, n_genes), np.uint32)
    carries = [(np.zeros((n_genes, 2)), np.zeros(n_genes, np.uint32)) for _ in range(2)]  # in, out: swapped
    out: dict[str, tuple[np.ndarray, ...]] = {}
    if codes:  # rows of no group are not aggregated, but a bad index makes a bad file all the same
        ungrouped = np.flatnonzero(next(iter(codes.values()))[0] < 0)
        with kernels.PARALLEL:
            outside, ended = kernels.count_outside(readers["indices"], indptr, ungrouped, n_genes,
                                                   row_buffers["indices"])
        h5ad.raise_if_ended_early(ended)
        if outside:
            raise _bad_gene_index(path, n_genes)
    for grouping, (row_codes, groups) in codes.items():
        order = np.argsort(row_codes, kind="stable")
        order = order[int(np.searchsorted(row_codes[order], 0)):]
        batches = range(0, len(order), chunk_cells)
        ends = np.cumsum(lengths[order])
        largest = max((int(ends[min(len(order), b + chunk_cells) - 1] - (ends[b - 1] if b else 0))
                       for b in batches), default=0)
        if stage[0].shape[1] < largest:  # pages are touched only as far as a batch's pairs reach
            stage = (_in_small_pages((threads, largest), np.int32), _in_small_pages((threads, largest, 2), np.float64),
                     _in_small_pages((threads, largest), np.uint32))
        # Room for every possible pair, of which only the pairs present are ever touched (memory
        # is committed page by page): the output is written once, in order, never re-allocated.
        capacity = min(len(groups) * n_genes, int(ends[-1]) if len(order) else 0)
        indices = _in_small_pages(capacity, np.int32)
        sums, nonzero = _in_small_pages((capacity, 2), np.float64), _in_small_pages(capacity, np.uint32)
        group_pairs = np.zeros(len(groups), np.int64)
        written = 0
        for start in batches:
            rows = order[start:start + chunk_cells]
            row_group = row_codes[rows]
            local_indptr = np.zeros(len(rows) + 1, np.int64)
            np.cumsum(lengths[rows], out=local_indptr[1:])
            carry_in = start > 0 and row_codes[order[start - 1]] == row_group[0]
            carry_on = start + chunk_cells < len(order) and row_codes[order[start + chunk_cells]] == row_group[-1]
            bounds = kernels.cut_runs(row_group, local_indptr, np.arange(len(rows)), 0, threads)
            with kernels.PARALLEL:
                staged, outside, ended = kernels.accumulate_groups(
                    readers["indices"], readers["data"], indptr, rows, row_group, bounds, n_genes, raw,
                    row_buffers["indices"], row_buffers["data"], carry_in, carry_on, scratch, scratch_nonzero,
                    *carries[0], *carries[1], *stage, group_pairs)
                carries.reverse()
                h5ad.raise_if_ended_early(ended)
                if outside:
                    raise _bad_gene_index(path, n_genes)
                written = kernels.unstage(staged, *stage, written, indices, sums, nonzero)
        group_indptr = np.zeros(len(groups) + 1, np.int64)
        np.cumsum(group_pairs, out=group_indptr[1:])
        out[grouping] = (group_indptr, indices[:written], sums[:written], nonzero[:written])
    return out


def _aggregate_in_file_order(store: h5py.File, matrix: h5ad.Matrix,
                             codes: Mapping[str, tuple[np.ndarray, pd.DataFrame]],
                             chunk_cells: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Per base grouping, from two sequential passes over X in row chunks: mark the pairs present
    in a bitmap, then add each value into its pair's slot. Returns indptr, indices, sums, nonzero."""
    path, n_genes, raw = matrix.path, len(matrix.genes), matrix.normalization == "raw"
    accumulators = {g: Accumulator(len(groups), n_genes) for g, (_, groups) in codes.items()}
    buffers: dict[str, np.ndarray] = {}
    for start, indptr, indices, _ in h5ad.chunks(store, matrix.indptr, chunk_cells, False, buffers):
        for grouping, accumulator in accumulators.items():
            if accumulator.mark(codes[grouping][0][start:start + len(indptr) - 1], indptr, indices):
                raise _bad_gene_index(path, n_genes)
    for accumulator in accumulators.values():
        accumulator.allocate()
    for start, indptr, indices, data in h5ad.chunks(store, matrix.indptr, chunk_cells, True, buffers):
        values = kernels.log2_cpm(indptr, data) if raw else data
        for grouping, accumulator in accumulators.items():
            accumulator.add_values(codes[grouping][0][start:start + len(indptr) - 1], indptr, indices, values)
    buffers = indptr = indices = data = values = None  # freed before the gene indices come
    return {grouping: accumulator.finish() for grouping, accumulator in accumulators.items()}


def aggregate_matrix(h5ad_path: Path, assignments: pd.DataFrame, taxonomy: pd.DataFrame | ClusterTaxonomy, *,
                     chunk_cells: int = DEFAULT_CHUNK_CELLS, groupings: Sequence[str] = GROUPINGS,
                     group_order: bool | None = None) -> FileStats:
    """Aggregate one h5ad file (streamed in row chunks) into base-grouping statistics, in memory.

    ``assignments`` has ``cell_label, cluster_alias, region_of_interest_acronym``; matrix rows it does
    not list (cells QC'd out) or that have no cluster are skipped. ``group_order``: read the rows of
    each group together rather than in two sequential passes; it needs X stored unfiltered, and by
    default it is chosen when the file is in the page cache: its reads are scattered, which a
    disk serves many times slower than sequential ones.
    """
    path = Path(h5ad_path)
    tax = taxonomy if isinstance(taxonomy, ClusterTaxonomy) else ClusterTaxonomy(taxonomy)
    base = base_groupings(groupings)
    try:
        # No chunk cache: each chunk of X is read once, straight into the buffers.
        with h5py.File(path, "r", rdcc_nbytes=0) as store:
            matrix = h5ad.open_matrix(path, store)
            codes = row_group_codes(matrix, assignments, tax, base)
            matrix.cell_labels = matrix.cell_labels[:0]  # not needed past the codes: free it before the peak
            fd = os.open(path, os.O_RDONLY)
            try:
                ranges = {name: h5ad.FileRanges.of(store["X"][name], fd) for name in ("indices", "data")}
                direct = all(r is not None for r in ranges.values())
                if group_order and not direct:
                    raise AggregationError(f"{path}: X is stored filtered (compressed): it can only be read in "
                                           "file order")
                if group_order or (group_order is None and direct and h5ad.cached_fraction(fd) >= _CACHED_ENOUGH):
                    arrays = _aggregate_in_group_order(matrix, ranges, codes, chunk_cells)
                else:
                    arrays = _aggregate_in_file_order(store, matrix, codes, chunk_cells)
            finally:
                os.close(fd)
    except (OSError, KeyError) as exc:
        raise AggregationError(f"{path}: unreadable h5ad: {exc}") from exc
    stats = {}
    for grouping, (row_codes, groups) in codes.items():
        groups = groups.assign(n_cells=np.bincount(row_codes[row_codes >= 0], minlength=len(groups)))
        stats[grouping] = GroupStats(grouping, groups.reset_index(drop=True), matrix.genes, *arrays.pop(grouping))
    aggregated = int((next(iter(codes.values()))[0] >= 0).sum()) if codes else 0
    return FileStats(str(path), matrix.normalization, matrix.n_cells, aggregated, stats)


def aggregate_file(h5ad_path: Path, assignments: pd.DataFrame, taxonomy: pd.DataFrame | ClusterTaxonomy,
                   out_path: Path, *, chunk_cells: int = DEFAULT_CHUNK_CELLS,
                   groupings: Sequence[str] = GROUPINGS, inputs: str | None = None) -> Path:
    """Aggregate one h5ad file and persist its partial result at ``out_path`` (.npz); return the path.

    ``inputs`` (:func:`etl.aggregate.release.inputs_digest`) is kept in the partial so that a later
    release can reuse it.

    This is the unit of parallel work: partials of a dataset's files are merged by
    :func:`etl.aggregate.stats.merge_file_stats`, in any order.
    """
    file_stats = aggregate_matrix(h5ad_path, assignments, taxonomy, chunk_cells=chunk_cells, groupings=groupings)
    log.info("aggregated %s: %d of %d cells", h5ad_path, file_stats.n_cells_aggregated, file_stats.n_cells_in_file)
    return save_partial(file_stats, Path(out_path), inputs)
