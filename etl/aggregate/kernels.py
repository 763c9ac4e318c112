"""The numba kernels of aggregation: bitmaps of present (group, gene) pairs, slots by rank, rows read
with ``pread`` and summed per group; plain numpy arrays in and out (no pandas, h5py or psycopg).

Every parallel kernel gives each thread its own run of whole groups, so no two threads ever write
the same statistics. Launch them under :data:`PARALLEL`.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

SUM, SUM_SQ = 0, 1  # columns of the sums arrays (GroupStats.sums): sum, sum of squares
_ONE = np.uint64(1)

# numba's default threading layer (workqueue) must not launch parallel kernels from two threads
# at once: an application aggregating files in threads takes turns per chunk.
PARALLEL = threading.Lock()


def threads() -> int:
    """Threads for the kernels: numba's pool (NUMBA_NUM_THREADS, default one per CPU)."""
    return numba.get_num_threads()


# --- bitmap of present (group, gene) pairs, slots by rank ---------------------------------------

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
def mark(bitmap, row_group, indptr, indices, n_genes, n_threads):
    """Set the bits of the chunk's pairs; return how many column indices lie outside 0..n_genes-1
    (skipped: the file is bad, and the caller says so)."""
    # Threads take disjoint runs of groups: each sets bits in its own rows of the bitmap.
    order, bounds = group_order(row_group, indptr, n_threads)
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
def rank(bitmap):
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
def cut_runs(row_group, indptr, order, first, n_parts):
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
def group_order(row_group, indptr, n_parts):
    """Rows by group (rows without a group left out), cut into ``n_parts`` runs (:func:`cut_runs`)."""
    order = np.argsort(row_group, kind="mergesort")
    first = 0
    while first < order.shape[0] and row_group[order[first]] < 0:
        first += 1
    return order, cut_runs(row_group, indptr, order, first, n_parts)


@numba.njit(cache=True, nogil=True, parallel=True)
def add_values(bitmap, offsets, row_group, indptr, indices, data, sums, nonzero, n_threads):
    # Rows of a group one after the other: its slots stay in cache across its cells. Threads
    # take disjoint runs of groups, so they never write the same slot.
    order, bounds = group_order(row_group, indptr, n_threads)
    for part in numba.prange(n_threads):
        for position in range(bounds[part], bounds[part + 1]):
            row = order[position]
            group = row_group[row]
            for k in range(indptr[row], indptr[row + 1]):
                value = np.float64(data[k])
                if value == 0.0:
                    continue
                slot = _slot(bitmap, offsets, group, indices[k])
                sums[slot, SUM] += value
                sums[slot, SUM_SQ] += value * value
                nonzero[slot] += 1


@numba.njit(cache=True, nogil=True)
def add_stats(bitmap, offsets, row_group, indptr, indices, source_sums, source_nonzero, sums, nonzero):
    for row in range(row_group.shape[0]):
        group = row_group[row]
        if group < 0:
            continue
        for k in range(indptr[row], indptr[row + 1]):
            slot = _slot(bitmap, offsets, group, indices[k])
            sums[slot, SUM] += source_sums[k, SUM]
            sums[slot, SUM_SQ] += source_sums[k, SUM_SQ]
            nonzero[slot] += source_nonzero[k]


@numba.njit(cache=True)
def genes_of_bitmap(bitmap, n_pairs):
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
def has_empty(nonzero):
    """Whether a pair's values are all explicit zeros (no n_pairs-sized temporary, unlike numpy)."""
    k = 0
    while k < nonzero.shape[0] and nonzero[k] != 0:
        k += 1
    return k < nonzero.shape[0]


@numba.njit(cache=True)
def drop_empty(indptr, indices, sums, nonzero):
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
def read_elements(fd, chunk_offsets, chunk_len, itemsize, lo, hi, address):
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
def read_row(reader, indptr, row, buffer):
    """Row ``row``'s elements of one dataset (``reader``: fd, chunk offsets, chunk length) into
    ``buffer``; the file offset where the file ended early, else -1."""
    fd, chunk_offsets, chunk_len = reader
    return read_elements(fd, chunk_offsets, chunk_len, buffer.itemsize, indptr[row], indptr[row + 1],
                          buffer.ctypes.data)


@numba.njit(cache=True, nogil=True, parallel=True)
def count_outside(reader, indptr, rows, n_genes, row_indices):
    """Column indices of ``rows`` outside 0..n_genes-1, each row read into its thread's buffer;
    and the file offset where the file ended early, else -1."""
    n_threads = row_indices.shape[0]
    outside = np.zeros(n_threads, np.int64)
    failed = np.full(n_threads, -1, np.int64)
    per = (rows.shape[0] + n_threads - 1) // n_threads
    for part in numba.prange(n_threads):
        for position in range(part * per, min(rows.shape[0], (part + 1) * per)):
            row = rows[position]
            ended = read_row(reader, indptr, row, row_indices[part])
            if ended >= 0:
                failed[part] = ended
                break
            for k in range(indptr[row + 1] - indptr[row]):
                if row_indices[part, k] < 0 or row_indices[part, k] >= n_genes:
                    outside[part] += 1
    return outside.sum(), failed.max()


@numba.njit(cache=True, nogil=True, parallel=True)
def accumulate_groups(index_reader, data_reader, indptr, rows, row_group, bounds, n_genes, raw,
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
                ended = max(read_row(index_reader, indptr, row, genes), read_row(data_reader, indptr, row, values))
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
                        sums[gene, SUM] += value
                        sums[gene, SUM_SQ] += value * value
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
                        stage_sums[part, n, SUM] = sums[gene, SUM]
                        stage_sums[part, n, SUM_SQ] = sums[gene, SUM_SQ]
                        stage_nonzero[part, n] = nonzero[gene]
                        sums[gene, SUM] = sums[gene, SUM_SQ] = 0.0
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
            target[gene, SUM] += source[gene, SUM]
            target[gene, SUM_SQ] += source[gene, SUM_SQ]
            target_nonzero[gene] += source_nonzero[gene]
            source[gene, SUM] = source[gene, SUM_SQ] = 0.0
            source_nonzero[gene] = 0


@numba.njit(cache=True, nogil=True, parallel=True)
def unstage(staged, stage_indices, stage_sums, stage_nonzero, at, indices, sums, nonzero):
    """Append each thread's staged pairs, in thread order (= group order), at ``at``; the new end."""
    starts = np.empty(staged.shape[0], np.int64)
    position = at
    for part in range(staged.shape[0]):
        starts[part] = position
        position += staged[part]
    for part in numba.prange(staged.shape[0]):  # each thread first-touches its own share of the output
        for k in range(staged[part]):
            indices[starts[part] + k] = stage_indices[part, k]
            sums[starts[part] + k, SUM] = stage_sums[part, k, SUM]
            sums[starts[part] + k, SUM_SQ] = stage_sums[part, k, SUM_SQ]
            nonzero[starts[part] + k] = stage_nonzero[part, k]
    return position


# --- file-ordered path: raw counts of a chunk normalised as the -log2 matrices are -------------

@numba.njit(cache=True, nogil=True)
def log2_cpm(indptr, counts):
    """log2(CPM + 1) of a chunk of UMI counts, as the -log2 matrices hold (float64)."""
    out = np.empty(counts.shape[0])
    for row in range(indptr.shape[0] - 1):
        scale = _cpm_scale(counts, indptr[row], indptr[row + 1])
        for k in range(indptr[row], indptr[row + 1]):
            out[k] = np.log2(np.float64(counts[k]) * scale + 1.0)
    return out

