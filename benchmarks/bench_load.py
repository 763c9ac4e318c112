"""Metadata load speed: ``etl.load`` (COPY) vs pandas ``DataFrame.to_sql(method='multi')``, same file, one run.

Generates (once, cached in --workdir) a release whose consensus WMB cell_metadata.csv has
exactly --cells rows, with the consensus-sized taxonomy and a full gene table, then in fresh
child processes (each reports its own peak RSS, VmHWM) and a fresh database:

1. ``load_release_metadata`` of the whole release (stage, check, index, publish);
2. the same with one extra, unknown column in cell_metadata.csv (the streaming transform path);
3. ``pandas.read_csv`` + ``to_sql(method='multi')`` of cell_metadata.csv into a plain table.

    .venv/bin/python benchmarks/bench_load.py --cells 2000000 [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from etl import db
from etl.fixtures import (
    CELL_METADATA_COLUMNS,
    CONSENSUS_WMB,
    MACOSKO,
    TAXONOMY,
    FixtureSpec,
    gene_table,
    make_dataset_cells,
    make_genes,
    make_taxonomy,
    metadata_cells,
    sample_tables,
    taxonomy_tables,
    value_sets,
)

RELEASE = "20251031"
SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"

# The child's own peak resident set: ru_maxrss of a forked child also counts the parent's pages.
PEAK = """
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""

OURS = PEAK + """
import json, sys, time
from pathlib import Path
from etl.db import make_engine
from etl.load import load_release_metadata
files = {k: Path(v) for k, v in json.loads(sys.argv[3]).items()}
started = time.perf_counter()
report = load_release_metadata(make_engine(sys.argv[1]), sys.argv[2], files)
total = time.perf_counter() - started
(cells,) = [x for x in report.loaded if x.file.table == "cell"]
print(json.dumps({"seconds": total, "rows": cells.rows, "copy_seconds": cells.seconds,
                  "all_rows": sum(x.rows for x in report.loaded), "peak_kib": peak_kib()}))
"""

TO_SQL = PEAK + """
import json, sys, time
import pandas as pd, sqlalchemy as sa
engine = sa.create_engine(sys.argv[1])
started = time.perf_counter()
frame = pd.read_csv(sys.argv[2], nrows=int(sys.argv[3]) or None)
frame.to_sql("cell_to_sql", engine, if_exists="replace", index=False, method="multi", chunksize=1000)
print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(frame), "peak_kib": peak_kib()}))
"""


def write_release(workdir: Path, n_cells: int) -> dict[str, Path]:
    """The release's metadata files (cached), in the consensus layout: taxonomy of 6,756 clusters with
    cell_to_cluster_membership.csv, Macosko's gene.csv of 32,285 genes, n_cells AIBS cells with their
    library.csv, donor.csv and value_sets.csv."""
    base = workdir / "metadata"
    tax_dir = base / TAXONOMY / RELEASE
    done = tax_dir / "cell_to_cluster_membership.csv"  # written last
    if not done.exists():
        spec = FixtureSpec(cells=n_cells, genes=32285, clusters=6756, regions=15)
        taxonomy = make_taxonomy(spec)
        cells = make_dataset_cells(spec, CONSENSUS_WMB, taxonomy, int(n_cells * 1.03))
        listed = metadata_cells(cells).iloc[:n_cells]
        assert len(listed) == n_cells
        out = base / CONSENSUS_WMB / RELEASE
        out.mkdir(parents=True, exist_ok=True)
        genes_dir = base / MACOSKO / RELEASE
        genes_dir.mkdir(parents=True, exist_ok=True)
        gene_table(make_genes(spec)).to_csv(genes_dir / "gene.csv", index=False)
        for stem, table in sample_tables(cells).items():
            table.to_csv(out / f"{stem}.csv", index=False)
        value_sets(cells).to_csv(out / "value_sets.csv", index=False)
        listed[CELL_METADATA_COLUMNS].to_csv(out / "cell_metadata.csv", index=False, lineterminator="\n")
        counts = np.bincount(listed["cluster_alias"] - 1, minlength=spec.clusters)
        tax_dir.mkdir(parents=True, exist_ok=True)
        for stem, table in taxonomy_tables(taxonomy, counts).items():
            table.to_csv(tax_dir / f"{stem}.csv", index=False)
        listed[["cell_label", "cluster_alias"]].to_csv(done.with_suffix(".tmp"), index=False, lineterminator="\n")
        os.replace(done.with_suffix(".tmp"), done)
    return {p.relative_to(workdir).as_posix(): p for p in sorted(base.rglob("*.csv"))}


