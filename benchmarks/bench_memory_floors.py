"""The memory floor of each stage at full size (issue 13 part 4): the lowest cgroup memory limit at which the
stage still succeeds, for the README's hardware requirements.

    .venv/bin/python benchmarks/bench_memory_floors.py --bucket /work/scratch/full/bucket-7651713-6721 \\
        --workdir /work/scratch/memfloor [--matrix-data /work/scratch/aggfull/nnz5000-cells343093-genes32285] \\
        [--limits 384,256,192,160,128]

A fresh database; the bucket (``fixture make --metadata-only`` at 7,651,713 cells, as bench_release_dag.py
generates it) served by ``rclone serve s3``; ``discover``. Then each stage is run under each limit in turn
(:func:`memory_floor.run_limited`, a cgroup v1 memory limit; root) until one fails: mirroring the first
release (a fresh target each attempt), loading it (later attempts reload it: the same COPY, indexes,
checks and publication), loading the next release (20260331: AIBS re-versioned, with its diff), the diff
of the two, ``status``, and the aggregation of ``--matrix`` (a file bench_aggregate_full.py generates,
beside its metadata), whose memory grows with the (group, gene) pairs it holds, so its limits are its
own. The PostgreSQL server is outside the cgroup: its memory is its settings', printed at the start.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from memory_floor import run_limited  # noqa: E402

from etl import aggregate, db  # noqa: E402
from etl.fixtures import NEW_RELEASE, OLD_RELEASE, UNCHANGED_RELEASE  # noqa: E402
from etl.s3server import start_s3_server  # noqa: E402

SERVER = os.environ.get("ABC_TEST_SERVER_URL", "postgresql+psycopg2://postgres@127.0.0.1:55432/postgres")
CLI = [sys.executable, "-c", "import sys; from etl.cli import main; sys.exit(main(sys.argv[1:]))"]


def floor(title: str, command: list[str], limits: list[int]) -> None:
    """Run ``command`` under each limit until it fails; print a table row per attempt."""
    print(f"\n{title}\n\n| limit (MiB) | exit | seconds | cgroup peak (MiB, incl. page cache) | OOM kills |\n"
          "|---:|---:|---:|---:|---:|", flush=True)
    for n, limit in enumerate(limits):
        result = run_limited([part.replace("{n}", str(n)) for part in command], limit)
        print(f"| {limit} | {result['exit']} | {result['seconds']} | {result['peak_mib']} | {result['oom_kills']} |",
              flush=True)
        if result["exit"] != 0:
            print("    " + result["tail"][-400:].replace("\n", "\n    "), flush=True)
            break


def unlimited(command: list[str]) -> None:
    started = time.perf_counter()
    result = run_limited(command, 16384)
    if result["exit"] != 0:
        raise SystemExit(f"{' '.join(command[3:])} failed without a limit:\n{result['tail']}")
    print(f"(setup) {' '.join(command[3:])}: {time.perf_counter() - started:.1f} s, peak {result['peak_mib']} MiB",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bucket", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--matrix", type=Path)
    parser.add_argument("--limits", default="384,192,128,96")
    parser.add_argument("--aggregation-limits", default="4608,4096,3584,3072")
    parser.add_argument("--database", default="memfloor")
    args = parser.parse_args()
    limits = [int(x) for x in args.limits.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    url = f"{SERVER.rsplit('/', 1)[0]}/{args.database}"
    db.drop_database(url)
    db.create_database(url)
    db.upgrade(db.make_engine(url))
    with db.copy_connection(url) as conn:
        settings = conn.execute("SELECT string_agg(name || ' = ' || current_setting(name), ', ') FROM "
                                "pg_settings WHERE name IN ('shared_buffers', 'work_mem', 'maintenance_work_mem', "
                                "'max_parallel_maintenance_workers', 'max_wal_size')").fetchone()[0]
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; PostgreSQL (outside the cgroup): {settings}; the load sets "
          "maintenance_work_mem 512MB on each of its ABC_LOAD_CONNECTIONS (2) connections", flush=True)
    server = start_s3_server(args.bucket)
    env = {"PYTHONPATH": str(REPO), "ABC_DATABASE_URL": url, "ABC_MIRROR_ROOT": str(args.workdir / "mirror"),
           "ABC_STAGE_OWNER": "bench_memory_floors", "AWS_ENDPOINT_URL_S3": server.endpoint_url}
    os.environ.update(env)  # the attempts' environment (run_limited starts them with this process's)
    try:
        unlimited([*CLI, "discover"])
        floor(f"mirror {OLD_RELEASE} (a fresh target each attempt)",
              [*CLI, "mirror", "--release", OLD_RELEASE, "--no-progress", "--target",
               str(args.workdir / "mirror-floor-{n}")], limits)
        unlimited([*CLI, "mirror", "--release", OLD_RELEASE, "--no-progress"])
        floor(f"load {OLD_RELEASE} (7,651,713 cells; later attempts reload it)",
              [*CLI, "load", "--release", OLD_RELEASE], limits)
        for release in (UNCHANGED_RELEASE, NEW_RELEASE):
            unlimited([*CLI, "mirror", "--release", release, "--no-progress"])
        unlimited([*CLI, "load", "--release", UNCHANGED_RELEASE])
        floor(f"load {NEW_RELEASE} (AIBS re-versioned; checks, publication and the stored diff)",
              [*CLI, "load", "--release", NEW_RELEASE], limits)
        floor(f"diff {OLD_RELEASE} {NEW_RELEASE}", [*CLI, "diff", OLD_RELEASE, NEW_RELEASE], limits)
        floor("status", [*CLI, "status"], limits)
    finally:
        server.stop()
    if args.matrix:
        floor(f"aggregation of {args.matrix.name} ({args.matrix.stat().st_size / 1e9:.2f} GB; taxonomy levels, "
              f"chunks of {aggregate.DEFAULT_CHUNK_CELLS} cells)",
              [sys.executable, str(REPO / "benchmarks" / "bench_aggregate.py"), "_measure", "ours", str(args.matrix),
               str(args.matrix.parent), ",".join(aggregate.TAXONOMY_LEVELS), str(aggregate.DEFAULT_CHUNK_CELLS)],
              [int(x) for x in args.aggregation_limits.split(",")])

if __name__ == "__main__":
    main()
