"""Expression aggregated over groups of cells, streamed out of core from the release's h5ad files.

Per metadata dataset, grouping, group and gene we keep four additive statistics of the log2
expression: cells in the group, cells with non-zero expression, sum and sum of squares. Mean,
variance and fraction expressing follow from them, and because they are additive a file's
result merges with the other files' by summing, and coarser groupings roll up from finer ones.

Two groupings are accumulated from the matrices (the *base* groupings): ``cluster`` and
``region_subclass``; ``supertype``, ``subclass`` and ``class`` are rolled up from ``cluster``.

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

import ctypes
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import anndata as ad
import h5py
import numba
import numpy as np
import pandas as pd
import psycopg
import scipy.sparse as sp
from llvmlite import ir
from numba import types
from numba.extending import intrinsic
from psycopg import sql

from etl import db
from etl.catalog import cell_assignments, release_files_on_disk
from etl.config import Settings
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
from etl.reuse import place_copy
from etl.transfer import open_nofollow

log = logging.getLogger(__name__)

TAXONOMY_LEVELS = ("cluster", "supertype", "subclass", "class")
REGION_SUBCLASS = "region_subclass"
GROUPINGS = (*TAXONOMY_LEVELS, REGION_SUBCLASS)
DEFAULT_CHUNK_CELLS = 20_000
_CACHED_ENOUGH = 0.9  # fraction of a file in the page cache above which it is read in group order
NORMALIZATIONS = ("log2", "raw")
_ONE = np.uint64(1)
_SUM, _SUM_SQ = 0, 1  # columns of GroupStats.sums


class AggregationError(ValueError):
    """Input that cannot be aggregated; the message names the file and the problem."""


# --- numba kernels: bitmap of present (group, gene) pairs, slots by rank --------------------------

@intrinsic
def _popcount(typingctx, word):
    """The CPU's popcount instruction (LLVM ctpop) on a uint64."""
    def codegen(context, builder, signature, args):
        return builder.zext(builder.ctpop(args[0]), context.get_value_type(types.int64))
    return types.int64(types.uint64), codegen


@intrinsic
def _trailing_zeros(typingctx, word):
    """Index of the lowest set bit (LLVM cttz) of a non-zero uint64."""
    def codegen(context, builder, signature, args):
        zeros = builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))
        return builder.zext(zeros, context.get_value_type(types.int64))
    return types.int64(types.uint64), codegen


@numba.njit(cache=True, nogil=True, parallel=True)
def _mark(bitmap, row_group, indptr, indices, n_genes, n_threads):
    """Set the bits of the chunk's pairs; return how many column indices lie outside 0..n_genes-1
    (skipped: the file is bad, and the caller says so)."""
    # Threads take disjoint runs of groups: each sets bits in its own rows of the bitmap.
    order, bounds = _group_order(row_group, indptr, n_threads)
    outside = np.zeros(n_threads, np.int64)
    for part in numba.prange(n_threads):
        for position in range(bounds[part], bounds[part + 1]):
            row = order[position]
            group = row_group[row]
            for k in range(indptr[row], indptr[row + 1]):
                gene = indices[k]
                if gene < 0 or gene >= n_genes:
                    outside[part] += 1
                    continue
                bitmap[group, gene >> 6] |= _ONE << np.uint64(gene & 63)
    for position in range(bounds[0]):  # rows of no group: not aggregated, but a bad file all the same
        row = order[position]
        for k in range(indptr[row], indptr[row + 1]):
            if indices[k] < 0 or indices[k] >= n_genes:
                outside[0] += 1
    return outside.sum()


@numba.njit(cache=True)
def _rank(bitmap):
    n_groups, n_words = bitmap.shape
    offsets = np.empty((n_groups, n_words), np.int64)
    indptr = np.empty(n_groups + 1, np.int64)
    total = 0
    for group in range(n_groups):
        indptr[group] = total
        for word in range(n_words):
            offsets[group, word] = total
            total += _popcount(bitmap[group, word])
    indptr[n_groups] = total
    return offsets, indptr


@numba.njit(inline="always")
def _slot(bitmap, offsets, group, gene):
    word = gene >> 6
    below = (_ONE << np.uint64(gene & 63)) - _ONE
    return offsets[group, word] + _popcount(bitmap[group, word] & below)


@numba.njit(cache=True, nogil=True)
def _cut_runs(row_group, indptr, order, first, n_parts):
    """Bounds cutting ``order[first:]`` (rows sorted by group) into ``n_parts`` runs of about equal
    non-zeros; a group never spans two runs, so each run's slots are its own."""
    total = 0
    for position in range(first, order.shape[0]):
        row = order[position]
        total += indptr[row + 1] - indptr[row]
    bounds = np.full(n_parts + 1, order.shape[0], np.int64)
    bounds[0] = first
    part, seen = 1, 0
    for position in range(first, order.shape[0]):
        if part >= n_parts:
            break
        row = order[position]
        if seen * n_parts >= total * part and row_group[row] != row_group[order[position - 1]]:
            bounds[part] = position
            part += 1
        seen += indptr[row + 1] - indptr[row]
    return bounds


@numba.njit(cache=True, nogil=True)
def _group_order(row_group, indptr, n_parts):
    """Rows by group (rows without a group left out), cut into ``n_parts`` runs (:func:`_cut_runs`)."""
    order = np.argsort(row_group, kind="mergesort")
    first = 0
    while first < order.shape[0] and row_group[order[first]] < 0:
        first += 1
    return order, _cut_runs(row_group, indptr, order, first, n_parts)