def with_unknown_column(workdir: Path, files: dict[str, Path]) -> dict[str, Path]:
    """A copy of the release whose cell_metadata.csv has one more column the schema does not know."""
    other = workdir / "extra-column"
    out = {}
    for rel, path in files.items():
        target = other / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            if path.name == "cell_metadata.csv":
                with open(path) as src, open(target, "w") as dst:
                    dst.write(src.readline().rstrip("\n") + ",population_sampling\n")
                    for line in src:
                        dst.write(line.rstrip("\n") + ",full\n")
            else:
                os.link(path, target)
        out[rel] = target
    return out


def fresh_database(name: str) -> str:
    url = f"{SERVER}/{name}"
    db.drop_database(url)
    db.create_database(url)
    engine = db.make_engine(url)
    db.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO abc.release (version, manifest_key, manifest_md5, manifest_size, resource_uri, n_files, "
            f"total_bytes) VALUES ('{RELEASE}', 'releases/{RELEASE}/manifest.json', "
            "'00000000000000000000000000000000', 0, 's3://allen-brain-cell-atlas/', 0, 0)")
    engine.dispose()
    return url


def measure(code: str, *args: str) -> tuple[dict, float]:
    """Run ``code`` in a child; return what it printed (JSON) and its peak RSS in MiB."""
    load_before = os.getloadavg()[0]
    result = json.loads(subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, check=True).stdout)
    result["load_1min"] = [load_before, os.getloadavg()[0]]  # machine load before and after
    return result, result["peak_kib"] / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/abc-bench-load"))
    parser.add_argument("--to-sql-rows", type=int, default=0, help="0: the whole file")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each etl.load case (fresh database each)")
    args = parser.parse_args()

    started = time.perf_counter()
    files = write_release(args.workdir, args.cells)
    extended = with_unknown_column(args.workdir, files)
    cells_csv = next(p for p in files.values() if p.name == "cell_metadata.csv")
    print(f"release ready in {time.perf_counter() - started:.0f} s: {cells_csv} "
          f"({cells_csv.stat().st_size / 1e6:.0f} MB)", flush=True)

    results = []
    for name, release in (("etl.load, known columns (raw COPY)", files),
                          ("etl.load, 1 unknown column (transform)", extended)):
        for run in range(args.repeat):
            url = fresh_database("abc_bench_load")
            result, rss = measure(OURS, url, RELEASE, json.dumps({k: str(v) for k, v in release.items()}))
            results.append((f"{name}, run {run + 1}" if args.repeat > 1 else name, result, rss))
            print(f"{results[-1][0]}: {json.dumps(result)}", flush=True)
    url = fresh_database("abc_bench_load")
    peer, rss = measure(TO_SQL, url, str(cells_csv), str(args.to_sql_rows))
    results.append(("pandas to_sql(method='multi')", peer, rss))
    print(f"pandas to_sql(method='multi'): {json.dumps(peer)}", flush=True)
    db.drop_database(url)

    print("| tool | cell rows | COPY of cell_metadata.csv | whole release load (all tables, checks, "
          "indexes, publish) | peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r, rss in results:
        copy = f"{r['copy_seconds']:.1f} s = {r['rows'] / r['copy_seconds']:,.0f} rows/s" if "copy_seconds" in r \
            else f"{r['seconds']:.1f} s = {r['rows'] / r['seconds']:,.0f} rows/s"
        whole = f"{r['seconds']:.1f} s = {r['rows'] / r['seconds']:,.0f} cell rows/s" if "copy_seconds" in r else "-"
        print(f"| {name} | {r['rows']:,} | {copy} | {whole} | {rss:,.0f} MiB |")
    peer_rate = peer["rows"] / peer["seconds"]
    print()
    for name, r, _ in results[:-1]:
        print(f"{name}: COPY {r['rows'] / r['copy_seconds'] / peer_rate:,.0f}x, whole release "
              f"{r['rows'] / r['seconds'] / peer_rate:,.0f}x to_sql(method='multi') rows/s")


if __name__ == "__main__":
    main()
