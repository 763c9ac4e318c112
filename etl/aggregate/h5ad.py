"""Reading an h5ad expression matrix: its CSR X checked, rows in chunks or at their byte offsets,
and how much of the file the page cache holds."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from etl.aggregate import kernels
from etl.aggregate.stats import AggregationError

NORMALIZATIONS = ("log2", "raw")


@dataclass
class Matrix:
    """An h5ad's X as opened: what is read before its rows (:func:`open_matrix`)."""

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


def open_matrix(path: Path, store: h5py.File) -> Matrix:
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
    return Matrix(path, normalization_of(path), np.asarray(obs_index, dtype=str), genes, n_cells, indptr)


class FileRanges:
    """Where the elements of an unfiltered 1-d HDF5 dataset lie in its file, so that a range of
    them is read with ``os.preadv`` straight into a buffer. HDF5's own read of the same bytes
    costs 2-3x more in its per-chunk bookkeeping (2.10 s against 0.87 s for ``dd`` over the
    4.6 GB benchmark file); for compressed or otherwise filtered data :meth:`of` returns None and
    the caller lets HDF5 read."""

    def __init__(self, fd: int, chunk_len: int, offsets: np.ndarray, dtype: np.dtype) -> None:
        self.fd, self.chunk_len, self.offsets, self.dtype = fd, chunk_len, offsets, dtype

    @property
    def reader(self) -> tuple[int, np.ndarray, int]:
        """What the reading kernels take (:func:`kernels.read_row`): fd, chunk offsets, chunk length."""
        return self.fd, self.offsets, self.chunk_len

    @classmethod
    def of(cls, dataset: h5py.Dataset, fd: int) -> FileRanges | None:
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
        raise_if_ended_early(kernels.read_elements(self.fd, self.offsets, self.chunk_len, itemsize, lo, hi,
                                                   out.ctypes.data))


def raise_if_ended_early(ended: int) -> None:
    """The reading kernels return the file offset where a read came short, or -1."""
    if ended >= 0:
        raise OSError(f"file ends at byte {ended}, inside X")


def chunks(store: h5py.File, indptr: np.ndarray, chunk_cells: int, with_data: bool,
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
        direct = {name: FileRanges.of(x[name], fd) for name in names}
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


def cached_fraction(fd: int) -> float:
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
