"""Aggregation benchmark: etl.aggregate side by side with scanpy's sc.get.aggregate, then the two
analyst queries on the published tables.

    .venv/bin/python benchmarks/bench_aggregate.py [--cells 300000] [--settle 10] [--keep] [--no-queries]

Generates (once, under benchmarks/work/aggregate/) a release-shaped h5ad of ``--cells`` cells x
32,000 genes over the 6,756-cluster taxonomy (~1,900 non-zeros per cell), plus 1/3 and 2/3
row prefixes of it for the scaling series. Every measurement runs in its own process so that
peak RSS (``ru_maxrss``) is that measurement's own. Deletes the multi-GB files unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from etl import aggregate, db  # noqa: E402
from etl import fixtures as fx  # noqa: E402
from etl.aggregate import h5ad  # noqa: E402

WORK = REPO / "benchmarks" / "work" / "aggregate"
LABEL = "Consensus-Mouse-Macosko-10X-BENCH"
DATASET = fx.MACOSKO


def generate(cells: int) -> Path:
    """The benchmark matrix (one file, twelve regions inside it), its cell metadata and taxonomy."""
    out = WORK / f"cells{cells}"
    if (out / "cell_to_cluster_membership.csv").exists():
        return out
    spec = fx.FixtureSpec(seed=7, cells=cells, genes=32000, clusters=6756, regions=12, umis_per_cell=4000)
    genes, taxonomy, dataset_cells = metadata_of(spec)
    fx.write_matrices(spec, out, dataset_cells, genes, taxonomy, LABEL, block_cells=10_000)
    (out / f"{LABEL}-raw.h5ad").unlink()  # the benchmark reads the -log2 file
    write_metadata(out, spec, dataset_cells, taxonomy)
    return out


def metadata_of(spec: fx.FixtureSpec) -> tuple[fx.Genes, fx.Taxonomy, fx.DatasetCells]:
    """The genes, taxonomy and cells (all in one matrix file, ``LABEL``) of a benchmark dataset."""
    genes, taxonomy = fx.make_genes(spec), fx.make_taxonomy(spec)
    dataset_cells = fx.make_dataset_cells(spec, DATASET, taxonomy, spec.cells)
    dataset_cells.frame["feature_matrix_label"] = LABEL
    return genes, taxonomy, dataset_cells


def write_metadata(out: Path, spec: fx.FixtureSpec, dataset_cells: fx.DatasetCells, taxonomy: fx.Taxonomy) -> None:
    """The consensus layout: cell_metadata.csv, library.csv (region) and cell_to_cluster_membership.csv
    (written last: its presence says the data is complete), and the taxonomy as membership.csv."""
    fx.write_metadata_dir(out, dataset_cells, None)
    listed = fx.metadata_cells(dataset_cells)
    listed[["cell_label", "cluster_alias"]].to_csv(out / "cell_to_cluster_membership.csv.tmp", index=False)
    tables = fx.taxonomy_tables(taxonomy, np.bincount(dataset_cells.cluster, minlength=spec.clusters))
    tables["cluster_to_cluster_annotation_membership"].to_csv(out / "membership.csv", index=False)
    (out / "cell_to_cluster_membership.csv.tmp").rename(out / "cell_to_cluster_membership.csv")


def assignments_of(data: Path) -> pd.DataFrame:
    """Each cell's cluster (cell_to_cluster_membership.csv) and region (its library's, library.csv)."""
    cells = pd.read_csv(data / "cell_metadata.csv", usecols=["cell_label", "library_label"])
    library = pd.read_csv(data / "library.csv", usecols=["library_label", "region_of_interest_acronym"])
    cluster = pd.read_csv(data / "cell_to_cluster_membership.csv")
    cells = cells.merge(cluster, on="cell_label", how="left").merge(library, on="library_label", how="left")
    return cells[["cell_label", "cluster_alias", "region_of_interest_acronym"]]


def row_prefix(source: Path, rows: int) -> Path:
    """The first ``rows`` cells of the benchmark file as an h5ad of their own (same genes)."""
    target = source.with_name(f"prefix{rows}-log2.h5ad")
    if target.exists():
        return target
    tmp = target.with_name(target.name + ".tmp")
    with h5py.File(source, "r") as src, h5py.File(tmp, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        src.copy(src["var"], dst, "var")
        for name in src:
            if name not in ("X", "obs", "var"):
                src.copy(src[name], dst, name)
        obs = dst.create_group("obs")
        for key, value in src["obs"].attrs.items():
            obs.attrs[key] = value
        index = src["obs"].attrs["_index"]
        obs.create_dataset(index, data=src["obs"][index][:rows])
        for key, value in src["obs"][index].attrs.items():
            obs[index].attrs[key] = value
        x = dst.create_group("X")
        for key, value in src["X"].attrs.items():
            x.attrs[key] = value
        x.attrs["shape"] = np.array([rows, src["X"].attrs["shape"][1]])
        indptr = src["X/indptr"][: rows + 1]
        x.create_dataset("indptr", data=indptr)
        for name in ("indices", "data"):
            copied = x.create_dataset(name, shape=(indptr[-1],), dtype=src[f"X/{name}"].dtype, chunks=(1 << 16,))
            for start in range(0, int(indptr[-1]), 1 << 26):  # in blocks: this process stays small
                stop = min(int(indptr[-1]), start + (1 << 26))
                copied[start:stop] = src[f"X/{name}"][start:stop]
    tmp.rename(target)
    return target


def _peak_gb() -> float:
    """Peak RSS of this process image (VmHWM); ru_maxrss would include the parent's RSS at fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6  # kB -> GB
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_ours(matrix: Path, data: Path, groupings: list[str], chunk_cells: int) -> dict:
    assignments = assignments_of(data)
    taxonomy = pd.read_csv(data / "membership.csv")
    base_rss = _peak_gb()
    fd = os.open(matrix, os.O_RDONLY)
    try:  # read in group order from 0.9 up, else in file order
        page_cached = h5ad.cached_fraction(fd)
    finally:
        os.close(fd)
    start = time.perf_counter()
    loaded = aggregate.aggregate_matrix(matrix, assignments, taxonomy, chunk_cells=chunk_cells, groupings=groupings)
    seconds = time.perf_counter() - start
    peak = _peak_gb()
    start = time.perf_counter()
    aggregate.save_partial(loaded, WORK / "partial.npz")
    persist_seconds = time.perf_counter() - start
    pairs = sum(s.n_pairs for s in loaded.stats.values())
    groups = sum(len(s.groups) for s in loaded.stats.values())
    with h5py.File(matrix, "r") as store:
        indptr = store["X/indptr"][:]
    # Statistics and gene indices (24 B a pair); per chunk of rows at most: its indices and values
    # (8 B a non-zero) and, read in group order, its groups' staged pairs (24 B a non-zero at most);
    # read in file order, the bitmap (groups x genes / 4 B).
    batch_nnz = int(np.sort(np.diff(indptr))[-chunk_cells:].sum())  # the chunk_cells longest rows
    bound = 24 * pairs + 32 * batch_nnz + groups * 32000 / 4
    return {"tool": "etl.aggregate", "groupings": groupings, "cells": loaded.n_cells_in_file,
            "aggregated": loaded.n_cells_aggregated, "seconds": seconds, "persist_seconds": persist_seconds,
            "page_cached": round(page_cached, 3), "peak_rss_gb": peak, "peak_rss_with_persist_gb": _peak_gb(),
            "rss_before_gb": base_rss, "pairs": pairs, "bound_gb": bound / 1e9 + base_rss}


