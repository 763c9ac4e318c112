"""Where the time of one aggregation goes: seconds inside each step of etl.aggregate, in process.

    .venv/bin/python benchmarks/aggregate_phases.py --order group|file [--chunk-cells N] [--cells 300000]
        [--matrix prefix2000-log2.h5ad]

Uses the file bench_aggregate.py generates (run that first with --keep). The file is read once
before timing, as the benchmark does, so that it is in the page cache. A step's time includes
the steps it calls and, on its first call in the process, loading numba's cached kernels
(``kernels.accumulate_groups`` reads each row, ``kernels.count_outside`` checks the rows of no group).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_aggregate as bench  # noqa: E402
import pandas as pd  # noqa: E402

from etl import aggregate  # noqa: E402
from etl.aggregate import h5ad, kernels, streaming  # noqa: E402

# Each step is replaced in the module its callers look it up in.
STEPS = {
    "group": [(h5ad, "open_matrix"), (streaming, "row_group_codes"), (kernels, "count_outside"),
              (kernels, "accumulate_groups"), (kernels, "unstage")],
    "file": [(h5ad, "open_matrix"), (streaming, "row_group_codes"), (h5ad, "chunks"), (kernels, "mark"),
             (kernels, "add_values"), (kernels, "genes_of_bitmap")],
}


def timed(module: ModuleType, name: str, spent: collections.Counter):
    function = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        spent[name] += time.perf_counter() - start
        return result

    def generator_wrapper(*args, **kwargs):  # chunks: time spent producing each chunk
        iterator = function(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                spent[name] += time.perf_counter() - start
            yield item

    setattr(module, name, generator_wrapper if name == "chunks" else wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", choices=sorted(STEPS), required=True)
    parser.add_argument("--chunk-cells", type=int, default=aggregate.DEFAULT_CHUNK_CELLS)
    parser.add_argument("--cells", type=int, default=300_000)
    parser.add_argument("--matrix", default=f"{bench.LABEL}-log2.h5ad",
                        help="a file beside the benchmark's, such as its row prefixes (fixed costs: prefix2000)")
    parser.add_argument("--data", type=Path, help="the benchmark's directory (default: bench_aggregate.py's for "
                        "--cells; bench_aggregate_full.py's work directory holds another)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache first (root) instead of reading "
                        "the file once")
    args = parser.parse_args()
    data = args.data or bench.WORK / f"cells{args.cells}"
    matrix = data / args.matrix
    if args.cold:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        bench.warm(matrix)
    assignments, taxonomy = bench.assignments_of(data), pd.read_csv(data / "membership.csv")
    spent: collections.Counter = collections.Counter()
    for module, name in STEPS[args.order]:
        timed(module, name, spent)
    start = time.perf_counter()
    aggregate.aggregate_matrix(matrix, assignments, taxonomy, chunk_cells=args.chunk_cells,
                               groupings=list(aggregate.TAXONOMY_LEVELS), group_order=args.order == "group")
    total = time.perf_counter() - start
    print(json.dumps({"order": args.order, "chunk_cells": args.chunk_cells, "seconds": round(total, 2),
                      "steps": {name: round(spent[name], 2) for _, name in STEPS[args.order]},
                      "peak_rss_gb": bench._peak_gb()}))


if __name__ == "__main__":
    main()
