"""Release diff and data-quality checks at full size, through the CLI, each step timed with its peak RSS.

Takes a bucket tree made by ``abc-mirror fixture make --metadata-only`` (e.g. ``--cells 7651713
--clusters 6721``), serves it over S3 (rclone), and in a fresh database runs what a deployment
runs: ``discover``; ``mirror`` and ``load`` of the consensus releases (OLD; UNCHANGED, published by
reference; NEW), each ``load`` running the checks and storing the diff against the previous
release. Then ``abc-mirror diff`` of OLD/UNCHANGED, OLD/NEW and UNCHANGED/NEW on their own (with
``--baseline``, also another checkout's, its notes compared with ours); the checks of NEW, each
also timed alone; the diff's pass over the cells again with parallel query off, for the server
process's CPU time, which the machine's load does not inflate; and ``EXPLAIN (ANALYZE, BUFFERS)``
of the check ``expression_cells_match_metadata`` and of that pass (rolled back).

A metadata-only bucket has no matrices to aggregate, so the cluster-level ``abc.expression_group``
rows of NEW are made up from the metadata's cell counts (published like an aggregation's), so that
the expression check has every cell to count. Every command runs under ``/usr/bin/time -v``; the
load averages are printed before and after each step (the machine is shared).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_diff.py /path/to/bucket --workdir /path/to/work \
        [--loaded] [--baseline /path/to/older/checkout]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from etl import db, diff, quality
from etl.config import Settings
from etl.fixtures import NEW_RELEASE, OLD_RELEASE, UNCHANGED_RELEASE
from etl.publish import create_staging_table, index_staging_table, publish, staged_or_published
from etl.s3server import start_s3_server

REPO = Path(__file__).resolve().parent.parent
SERVER = "postgresql+psycopg2://postgres@127.0.0.1:55432"
CLI = [sys.executable, "-c", "import sys; from etl.cli import main; sys.exit(main(sys.argv[1:]))"]
CHECK = [sys.executable, "-c", "import sys; from etl import db, quality; "
         "r = quality.run_quality_checks(db.make_engine(sys.argv[1]), sys.argv[2]); "
         "print([(x.name, x.passed) for x in r]); sys.exit(0 if all(x.passed for x in r) else 1)"]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def timed(title: str, command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> str:
    """Run ``command`` under /usr/bin/time -v; print wall time, CPU and peak RSS; return its stdout."""
    before = load_average()
    result = subprocess.run(["/usr/bin/time", "-v", *command], env=env, cwd=cwd or log.parent, capture_output=True,
                            text=True)
    with log.open("a") as out:
        out.write(f"== {title}\n{result.stdout}\n{result.stderr}\n")
    if result.returncode != 0:
        raise SystemExit(f"{title} failed (exit {result.returncode}); see {log}")

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.*)", result.stderr).group(1).strip()

    print(f"{title:<48} wall {field('Elapsed (wall clock) time (h:mm:ss or m:ss)'):>8}  "
          f"user {field('User time (seconds)'):>7} s  sys {field('System time (seconds)'):>6} s  "
          f"peak RSS {int(field('Maximum resident set size (kbytes)')) / 1024:7.0f} MiB  "
          f"load {before} -> {load_average()}", flush=True)
    return result.stdout


def made_up_expression_groups(conn: psycopg.Connection, release: str) -> int:
    """Publish cluster-level expression_group rows of ``release`` holding each cluster's cells in the metadata."""
    staged = create_staging_table(conn, "expression_group", release)
    cell, membership = (staged_or_published(conn, t, release) for t in ("cell", "cell_cluster_membership"))
    cluster_membership = staged_or_published(conn, "cluster_membership", release)
    rows = conn.execute(psycopg.sql.SQL("""
        INSERT INTO {} (release, dataset, grouping, group_index, group_label, group_name, n_cells)
        SELECT %(r)s, c.dataset, 'cluster', row_number() OVER (PARTITION BY c.dataset ORDER BY t.cluster_alias) - 1,
               t.cluster_annotation_term_label, t.cluster_annotation_term_name, count(*)
        FROM {} c JOIN {} m ON m.release = c.release AND m.cell_label = c.cell_label
        JOIN {} t ON t.release = c.release AND t.cluster_alias = m.cluster_alias
             AND t.cluster_annotation_term_set_name = 'cluster'
        WHERE c.release = %(r)s GROUP BY c.dataset, t.cluster_alias, t.cluster_annotation_term_label,
              t.cluster_annotation_term_name""").format(staged, cell, membership, cluster_membership),
        {"r": release}).rowcount
    index_staging_table(conn, "expression_group", release)
    conn.execute(psycopg.sql.SQL("ANALYZE {}").format(staged))
    publish(conn, release, ["expression_group"])
    conn.commit()
    return rows


def explain(conn: psycopg.Connection, query: psycopg.sql.Composable, params: dict, before: str = "") -> str:
    """The plan of ``query`` as run (EXPLAIN ANALYZE executes it) after ``before``, in a transaction rolled back."""
    with conn.transaction(force_rollback=True):
        if before:
            conn.execute(before)
        rows = conn.execute(psycopg.sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + query, params).fetchall()
    return "\n".join(r[0] for r in rows)