@numba.njit(cache=True, nogil=True, parallel=True)
def _add_values(bitmap, offsets, row_group, indptr, indices, data, sums, nonzero, n_threads):
    # Rows of a group one after the other: its slots stay in cache across its cells. Threads
    # take disjoint runs of groups, so they never write the same slot.
    order, bounds = _group_order(row_group, indptr, n_threads)
    for part in numba.prange(n_threads):
        for position in range(bounds[part], bounds[part + 1]):
            row = order[position]
            group = row_group[row]
            for k in range(indptr[row], indptr[row + 1]):
                value = np.float64(data[k])
                if value == 0.0:
                    continue
                slot = _slot(bitmap, offsets, group, indices[k])
                sums[slot, _SUM] += value
                sums[slot, _SUM_SQ] += value * value
                nonzero[slot] += 1


@numba.njit(cache=True, nogil=True)
def _add_stats(bitmap, offsets, row_group, indptr, indices, source_sums, source_nonzero, sums, nonzero):
    for row in range(row_group.shape[0]):
        group = row_group[row]
        if group < 0:
            continue
        for k in range(indptr[row], indptr[row + 1]):
            slot = _slot(bitmap, offsets, group, indices[k])
            sums[slot, _SUM] += source_sums[k, _SUM]
            sums[slot, _SUM_SQ] += source_sums[k, _SUM_SQ]
            nonzero[slot] += source_nonzero[k]


@numba.njit(cache=True)
def _genes_of_bitmap(bitmap, n_pairs):
    out = np.empty(n_pairs, np.int32)
    position = 0
    for group in range(bitmap.shape[0]):
        for word in range(bitmap.shape[1]):
            bits = bitmap[group, word]
            while bits:
                out[position] = word * 64 + _trailing_zeros(bits)
                position += 1
                bits &= bits - _ONE
    return out


@numba.njit(cache=True)
def _has_empty(nonzero):
    """Whether a pair's values are all explicit zeros (no n_pairs-sized temporary, unlike numpy)."""
    k = 0
    while k < nonzero.shape[0] and nonzero[k] != 0:
        k += 1
    return k < nonzero.shape[0]


@numba.njit(cache=True)
def _drop_empty(indptr, indices, sums, nonzero):
    """Remove pairs whose values were all explicit zeros, in place; return the new indptr."""
    new_indptr = np.empty_like(indptr)
    position = 0
    for group in range(indptr.shape[0] - 1):
        new_indptr[group] = position
        for k in range(indptr[group], indptr[group + 1]):
            if nonzero[k] > 0:
                indices[position] = indices[k]
                sums[position, :] = sums[k, :]
                nonzero[position] = nonzero[k]
                position += 1
    new_indptr[indptr.shape[0] - 1] = position
    return new_indptr


# --- group-ordered path: all rows of a group at once, dense per-thread accumulators -------------

# libc's pread(fd, buffer, count, offset), called from the kernels by symbol (so they can be
# cached, unlike a ctypes pointer); the buffer address goes as an integer of pointer size.
_pread = types.ExternalFunction("pread", types.intp(types.intc, types.uintp, types.uintp, types.int64))


@numba.njit(cache=True, nogil=True)
def _read_elements(fd, chunk_offsets, chunk_len, itemsize, lo, hi, address):
    """Elements ``lo:hi`` of an unfiltered 1-d dataset (chunks at ``chunk_offsets`` in the file) to
    ``address``; the file offset where the file ended early, else -1."""
    position = lo
    while position < hi:
        chunk = position // chunk_len
        stop = min(hi, (chunk + 1) * chunk_len)
        file_at = chunk_offsets[chunk] + (position - chunk * chunk_len) * itemsize
        target = address + (position - lo) * itemsize
        remaining = (stop - position) * itemsize
        while remaining > 0:
            got = _pread(fd, target, remaining, file_at)
            if got <= 0:
                return file_at
            target += got
            file_at += got
            remaining -= got
        position = stop
    return -1


@numba.njit(inline="always")
def _cpm_scale(counts, lo, hi):
    """The factor turning a cell's UMI counts ``counts[lo:hi]`` into counts per million (0 for a
    cell with none); log2(CPM + 1) is then ``log2(count * scale + 1)``."""
    total = 0.0
    for k in range(lo, hi):
        total += np.float64(counts[k])
    return 1e6 / total if total > 0 else 0.0


@numba.njit(inline="always")
def _read_row(reader, indptr, row, buffer):
    """Row ``row``'s elements of one dataset (``reader``: fd, chunk offsets, chunk length) into
    ``buffer``; the file offset where the file ended early, else -1."""
    fd, chunk_offsets, chunk_len = reader
    return _read_elements(fd, chunk_offsets, chunk_len, buffer.itemsize, indptr[row], indptr[row + 1],
                          buffer.ctypes.data)


@numba.njit(cache=True, nogil=True, parallel=True)
def _count_outside(reader, indptr, rows, n_genes, row_indices):
    """Column indices of ``rows`` outside 0..n_genes-1, each row read into its thread's buffer;
    and the file offset where the file ended early, else -1."""
    n_threads = row_indices.shape[0]
    outside = np.zeros(n_threads, np.int64)
    failed = np.full(n_threads, -1, np.int64)
    per = (rows.shape[0] + n_threads - 1) // n_threads
    for part in numba.prange(n_threads):
        for position in range(part * per, min(rows.shape[0], (part + 1) * per)):
            row = rows[position]
            ended = _read_row(reader, indptr, row, row_indices[part])
            if ended >= 0:
                failed[part] = ended
                break
            for k in range(indptr[row + 1] - indptr[row]):
                if row_indices[part, k] < 0 or row_indices[part, k] >= n_genes:
                    outside[part] += 1
    return outside.sum(), failed.max()


