"""Aggregation of one matrix as large as the largest real file (issue 13 part 3): cold and warm, against the
disk's sequential read rate, and the throughput curve from 100 k cells to the whole file.

    .venv/bin/python benchmarks/bench_aggregate_full.py --workdir /work/scratch/aggfull \\
        [--cells 343093] [--nnz-per-cell 5000] [--genes 32285]

The largest log2 matrix of the consensus scope is WMB-10Xv3-MB-log2.h5ad, 13.73 GB in the 20260711 manifest
(../shared/real-manifests). The file generated here has its size: ``--cells`` x ``--nnz-per-cell`` non-zeros
of 8 bytes (float32 value, int32 gene index) over ``--genes`` genes, the non-zeros of a cell drawn without
replacement from the generator's skewed gene distribution (a few genes in most cells, most in few), values
log2(CPM + 1) of small counts. Cells are in label order and their clusters (the 6,756-cluster taxonomy) are
unrelated to that order, as in the real files, so a group's rows are spread over the whole file. The
metadata is bench_aggregate.py's (one dataset, one matrix file, twelve regions).

Each measurement is one process (``bench_aggregate.py _measure``: peak RSS is its own). Cold: the page
cache dropped (``echo 3 > /proc/sys/vm/drop_caches``, root) right before; warm: the file read once
first. The disk: ``dd`` of the same file with the cache dropped. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_aggregate as bench  # noqa: E402

from etl import aggregate  # noqa: E402
from etl import fixtures as fx  # noqa: E402

BLOCK_CELLS = 10_000
UMIS_PER_NONZERO = 2.5  # mean count of a detected gene: CPM scales by the cell's total


@numba.njit(cache=True, parallel=True)
def _draw_block(nnz: np.ndarray, cumulative: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows with ``nnz[i]`` distinct genes each, drawn from ``cumulative`` (sorted gene indices), and
    log2(CPM + 1) values of geometric counts. Rows are drawn in parallel (numba's generator per thread)."""
    np.random.seed(seed)
    n_genes = len(cumulative)
    indptr = np.zeros(len(nnz) + 1, dtype=np.int64)
    for i in range(len(nnz)):
        indptr[i + 1] = indptr[i] + nnz[i]
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1], dtype=np.float32)
    for i in numba.prange(len(nnz)):
        start, stop = indptr[i], indptr[i + 1]
        taken = np.zeros(n_genes, dtype=np.bool_)
        k = start
        while k < stop:
            gene = np.searchsorted(cumulative, np.random.random() * cumulative[-1])
            if gene < n_genes and not taken[gene]:
                taken[gene] = True
                indices[k] = gene
                k += 1
        indices[start:stop] = np.sort(indices[start:stop])
        counts = 1.0 + np.floor(np.log(np.random.random(stop - start)) / np.log(1.0 - 1.0 / UMIS_PER_NONZERO))
        data[start:stop] = np.log2(counts * 1e6 / counts.sum() + 1.0).astype(np.float32)
    return indptr, indices, data