def backend_cpu(conn: psycopg.Connection) -> float:
    """CPU seconds (user + system) the connection's server process has used (the server runs on this machine)."""
    fields = Path(f"/proc/{conn.info.backend_pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cell_pass_cpu(conn: psycopg.Connection, planned: diff.DiffQueries) -> tuple[float, float]:
    """(wall s, server CPU s) of the diff's pass over the cells, parallel query off so that one process does it
    all: a figure that the machine's load does not inflate, unlike wall time. Rolled back."""
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        conn.execute("DELETE FROM abc.release_diff_item WHERE old_release = %(old)s AND new_release = %(new)s",
                     planned.params)
        started, cpu = time.perf_counter(), backend_cpu(conn)
        conn.execute(planned.cells, planned.params).fetchall()
        return time.perf_counter() - started, backend_cpu(conn) - cpu


def load_releases(args: argparse.Namespace, url: str, env: dict[str, str], log: Path) -> None:
    """A fresh database; discover, mirror and load the consensus releases through the CLI."""
    db.drop_database(url)
    db.create_database(url)
    db.upgrade(db.make_engine(url))
    server = start_s3_server(args.bucket)
    try:
        env = {**env, "AWS_ENDPOINT_URL_S3": server.endpoint_url}
        timed("discover", [*CLI, "discover"], env, log)
        for release in (OLD_RELEASE, UNCHANGED_RELEASE, NEW_RELEASE):
            timed(f"mirror {release}", [*CLI, "mirror", "--release", release, "--no-progress"], env, log)
            timed(f"load {release} (checks, publish, diff)", [*CLI, "load", "--release", release], env, log)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bucket", type=Path, help="directory holding allen-brain-cell-atlas/ (fixture make)")
    parser.add_argument("--workdir", type=Path, required=True, help="mirror, logs, notes and plans go here")
    parser.add_argument("--database", default="abc_bench_diff")
    parser.add_argument("--loaded", action="store_true", help="the database is loaded already: diff and check only")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. `git archive` of an older commit): its "
                        "`abc-mirror diff --no-store` is timed too and its notes compared with ours")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / "bench_diff.log"
    url = f"{SERVER}/{args.database}"
    # Subprocesses run outside the repository so that PYTHONPATH alone says which code runs.
    env = {**os.environ, "PYTHONPATH": str(REPO), "ABC_DATABASE_URL": url,
           "ABC_MIRROR_ROOT": str(args.workdir / "mirror"), "ABC_STAGE_OWNER": "bench_diff"}
    code = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, load {load_average()}, "
          f"code {code.stdout.strip()}")
    if not args.loaded:
        load_releases(args, url, env, log)

    for old, new in ((OLD_RELEASE, UNCHANGED_RELEASE), (OLD_RELEASE, NEW_RELEASE), (UNCHANGED_RELEASE, NEW_RELEASE)):
        notes = timed(f"diff {old} {new}", [*CLI, "diff", old, new], env, log, args.workdir)
        (args.workdir / f"notes-{old}-{new}.md").write_text(notes)
        if args.baseline:
            theirs = timed(f"baseline diff {old} {new} --no-store", [*CLI, "diff", old, new, "--no-store"],
                           {**env, "PYTHONPATH": str(args.baseline.resolve())}, log, args.workdir)
            print(f"  baseline notes {'identical' if theirs == notes else 'DIFFER'}")
            (args.workdir / f"baseline-notes-{old}-{new}.md").write_text(theirs)

    with db.copy_connection(url) as conn:
        if conn.execute("SELECT count(*) FROM abc.expression_group WHERE release = %s",
                        (NEW_RELEASE,)).fetchone()[0] == 0:
            print(f"made up {made_up_expression_groups(conn, NEW_RELEASE)} cluster-level expression_group rows "
                  f"of {NEW_RELEASE}")
    timed(f"checks {NEW_RELEASE}", [*CHECK, url, NEW_RELEASE], env, log, args.workdir)
    with db.copy_connection(url) as conn:
        checks = quality.check_queries(conn, NEW_RELEASE)
        for name, query in checks.items():
            started, cpu = time.perf_counter(), backend_cpu(conn)
            conn.execute(query, {"r": NEW_RELEASE}).fetchone()
            print(f"  check {name}: wall {time.perf_counter() - started:.1f} s, server CPU "
                  f"{backend_cpu(conn) - cpu:.1f} s (+ parallel workers')")
        planned = diff.queries(conn, OLD_RELEASE, NEW_RELEASE, Settings.from_env().run_scope)
        wall, cpu = cell_pass_cpu(conn, planned)
        print(f"  diff {OLD_RELEASE} {NEW_RELEASE}, pass over the cells without parallel workers: wall {wall:.1f} s, "
              f"server CPU {cpu:.1f} s; load {load_average()}")
        plans = {"check": explain(conn, checks["expression_cells_match_metadata"], {"r": NEW_RELEASE}),
                 "cells": explain(conn, planned.cells, planned.params,
                                  psycopg.sql.SQL("DELETE FROM abc.release_diff_item WHERE old_release = {} "
                                                  "AND new_release = {}").format(OLD_RELEASE, NEW_RELEASE))}
    for name, plan in plans.items():
        print(f"\nEXPLAIN (ANALYZE, BUFFERS) of the {name} query:\n{plan}")
        (args.workdir / f"plan-{name}.txt").write_text(plan + "\n")


if __name__ == "__main__":
    main()