@numba.njit(cache=True, nogil=True, parallel=True)
def _accumulate_groups(index_reader, data_reader, indptr, rows, row_group, bounds, n_genes, raw,
                       row_indices, row_values, carry_in, carry_on, scratch, scratch_nonzero,
                       carried, carried_nonzero, carry, carry_nonzero,
                       stage_indices, stage_sums, stage_nonzero, group_pairs):
    """``rows`` sorted by group (``row_group`` theirs); thread ``part`` takes positions
    ``bounds[part]:bounds[part + 1]`` (whole groups). Each row is read (``pread``) into the
    thread's row buffers, which stay in cache, and summed into the thread's dense accumulators
    (genes x 20 B: in cache too); a group's present genes are then staged, in gene order. ``raw``:
    values are UMI counts, summed as log2(CPM + 1). The first group may go on from the previous
    batch (``carry_in``: its sums so far are in ``carried``), the last may go on in the next
    (``carry_on``: its sums go to ``carry``, which must be a different buffer: another thread may
    be reading ``carried``). Returns pairs staged per thread, the number of column indices
    outside 0..n_genes-1, and the file offset where the file ended early, else -1."""
    n_threads = bounds.shape[0] - 1
    staged = np.zeros(n_threads, np.int64)
    outside = np.zeros(n_threads, np.int64)
    failed = np.full(n_threads, -1, np.int64)
    for part in numba.prange(n_threads):
        sums, nonzero = scratch[part], scratch_nonzero[part]
        genes, values = row_indices[part], row_values[part]
        position = bounds[part]
        while position < bounds[part + 1]:
            group = row_group[position]
            end = position
            while end < bounds[part + 1] and row_group[end] == group:
                row = rows[end]
                ended = max(_read_row(index_reader, indptr, row, genes), _read_row(data_reader, indptr, row, values))
                if ended >= 0:
                    failed[part] = ended
                    break
                n = indptr[row + 1] - indptr[row]
                scale = _cpm_scale(values, 0, n) if raw else 1.0
                for k in range(n):
                    gene = genes[k]
                    if gene < 0 or gene >= n_genes:
                        outside[part] += 1
                        continue
                    value = np.float64(values[k])
                    if raw:
                        value = np.log2(value * scale + 1.0)
                    if value != 0.0:
                        sums[gene, _SUM] += value
                        sums[gene, _SUM_SQ] += value * value
                        nonzero[gene] += 1
                end += 1
            if failed[part] >= 0:
                break
            if position == 0 and carry_in:
                _move_sums(carried, carried_nonzero, sums, nonzero)
            if end == row_group.shape[0] and carry_on:
                _move_sums(sums, nonzero, carry, carry_nonzero)
            else:
                n = staged[part]
                for gene in range(n_genes):
                    if nonzero[gene]:
                        stage_indices[part, n] = gene
                        stage_sums[part, n, _SUM] = sums[gene, _SUM]
                        stage_sums[part, n, _SUM_SQ] = sums[gene, _SUM_SQ]
                        stage_nonzero[part, n] = nonzero[gene]
                        sums[gene, _SUM] = sums[gene, _SUM_SQ] = 0.0
                        nonzero[gene] = 0
                        n += 1
                group_pairs[group] += n - staged[part]
                staged[part] = n
            position = end
    return staged, outside.sum(), failed.max()


@numba.njit(inline="always")
def _move_sums(source, source_nonzero, target, target_nonzero):
    """Add a group's dense sums into ``target`` and clear them in ``source``."""
    for gene in range(source_nonzero.shape[0]):
        if source_nonzero[gene]:
            target[gene, _SUM] += source[gene, _SUM]
            target[gene, _SUM_SQ] += source[gene, _SUM_SQ]
            target_nonzero[gene] += source_nonzero[gene]
            source[gene, _SUM] = source[gene, _SUM_SQ] = 0.0
            source_nonzero[gene] = 0


@numba.njit(cache=True, nogil=True, parallel=True)
def _unstage(staged, stage_indices, stage_sums, stage_nonzero, at, indices, sums, nonzero):
    """Append each thread's staged pairs, in thread order (= group order), at ``at``; the new end."""
    starts = np.empty(staged.shape[0], np.int64)
    position = at
    for part in range(staged.shape[0]):
        starts[part] = position
        position += staged[part]
    for part in numba.prange(staged.shape[0]):  # each thread first-touches its own share of the output
        for k in range(staged[part]):
            indices[starts[part] + k] = stage_indices[part, k]
            sums[starts[part] + k, _SUM] = stage_sums[part, k, _SUM]
            sums[starts[part] + k, _SUM_SQ] = stage_sums[part, k, _SUM_SQ]
            nonzero[starts[part] + k] = stage_nonzero[part, k]
    return position


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
        return self.sums[:, _SUM]

    @property
    def sum_sq(self) -> np.ndarray:
        return self.sums[:, _SUM_SQ]

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


# numba's default threading layer (workqueue) must not launch parallel kernels from two threads
# at once: an application aggregating files in threads takes turns per chunk.
_PARALLEL = threading.Lock()


def _threads() -> int:
    """Threads for the kernels: numba's pool (NUMBA_NUM_THREADS, default one per CPU)."""
    return numba.get_num_threads()