def generate(workdir: Path, cells: int, nnz_per_cell: int, genes: int) -> Path:
    """The matrix and its metadata, once (a directory per shape)."""
    out = workdir / f"nnz{nnz_per_cell}-cells{cells}-genes{genes}"
    if (out / "cell_to_cluster_membership.csv").exists():
        return out
    spec = fx.FixtureSpec(seed=7, cells=cells, genes=genes, clusters=6756, regions=12)
    gene_set, taxonomy, dataset_cells = bench.metadata_of(spec)
    obs = pd.DataFrame(index=pd.Index(np.sort(np.char.decode(dataset_cells.labels, "ascii")), name="cell_label"))
    var = pd.DataFrame({"gene_symbol": gene_set.symbols[:genes]},
                       index=pd.Index(gene_set.identifiers[:genes], name="gene_identifier"))
    cumulative = np.asarray(gene_set.background[:genes], dtype=np.float64)
    rng = np.random.default_rng(11)
    out.mkdir(parents=True, exist_ok=True)
    matrix = fx.H5adAppender(out / f"{bench.LABEL}-log2.h5ad", obs, var)
    started = time.perf_counter()
    for number, start in enumerate(range(0, cells, BLOCK_CELLS)):
        rows = min(BLOCK_CELLS, cells - start)
        nnz = np.clip(rng.normal(nnz_per_cell, 0.3 * nnz_per_cell, rows), 200, genes // 2).astype(np.int64)
        indptr, indices, data = _draw_block(nnz, cumulative, 1000 + number)
        matrix.append(sp.csr_matrix((data, indices, indptr), shape=(rows, genes)))
    matrix.close()
    bench.write_metadata(out, spec, dataset_cells, taxonomy)
    size = (out / f"{bench.LABEL}-log2.h5ad").stat().st_size
    print(json.dumps({"generated": str(out), "seconds": round(time.perf_counter() - started, 1),
                      "bytes": size}), flush=True)
    return out


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def disk_read(path: Path) -> dict:
    """``dd`` of the whole file, cold: the disk's sequential read rate for this file."""
    drop_page_cache()
    load = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    return {"tool": "dd bs=16M (cold)", "bytes": size, "seconds": round(seconds, 2),
            "mb_per_second": round(size / seconds / 1e6, 1), "load_1min": [load, os.getloadavg()[0]]}


def aggregate_once(matrix: Path, data: Path, kind: str, cold: bool) -> dict:
    """One measurement in its own process; ``cold`` drops the page cache first, else the file is read first."""
    if cold:
        drop_page_cache()
    else:
        bench.warm(matrix)
    load = os.getloadavg()[0]
    extra = [",".join(aggregate.TAXONOMY_LEVELS), str(aggregate.DEFAULT_CHUNK_CELLS)] if kind == "ours" else []
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_aggregate.py"), "_measure", kind,
                          str(matrix), str(data), *extra], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    size = matrix.stat().st_size
    result.update({"matrix": matrix.name, "bytes": size, "cache": "cold" if cold else "warm",
                   "cells_per_second": round(result["cells"] / result["seconds"]),
                   "mb_per_second": round(size / result["seconds"] / 1e6, 1),
                   "load_1min": [load, os.getloadavg()[0]]})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--cells", type=int, default=343_093)
    parser.add_argument("--nnz-per-cell", type=int, default=5000)
    parser.add_argument("--genes", type=int, default=32_285)
    parser.add_argument("--scanpy-cells", type=int, default=100_000, help="the prefix scanpy aggregates (in memory)")
    args = parser.parse_args()
    data = generate(args.workdir, args.cells, args.nnz_per_cell, args.genes)
    full = data / f"{bench.LABEL}-log2.h5ad"
    prefixes = {rows: bench.row_prefix(full, rows) for rows in (100_000, 200_000) if rows < args.cells}
    aggregate_once(bench.row_prefix(full, 2000), data, "ours", cold=False)  # numba's kernels compiled and cached
    print(json.dumps(disk_read(full)), flush=True)
    print(json.dumps(aggregate_once(full, data, "ours", cold=True)), flush=True)
    print(json.dumps(aggregate_once(full, data, "ours", cold=False)), flush=True)
    for matrix in prefixes.values():
        print(json.dumps(aggregate_once(matrix, data, "ours", cold=True)), flush=True)
        print(json.dumps(aggregate_once(matrix, data, "ours", cold=False)), flush=True)
    scanpy_matrix = prefixes.get(args.scanpy_cells, full)
    print(json.dumps(aggregate_once(scanpy_matrix, data, "ours", cold=False)), flush=True)
    print(json.dumps(aggregate_once(scanpy_matrix, data, "scanpy", cold=False)), flush=True)


if __name__ == "__main__":
    main()