def run_scanpy(matrix: Path, data: Path) -> dict:
    import scanpy as sc

    start = time.perf_counter()
    adata = sc.read_h5ad(matrix)
    cells = pd.read_csv(data / "cell_metadata.csv", usecols=["cell_label"]).merge(
        pd.read_csv(data / "cell_to_cluster_membership.csv"), on="cell_label").set_index("cell_label")
    listed = adata.obs_names.isin(cells.index)
    adata.obs["cluster"] = pd.Categorical(cells["cluster_alias"].reindex(adata.obs_names).fillna(-1).astype(int))
    out = sc.get.aggregate(adata, by="cluster", func=["mean", "count_nonzero"], mask=listed)
    seconds = time.perf_counter() - start
    return {"tool": "scanpy sc.get.aggregate", "cells": adata.n_obs, "groups": out.n_obs, "seconds": seconds,
            "peak_rss_gb": _peak_gb()}


def warm(path: Path) -> None:
    """Read the file once, untimed, so both tools start from the page cache (this VM's memory
    reclaim evicts files idle for a minute: otherwise who reads from disk would be luck)."""
    with path.open("rb") as file:
        while file.read(64 << 20):
            pass


def measure(kind: str, *args: str, settle: float) -> dict:
    # On this VM, first touch of memory depends on what was freed just before and how long ago
    # (benchmarks/first_touch.py): a measurement right after scanpy's exit could reuse its 12 GB
    # cheaply. After ``settle`` idle seconds each measurement starts from the same state.
    time.sleep(settle)
    warm(Path(args[0]))
    load_before, steal_before = os.getloadavg()[0], _steal_seconds()
    out = subprocess.run([sys.executable, __file__, "_measure", kind, *args], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_1min"] = [load_before, os.getloadavg()[0]]  # machine load before and after
    result["steal_s"] = round(_steal_seconds() - steal_before, 2)  # CPU time the host gave to others
    return result


def _steal_seconds() -> float:
    """Time this VM's CPUs were ready to run but the host ran something else (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def query_timings(data: Path, partial: Path) -> dict:
    """Publish the full aggregation into a scratch database and time the two analyst queries (warm)."""
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/abc_bench_{uuid.uuid4().hex[:8]}"
    db.create_database(url)
    try:
        engine = db.make_engine(url)
        db.upgrade(engine)
        engine.dispose()
        taxonomy = pd.read_csv(data / "membership.csv")
        with db.copy_connection(url) as conn:
            start = time.perf_counter()
            entries = aggregate.merge_and_publish(conn, "20251031", {DATASET: [partial]}, taxonomy)
            publish_seconds = time.perf_counter() - start
            conn.execute("ANALYZE")
            conn.commit()
            size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
            name = conn.execute("SELECT group_name FROM abc.expression_group WHERE grouping = 'cluster' "
                                "ORDER BY n_cells DESC LIMIT 1").fetchone()[0]
            queries = {
                "one gene across all clusters": (
                    "SELECT group_name, mean, fraction, n_cells FROM abc.expression_by_cluster "
                    "WHERE release = '20251031' AND dataset = %s AND gene_symbol = 'Gad1'", (DATASET,)),
                "top 50 genes of one cluster": (
                    "SELECT gene_symbol, mean, fraction, n_cells FROM abc.cluster_profile "
                    "WHERE release = '20251031' AND dataset = %s AND group_name = %s "
                    "ORDER BY mean DESC LIMIT 50", (DATASET, name)),
            }
            timings = {}
            for label, (query, params) in queries.items():
                rows = len(conn.execute(query, params).fetchall())
                client, server = [], []
                for _ in range(20):
                    start = time.perf_counter()
                    conn.execute(query, params).fetchall()
                    client.append((time.perf_counter() - start) * 1000)
                    plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query, params).fetchone()[0]
                    server.append(plan[0]["Execution Time"])
                timings[label] = {"rows": rows, "client_ms_median": statistics.median(client),
                                  "explain_analyze_ms_median": statistics.median(server)}
        return {"publish_seconds": publish_seconds, "entries": entries, "database_size": size, **timings}
    finally:
        db.drop_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=300_000)
    parser.add_argument("--chunk-cells", type=int, default=aggregate.DEFAULT_CHUNK_CELLS)
    parser.add_argument("--settle", type=float, default=10.0,
                        help="idle seconds before each measurement, so freed memory is back with the host")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--no-queries", action="store_true", help="skip publishing and the analyst queries")
    args = parser.parse_args()
    start = time.perf_counter()
    data = generate(args.cells)
    full = data / f"{LABEL}-log2.h5ad"
    print(f"# data ready in {time.perf_counter() - start:.0f} s: {full} ({full.stat().st_size / 1e9:.1f} GB)")
    taxonomy_levels = ",".join(aggregate.TAXONOMY_LEVELS)
    # Compile (and cache) the numba kernels once, as any installation does on its first run.
    measure("ours", str(row_prefix(full, 2000)), str(data), taxonomy_levels, str(args.chunk_cells), settle=0)
    results = []
    for fraction in (1 / 3, 2 / 3, 1):
        rows = round(args.cells * fraction)
        matrix = full if fraction == 1 else row_prefix(full, rows)
        for kind in ("ours", "scanpy"):
            extra = [taxonomy_levels, str(args.chunk_cells)] if kind == "ours" else []
            result = measure(kind, str(matrix), str(data), *extra, settle=args.settle)
            result["cells_per_second"] = result["cells"] / result["seconds"]
            print(json.dumps(result), flush=True)
            results.append(result)
    everything = measure("ours", str(full), str(data), ",".join(aggregate.GROUPINGS), str(args.chunk_cells),
                         settle=args.settle)
    everything["cells_per_second"] = everything["cells"] / everything["seconds"]
    print(json.dumps(everything), flush=True)
    if not args.no_queries:
        print(json.dumps(query_timings(data, WORK / "partial.npz")), flush=True)
    if not args.keep:
        shutil.rmtree(WORK)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_measure":
        kind, matrix, data = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
        if kind == "ours":
            result = run_ours(matrix, data, sys.argv[5].split(","), int(sys.argv[6]))
        else:
            result = run_scanpy(matrix, data)
        print(json.dumps(result))
    else:
        main()