class _Accumulator:
    """Two-pass accumulation of group x gene statistics: mark all pairs, then add values in place."""

    def __init__(self, n_groups: int, n_genes: int) -> None:
        self.bitmap = np.zeros((n_groups, (n_genes + 63) // 64), np.uint64)
        self.n_genes = n_genes

    def mark(self, row_group: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> int:
        """Mark the chunk's pairs; the number of gene indices out of range (not marked)."""
        with _PARALLEL:
            return int(_mark(self.bitmap, row_group, indptr, indices, self.n_genes, _threads()))

    def allocate(self) -> None:
        self.offsets, self.indptr = _rank(self.bitmap)
        # Sum and sum of squares side by side: an update touches one cache line, not two; the
        # counts apart, as uint32 (20 B a pair, not 24: memory is what this costs). numpy asks
        # the kernel for transparent huge pages for arrays this large (fewer TLB misses).
        n_pairs = int(self.indptr[-1])
        self.sums = np.zeros((n_pairs, 2), np.float64)
        self.nonzero = np.zeros(n_pairs, np.uint32)

    def add_values(self, row_group, indptr, indices, data) -> None:
        with _PARALLEL:
            _add_values(self.bitmap, self.offsets, row_group, indptr, indices, data, self.sums, self.nonzero,
                        _threads())

    def add_stats(self, row_group: np.ndarray, stats: GroupStats, indices: np.ndarray) -> None:
        _add_stats(self.bitmap, self.offsets, row_group, stats.indptr, indices, stats.sums, stats.nonzero,
                   self.sums, self.nonzero)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """indptr, indices, sums and nonzero of the pairs with a non-zero value, in CSR order."""
        del self.offsets  # freed before the gene indices are allocated, at the peak of memory
        indices = _genes_of_bitmap(self.bitmap, int(self.indptr[-1]))
        indptr = self.indptr
        if _has_empty(self.nonzero):
            indptr = _drop_empty(indptr, indices, self.sums, self.nonzero)
        n = int(indptr[-1])
        del self.bitmap
        return indptr, indices[:n], self.sums[:n], self.nonzero[:n]


# --- inputs: taxonomy, assignments, h5ad -------------------------------------------------------

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


def _alias_text(values: pd.Series) -> pd.Series:
    """cluster_alias as text, whether it came as int, float (NaN present) or str."""
    numeric = pd.to_numeric(values, errors="coerce")
    whole = numeric.notna() & (numeric == numeric.round())
    text = values.astype(str)
    text[whole] = numeric[whole].astype("int64").astype(str)
    return text.where(values.notna())


@dataclass
class _Matrix:
    path: Path
    normalization: str
    cell_labels: np.ndarray
    genes: pd.DataFrame
    n_cells: int
    indptr: np.ndarray  # int64, checked: rows are read at the offsets it gives


def normalization_of(path: Path) -> str:
    for normalization in NORMALIZATIONS:
        if path.name.endswith(f"-{normalization}.h5ad"):
            return normalization
    raise AggregationError(f"{path}: not a -log2.h5ad or -raw.h5ad expression matrix")


def _open_matrix(path: Path, store: h5py.File) -> _Matrix:
    x = store.get("X")
    if not isinstance(x, h5py.Group) or x.attrs.get("encoding-type") != "csr_matrix":
        kind = x.attrs.get("encoding-type", "dense") if x is not None else "missing"
        raise AggregationError(f"{path}: X is {kind}; aggregation streams rows of a CSR matrix")
    n_cells, n_genes = (int(v) for v in x.attrs["shape"])
    obs_index = ad.io.read_elem(store["obs"][store["obs"].attrs["_index"]])
    var = store["var"]
    identifiers = ad.io.read_elem(var[var.attrs["_index"]])
    symbols = ad.io.read_elem(var["gene_symbol"]) if "gene_symbol" in var else identifiers
    if len(obs_index) != n_cells or len(identifiers) != n_genes or len(x["indptr"]) != n_cells + 1:
        raise AggregationError(f"{path}: X is {n_cells} x {n_genes} but obs/var/indptr disagree")
    indptr = x["indptr"][:].astype(np.int64)
    stored = min(len(x["indices"]), len(x["data"]))
    if n_cells and (indptr[0] != 0 or (np.diff(indptr) < 0).any() or indptr[-1] > stored):
        # Rows are read at the offsets indptr gives: a bad one would read the wrong bytes.
        raise AggregationError(f"{path}: X/indptr is not a row index of X/indices and X/data "
                               f"(starts at {indptr[0]}, must not decrease, ends at {indptr[-1]} of {stored})")
    genes = pd.DataFrame({"gene_identifier": np.asarray(identifiers, dtype=str),
                          "gene_symbol": np.asarray(symbols, dtype=str)})
    return _Matrix(path, normalization_of(path), np.asarray(obs_index, dtype=str), genes, n_cells, indptr)


def _row_codes(matrix: _Matrix, assignments: pd.DataFrame, taxonomy: ClusterTaxonomy,
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


class _FileRanges:
    """Where the elements of an unfiltered 1-d HDF5 dataset lie in its file, so that a range of
    them is read with ``os.preadv`` straight into a buffer. HDF5's own read of the same bytes
    costs 2-3x more in its per-chunk bookkeeping (2.10 s against 0.87 s for ``dd`` over the
    4.6 GB benchmark file); for compressed or otherwise filtered data :meth:`of` returns None and
    the caller lets HDF5 read."""

    def __init__(self, fd: int, chunk_len: int, offsets: np.ndarray, dtype: np.dtype) -> None:
        self.fd, self.chunk_len, self.offsets, self.dtype = fd, chunk_len, offsets, dtype

    @property
    def reader(self) -> tuple[int, np.ndarray, int]:
        """What the reading kernels take (:func:`_read_row`): fd, chunk offsets, chunk length."""
        return self.fd, self.offsets, self.chunk_len

    @classmethod
    def of(cls, dataset: h5py.Dataset, fd: int) -> _FileRanges | None:
        plist = dataset.id.get_create_plist()
        if dataset.ndim != 1 or plist.get_nfilters() or not len(dataset) or not dataset.dtype.isnative:
            return None
        if plist.get_layout() == h5py.h5d.CONTIGUOUS:
            offset = dataset.id.get_offset()
            return None if offset is None else cls(fd, len(dataset), np.array([offset]), dataset.dtype)
        if plist.get_layout() != h5py.h5d.CHUNKED:
            return None
        chunk_len = dataset.chunks[0]
        offsets = np.full(-(-len(dataset) // chunk_len), -1, np.int64)
        try:
            def note(info) -> None:
                if info.filter_mask == 0:
                    offsets[info.chunk_offset[0] // chunk_len] = info.byte_offset
            dataset.id.chunk_iter(note)
        except (AttributeError, RuntimeError):  # chunk_iter needs h5py >= 3.8 on HDF5 >= 1.12.3
            return None
        return cls(fd, chunk_len, offsets, dataset.dtype) if (offsets >= 0).all() else None

    def read_into(self, out: np.ndarray, lo: int, hi: int) -> None:
        """Elements ``lo:hi`` into ``out[:hi - lo]``; OSError if the file ends early."""
        itemsize = self.dtype.itemsize
        if len(out) < hi - lo or out.itemsize != itemsize or not out.flags.c_contiguous:
            raise ValueError(f"buffer of {len(out)} x {out.itemsize} B for {hi - lo} x {itemsize} B")
        _ended_early(_read_elements(self.fd, self.offsets, self.chunk_len, itemsize, lo, hi, out.ctypes.data))


def _ended_early(ended: int) -> None:
    """The reading kernels return the file offset where a read came short, or -1."""
    if ended >= 0:
        raise OSError(f"file ends at byte {ended}, inside X")


def _chunks(store: h5py.File, indptr: np.ndarray, chunk_cells: int, with_data: bool,
            buffers: dict[str, np.ndarray]) -> Iterator[tuple[int, np.ndarray, ...]]:
    """(start, local indptr, indices, data) per row chunk; a yielded chunk is valid until the next one.

    Chunks are read in place into ``buffers`` (sized for the largest chunk, created on first use and
    kept by the caller, so the second pass reuses the first one's pages: fresh arrays per chunk
    or per pass cost more in page faults than the reads). No reading thread: on two cores the
    kernels use both, and a thread reading ahead only took turns with them (measured slower), while
    the memory of a second set of buffers is better spent on larger chunks.
    """
    x = store["X"]
    n = len(indptr) - 1
    starts = list(range(0, n, chunk_cells))
    if not starts:
        return
    largest = int(np.diff(np.append(indptr[starts], indptr[-1])).max())
    names = ("indices", "data") if with_data else ("indices",)
    for name in names:
        if name not in buffers or len(buffers[name]) < largest or buffers[name].dtype != x[name].dtype:
            buffers[name] = np.empty(largest, x[name].dtype)
    fd = os.open(store.filename, os.O_RDONLY)
    try:
        direct = {name: _FileRanges.of(x[name], fd) for name in names}
        for start in starts:
            stop = min(n, start + chunk_cells)
            lo, hi = int(indptr[start]), int(indptr[stop])
            out = {}
            for name in names:
                out[name] = buffers[name][: hi - lo]
                if hi > lo and direct[name] is not None:
                    direct[name].read_into(out[name], lo, hi)
                elif hi > lo:
                    x[name].read_direct(out[name], np.s_[lo:hi], np.s_[0:hi - lo])
            yield start, indptr[start:stop + 1] - lo, out["indices"], out.get("data")
    finally:
        os.close(fd)


@numba.njit(cache=True, nogil=True)
def _log2_cpm(indptr, counts):
    """log2(CPM + 1) of a chunk of UMI counts, as the -log2 matrices hold (float64)."""
    out = np.empty(counts.shape[0])
    for row in range(indptr.shape[0] - 1):
        scale = _cpm_scale(counts, indptr[row], indptr[row + 1])
        for k in range(indptr[row], indptr[row + 1]):
            out[k] = np.log2(np.float64(counts[k]) * scale + 1.0)
    return out


@dataclass
class Partial:
    """Base-grouping statistics of one matrix file, before merging with the dataset's other files."""

    source: str
    normalization: str
    n_cells_in_file: int
    n_cells_aggregated: int
    stats: dict[str, GroupStats]


def _bad_gene_index(path: Path, n_genes: int) -> AggregationError:
    return AggregationError(f"{path}: X/indices holds a gene index outside 0..{n_genes - 1}")


def _cached_fraction(fd: int) -> float:
    """Fraction of the file's pages in the page cache (``mincore`` on a mapping never touched)."""
    size = os.fstat(fd).st_size
    if not size:
        return 1.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return 0.0
    try:
        pages = np.zeros(-(-size // mmap.PAGESIZE), np.uint8)
        return float((pages & 1).mean()) if libc.mincore(address, size, pages.ctypes.data) == 0 else 0.0
    finally:
        libc.munmap(address, size)


def _in_small_pages(shape: int | tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised array in 4 KB pages, for memory written in order and once: numpy asks for
    transparent huge pages for large arrays, whose first touch measured about 6x slower on the
    VMs this ran on (benchmarks/first_touch.py) and which only pay back in fewer TLB misses under
    random access; the file-order slots, updated at random, keep them (measured faster there)."""
    count = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)


def _aggregate_in_group_order(matrix: _Matrix, ranges: Mapping[str, _FileRanges],
                              codes: Mapping[str, tuple[np.ndarray, pd.DataFrame]],
                              chunk_cells: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Per base grouping: the rows of each group read together (``pread`` at their offsets, a row at
    a time into a per-thread buffer that stays in cache, in batches of ``chunk_cells`` rows) and
    summed in dense per-thread accumulators, so each group's pairs are written once, already in
    CSR order. Returns indptr, indices, sums, nonzero."""
    path, indptr, n_genes, raw = matrix.path, matrix.indptr, len(matrix.genes), matrix.normalization == "raw"
    lengths = np.diff(indptr)
    threads = _threads()
    readers = {name: r.reader for name, r in ranges.items()}
    longest = int(lengths.max()) if len(lengths) else 0
    row_buffers = {name: np.empty((threads, longest), r.dtype) for name, r in ranges.items()}
    stage = (np.empty((threads, 0), np.int32), np.empty((threads, 0, 2)), np.empty((threads, 0), np.uint32))
    scratch, scratch_nonzero = np.zeros((threads, n_genes, 2)), np.zeros((threads, n_genes), np.uint32)
    carries = [(np.zeros((n_genes, 2)), np.zeros(n_genes, np.uint32)) for _ in range(2)]  # in, out: swapped
    out: dict[str, tuple[np.ndarray, ...]] = {}
    if codes:  # rows of no group are not aggregated, but a bad index makes a bad file all the same
        ungrouped = np.flatnonzero(next(iter(codes.values()))[0] < 0)
        with _PARALLEL:
            outside, ended = _count_outside(readers["indices"], indptr, ungrouped, n_genes, row_buffers["indices"])
        _ended_early(ended)
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
            bounds = _cut_runs(row_group, local_indptr, np.arange(len(rows)), 0, threads)
            with _PARALLEL:
                staged, outside, ended = _accumulate_groups(
                    readers["indices"], readers["data"], indptr, rows, row_group, bounds, n_genes, raw,
                    row_buffers["indices"], row_buffers["data"], carry_in, carry_on, scratch, scratch_nonzero,
                    *carries[0], *carries[1], *stage, group_pairs)
                carries.reverse()
                _ended_early(ended)
                if outside:
                    raise _bad_gene_index(path, n_genes)
                written = _unstage(staged, *stage, written, indices, sums, nonzero)
        group_indptr = np.zeros(len(groups) + 1, np.int64)
        np.cumsum(group_pairs, out=group_indptr[1:])
        out[grouping] = (group_indptr, indices[:written], sums[:written], nonzero[:written])
    return out


def _aggregate_in_file_order(store: h5py.File, matrix: _Matrix, codes: Mapping[str, tuple[np.ndarray, pd.DataFrame]],
                             chunk_cells: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Per base grouping, from two sequential passes over X in row chunks: mark the pairs present
    in a bitmap, then add each value into its pair's slot. Returns indptr, indices, sums, nonzero."""
    path, n_genes, raw = matrix.path, len(matrix.genes), matrix.normalization == "raw"
    accumulators = {g: _Accumulator(len(groups), n_genes) for g, (_, groups) in codes.items()}
    buffers: dict[str, np.ndarray] = {}
    for start, indptr, indices, _ in _chunks(store, matrix.indptr, chunk_cells, False, buffers):
        for grouping, accumulator in accumulators.items():
            if accumulator.mark(codes[grouping][0][start:start + len(indptr) - 1], indptr, indices):
                raise _bad_gene_index(path, n_genes)
    for accumulator in accumulators.values():
        accumulator.allocate()
    for start, indptr, indices, data in _chunks(store, matrix.indptr, chunk_cells, True, buffers):
        values = _log2_cpm(indptr, data) if raw else data
        for grouping, accumulator in accumulators.items():
            accumulator.add_values(codes[grouping][0][start:start + len(indptr) - 1], indptr, indices, values)
    buffers = indptr = indices = data = values = None  # freed before the gene indices come
    return {grouping: accumulator.finish() for grouping, accumulator in accumulators.items()}


def aggregate_matrix(h5ad_path: Path, assignments: pd.DataFrame, taxonomy: pd.DataFrame | ClusterTaxonomy, *,
                     chunk_cells: int = DEFAULT_CHUNK_CELLS, groupings: Sequence[str] = GROUPINGS,
                     group_order: bool | None = None) -> Partial:
    """Aggregate one h5ad file (streamed in row chunks) into base-grouping statistics, in memory.

    ``assignments`` has ``cell_label, cluster_alias, region_of_interest_acronym``; matrix rows it does
    not list (cells QC'd out) or that have no cluster are skipped. ``group_order``: read the rows of
    each group together rather than in two sequential passes; it needs X stored unfiltered, and by
    default it is chosen when the file is in the page cache: its reads are scattered, which a
    disk serves many times slower than sequential ones.
    """
    path = Path(h5ad_path)
    tax = taxonomy if isinstance(taxonomy, ClusterTaxonomy) else ClusterTaxonomy(taxonomy)
    base = _base_groupings(groupings)
    try:
        # No chunk cache: each chunk of X is read once, straight into the buffers.
        with h5py.File(path, "r", rdcc_nbytes=0) as store:
            matrix = _open_matrix(path, store)
            codes = _row_codes(matrix, assignments, tax, base)
            matrix.cell_labels = matrix.cell_labels[:0]  # not needed past the codes: free it before the peak
            fd = os.open(path, os.O_RDONLY)
            try:
                ranges = {name: _FileRanges.of(store["X"][name], fd) for name in ("indices", "data")}
                direct = all(r is not None for r in ranges.values())
                if group_order and not direct:
                    raise AggregationError(f"{path}: X is stored filtered (compressed): it can only be read in "
                                           "file order")
                if group_order or (group_order is None and direct and _cached_fraction(fd) >= _CACHED_ENOUGH):
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
    return Partial(str(path), matrix.normalization, matrix.n_cells, aggregated, stats)


def _base_groupings(groupings: Sequence[str]) -> list[str]:
    unknown = set(groupings) - set(GROUPINGS)
    if unknown:
        raise AggregationError(f"unknown groupings {sorted(unknown)}; known: {list(GROUPINGS)}")
    base = ["cluster"] if set(groupings) & set(TAXONOMY_LEVELS) else []
    return base + ([REGION_SUBCLASS] if REGION_SUBCLASS in groupings else [])


# --- partials on disk --------------------------------------------------------------------------

_STAT_ARRAYS = ("indptr", "indices", "sums", "nonzero")
# Bump when what a partial holds or how it is computed changes: older partials are then never reused.
PARTIAL_FORMAT = 1


def save_partial(partial: Partial, path: Path, inputs: str | None = None) -> Path:
    """Write a partial as one uncompressed .npz, atomically (temporary name, then rename)."""
    arrays: dict[str, np.ndarray] = {}
    genes = next(iter(partial.stats.values())).genes if partial.stats else pd.DataFrame(
        {"gene_identifier": [], "gene_symbol": []})
    arrays["gene_identifier"] = genes["gene_identifier"].to_numpy(dtype=str)
    arrays["gene_symbol"] = genes["gene_symbol"].to_numpy(dtype=str)
    for grouping, stats in partial.stats.items():
        for column in ("group_label", "region_of_interest_acronym"):
            arrays[f"{grouping}.{column}"] = stats.groups[column].to_numpy(dtype=str)
        arrays[f"{grouping}.n_cells"] = stats.groups["n_cells"].to_numpy(np.int64)
        for name in _STAT_ARRAYS:
            arrays[f"{grouping}.{name}"] = getattr(stats, name)
    info = {"source": partial.source, "normalization": partial.normalization,
            "n_cells_in_file": partial.n_cells_in_file, "n_cells_aggregated": partial.n_cells_aggregated,
            "groupings": list(partial.stats), "inputs": inputs}
    arrays["info"] = np.array(json.dumps(info))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    with os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)
    return path


def load_partial(path: Path) -> Partial:
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
    return Partial(info["source"], info["normalization"], info["n_cells_in_file"], info["n_cells_aggregated"], stats)


def aggregate_file(h5ad_path: Path, assignments: pd.DataFrame, taxonomy: pd.DataFrame | ClusterTaxonomy,
                   out_path: Path, *, chunk_cells: int = DEFAULT_CHUNK_CELLS,
                   groupings: Sequence[str] = GROUPINGS, inputs: str | None = None) -> Path:
    """Aggregate one h5ad file and persist its partial result at ``out_path`` (.npz); return the path.

    ``inputs`` (:func:`inputs_digest`) is kept in the partial so that a later release can reuse it.

    This is the unit of parallel work: partials of a dataset's files are merged by
    :func:`merge_partials`, in any order.
    """
    partial = aggregate_matrix(h5ad_path, assignments, taxonomy, chunk_cells=chunk_cells, groupings=groupings)
    log.info("aggregated %s: %d of %d cells", h5ad_path, partial.n_cells_aggregated, partial.n_cells_in_file)
    return save_partial(partial, Path(out_path), inputs)


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
    accumulator = _Accumulator(len(groups), len(genes))
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


def merge_partials(partials: Sequence[Partial], grouping: str) -> GroupStats:
    """Sum one base grouping over a dataset's files; groups with no cells are left out."""
    parts = [p.stats[grouping] for p in partials if grouping in p.stats]
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


def dataset_stats(partials: Sequence[Partial], taxonomy: pd.DataFrame | ClusterTaxonomy,
                  groupings: Sequence[str] = GROUPINGS) -> Iterator[GroupStats]:
    """Every requested grouping of one dataset, one at a time, so memory holds at most two levels."""
    tax = taxonomy if isinstance(taxonomy, ClusterTaxonomy) else ClusterTaxonomy(taxonomy)
    base = _base_groupings(groupings)
    if "cluster" in base:
        clusters = merge_partials(partials, "cluster")
        for level in TAXONOMY_LEVELS:
            if level in groupings:
                yield clusters if level == "cluster" else roll_up(clusters, tax, level)
        del clusters
    if REGION_SUBCLASS in base:
        yield merge_partials(partials, REGION_SUBCLASS)


# --- PostgreSQL: binary COPY of array rows, staging and publication ----------------------------

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_INT4, _FLOAT8 = 23, 701


def _array_field(values: np.ndarray, oid: int) -> bytes:
    """One int4[]/float8[] value in PostgreSQL's binary array format."""
    if len(values) == 0:
        body = struct.pack(">iii", 0, 0, oid)
    else:
        kind = ">i4" if oid == _INT4 else ">f8"
        elements = np.empty(len(values), dtype=[("length", ">i4"), ("value", kind)])
        elements["length"] = elements.dtype["value"].itemsize
        elements["value"] = values
        body = struct.pack(">iiiii", 1, 0, oid, len(values), 1) + elements.tobytes()
    return struct.pack(">i", len(body)) + body


def _text_field(value: str) -> bytes:
    encoded = value.encode()
    return struct.pack(">i", len(encoded)) + encoded


def _int_field(value: int) -> bytes:
    return struct.pack(">ii", 4, value)


@contextmanager
def _binary_copy(conn: psycopg.Connection, table: sql.Identifier,
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


def _stage_grouping(conn: psycopg.Connection, release: str, dataset: str, stats: GroupStats,
                    names: Mapping[str, str], staged: Mapping[str, sql.Identifier]) -> int:
    """Copy one grouping into the staging tables: its groups, group-major and gene-major arrays."""
    head = (_text_field(release), _text_field(dataset), _text_field(stats.grouping))
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
    with _binary_copy(conn, staged["expression_group_major"],
                      [*columns, "group_index", "gene_index", "n_nonzero", "sum", "sum_sq"]) as row:
        for group in range(len(groups)):
            lo, hi = stats.indptr[group], stats.indptr[group + 1]
            if hi > lo:
                row(*head, _int_field(group), _array_field(stats.indices[lo:hi], _INT4),
                    _array_field(n_nonzero[lo:hi], _INT4), _array_field(total[lo:hi], _FLOAT8),
                    _array_field(total_sq[lo:hi], _FLOAT8))
    order = sp.csr_matrix((np.arange(stats.n_pairs, dtype=np.int64), stats.indices, stats.indptr),
                          shape=(len(groups), len(stats.genes))).tocsc()
    order.sort_indices()
    with _binary_copy(conn, staged["expression_gene_major"],
                      [*columns, "gene_index", "group_index", "n_nonzero", "sum", "sum_sq"]) as row:
        for gene in range(len(stats.genes)):
            lo, hi = order.indptr[gene], order.indptr[gene + 1]
            if hi > lo:
                pick = order.data[lo:hi]
                row(*head, _int_field(gene), _array_field(order.indices[lo:hi], _INT4),
                    _array_field(n_nonzero[pick], _INT4), _array_field(total[pick], _FLOAT8),
                    _array_field(total_sq[pick], _FLOAT8))
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
        # No statistics of the arrays, as on the parent (sql/013): no query filters on them, and
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
            for partial in loaded:
                copy.write_row((release, dataset, partial.source, partial.normalization,
                                partial.n_cells_in_file, partial.n_cells_aggregated))
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


# --- a mirrored, loaded release: planning, per-file work, merge (CLI and DAG) ------------------

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


def plan_release(settings: Settings, conn: psycopg.Connection, release: str,
                 datasets: Sequence[str] | None = None) -> list[dict[str, str]]:
    """One work item per (metadata dataset, mirrored h5ad file holding its cells), ``-log2`` preferred.

    A cell's ``feature_matrix_label`` names its file's tag; the consensus WMB cells live in the
    WMB-10Xv2/v3 matrices, so items are planned from the loaded cells, not from directory names.
    """
    labels = conn.execute(sql.SQL(
        "SELECT DISTINCT dataset, feature_matrix_label FROM {} WHERE release = %s "
        "AND feature_matrix_label IS NOT NULL").format(staged_or_published(conn, "cell", release)),
        (release,)).fetchall()
    wanted = {(d, label) for d, label in labels if not datasets or d in datasets}
    missing_datasets = set(datasets or []) - {d for d, _ in wanted}
    if missing_datasets or not wanted:
        raise AggregationError(f"release {release}: no loaded cells for datasets "
                               f"{sorted(missing_datasets) or 'any'}; load the release's metadata first")
    engine = db.make_engine(settings.database_url)
    try:
        files = release_files_on_disk(settings, engine, release, kinds=["expression_matrices"],
                                      keep=settings.run_scope.feeds_warehouse)
    finally:
        engine.dispose()
    by_tag: dict[str, tuple[str, Path]] = {}
    for key, path in files.items():
        if not key.endswith(".h5ad"):
            continue
        tag = PurePosixPath(key).name.rsplit("-", 1)[0]
        if tag not in by_tag or normalization_of(path) == "log2":
            by_tag[tag] = (key, path)
    unmatched = sorted(f"{d}:{label}" for d, label in wanted if label not in by_tag)
    if unmatched:
        raise AggregationError(f"release {release}: no mirrored matrix for feature_matrix_label {unmatched[:5]}")
    return [{"dataset": d, "key": by_tag[label][0], "path": str(by_tag[label][1])} for d, label in sorted(wanted)]


def default_work_dir(settings: Settings, release: str) -> Path:
    """Partials go beside the mirror, so every worker that reads the mirror sees them."""
    return settings.mirror_path / ".abc-work" / release / "aggregate"


def partial_path(work_dir: Path, item: Mapping[str, str]) -> Path:
    """Where the partial of a planned item goes: ``<work_dir>/<dataset>/<file name>.npz``."""
    return Path(work_dir) / item["dataset"] / (PurePosixPath(item["key"]).name + ".npz")


def inputs_digest(matrix_md5: str, assignments: pd.DataFrame, taxonomy: pd.DataFrame) -> str:
    """What a file's partial depends on, as one digest: the statistics' definition (PARTIAL_FORMAT), the
    matrix's bytes (MD5), the assignments of its cells and the taxonomy. Equal digests give equal
    partials, so a partial can be reused."""
    digest = hashlib.sha256(f"{PARTIAL_FORMAT}:{matrix_md5}".encode())
    for frame in (assignments, taxonomy):
        ordered = frame.sort_values(list(frame.columns), kind="stable").reset_index(drop=True)
        digest.update(pd.util.hash_pandas_object(ordered, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def partial_inputs(path: Path) -> str | None:
    """The inputs digest a partial was written with (None for a partial without one)."""
    with np.load(path) as stored:
        return json.loads(str(stored["info"])).get("inputs")


def aggregate_planned_file(settings: Settings, release: str, item: Mapping[str, str], work_dir: Path,
                   chunk_cells: int = DEFAULT_CHUNK_CELLS, earlier: Sequence[Path] = ()) -> dict[str, str]:
    """Aggregate one planned file for one dataset into its partial; safe to re-run (rewritten whole).

    Only the file's own cells are read from the warehouse (by ``feature_matrix_label``). When one of
    the ``earlier`` partials (other releases' partials of this file) was written from the same inputs
    (:func:`inputs_digest`), it is linked into place instead of reading the matrix again.
    """
    out = partial_path(work_dir, item)
    label = PurePosixPath(item["key"]).name.rsplit("-", 1)[0]
    with db.copy_connection(settings.database_url) as conn:
        assignments = cell_assignments(conn, release, item["dataset"], label)
        taxonomy = release_taxonomy(conn, release)
        md5 = conn.execute("SELECT md5 FROM abc.release_file WHERE release = %s AND relative_path = %s",
                           (release, item["key"])).fetchone()
    if md5 is None:
        raise AggregationError(f"release {release}: {item['key']} is not a file of its manifest")
    inputs = inputs_digest(md5[0], assignments, taxonomy)
    for candidate in earlier:
        if candidate.is_file() and partial_inputs(candidate) == inputs:
            place_copy(candidate, out)
            log.info("%s (%s): inputs unchanged; partial %s reused", item["key"], item["dataset"], candidate)
            return {"dataset": item["dataset"], "partial": str(out), "reused": str(candidate)}
    aggregate_file(Path(item["path"]), assignments, taxonomy, out, chunk_cells=chunk_cells, inputs=inputs)
    return {"dataset": item["dataset"], "partial": str(out)}


def stage_items(settings: Settings, release: str, done: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """Merge the partials of the aggregated items per dataset and stage the expression tables."""
    partials: dict[str, list[Path]] = {}
    for item in done:
        partials.setdefault(item["dataset"], []).append(Path(item["partial"]))
    with db.copy_connection(settings.database_url) as conn:
        return merge_and_stage(conn, release, partials, release_taxonomy(conn, release))
