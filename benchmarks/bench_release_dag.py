"""The metadata chain at full size through Airflow: one ``abc_release`` run per release, in order.

A real Airflow deployment (api-server, scheduler, dag-processor; LocalExecutor, so each task is its
own process) runs against a generated metadata-only bucket (``fixture make --metadata-only``: the
consensus metadata at --cells/--clusters, no matrices) served by ``rclone serve s3``, and a fresh
warehouse. ``abc-mirror discover`` records the releases (those before the history floor skipped);
each release from the floor is then triggered with ``kinds: ["metadata"]`` (the bucket has no
matrices to aggregate) and waited for before the next. Reported per run:
wall time, and per task its wall time (Airflow's own start/end) and peak RSS (VmHWM of the task
process, ``airflow worker -- <task instance id>``, sampled every 0.1 s). Then the warehouse size,
``abc-mirror diff`` of the first and last release, ``abc-mirror status`` and the releases page.

    .venv/bin/python benchmarks/bench_release_dag.py --cells 7651713 --clusters 6721 \
        --workdir /work/scratch/full-meta
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from etl import db  # noqa: E402
from etl.fixtures import FixtureSpec, make_bucket  # noqa: E402
from etl.s3server import start_s3_server  # noqa: E402
from tests.airflow_cluster import AirflowCluster, metadata_database  # noqa: E402
from tests.conftest import _database_url  # noqa: E402

TASK_TITLE = b"airflow worker -- "
TRANSFER_POOL = "abc_transfers"
BIN = Path(sys.executable).parent


class PeakSampler(threading.Thread):
    """Peak RSS (VmHWM, KiB) of every task process, keyed by task instance id, until stopped."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if not title.startswith(TASK_TITLE):
                        continue
                    ti_id = title[len(TASK_TITLE):].split(b"\0")[0].decode().strip()
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peaks[ti_id] = max(self.peaks.get(ti_id, 0), int(line.split()[1]))
            time.sleep(self.interval)


def timed(command: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) and stdout of one command, via GNU time."""
    with tempfile.NamedTemporaryFile("r") as stats:
        result = subprocess.run(["/usr/bin/time", "-o", stats.name, "-f", "%e %M", *command], env=env,
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        wall, peak = stats.read().split()[-2:]
    return float(wall), int(peak), result.stdout


def median_seconds(action, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def task_rows(cluster: AirflowCluster, run_id: str) -> list[sa.Row]:
    """Each task's wall time, and when (seconds from the run's start) it was queued, started and ended."""
    with cluster.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT t.id::text, t.task_id, t.map_index, t.state, "
            "extract(epoch FROM t.end_date - t.start_date) AS seconds, "
            "extract(epoch FROM t.queued_dttm - r.start_date) AS queued, "
            "extract(epoch FROM t.start_date - r.start_date) AS started, "
            "extract(epoch FROM t.end_date - r.start_date) AS ended "
            "FROM task_instance t JOIN dag_run r ON r.dag_id = t.dag_id AND r.run_id = t.run_id "
            "WHERE t.dag_id = 'abc_release' AND t.run_id = :r ORDER BY t.start_date"),
            {"r": run_id}).all()


def slow_statements(server_log: Path, offset: int, limit: int = 25) -> list[str]:
    """The slowest statements PostgreSQL logged (``log_min_duration_statement``) after ``offset``."""
    lines = []
    with server_log.open("rb") as log:
        log.seek(offset)
        for line in log.read().decode(errors="replace").splitlines():
            if " duration: " in line and " ms " in line:
                ms = float(line.split(" duration: ", 1)[1].split(" ms", 1)[0])
                lines.append((ms, line.split(" duration: ", 1)[1][:220]))
    return [text for _, text in sorted(lines, reverse=True)[:limit]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=7_651_713)
    parser.add_argument("--clusters", type=int, default=6_721)
    parser.add_argument("--workdir", type=Path, required=True, help="bucket cache (generated once), mirror, logs")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole chain")
    parser.add_argument("--server-log", type=Path, default=REPO / "var" / "pg" / "server.log",
                        help="the PostgreSQL server's log, for its slowest statements in the warehouse")
    parser.add_argument("--slow-ms", type=int, default=2000,
                        help="log the warehouse's statements slower than this (log_min_duration_statement)")
    args = parser.parse_args()

    bucket_root = args.workdir / f"bucket-{args.cells}-{args.clusters}"
    if not (bucket_root / "allen-brain-cell-atlas").exists():
        started = time.perf_counter()
        make_bucket(bucket_root, FixtureSpec(cells=args.cells, clusters=args.clusters, metadata_only=True))
        print(f"generated {bucket_root} in {time.perf_counter() - started:.0f} s", flush=True)
    run_dir = args.workdir / f"run-{uuid.uuid4().hex[:8]}"
    run_dir.mkdir(parents=True)
    warehouse = _database_url(f"abc_bench_dag_{uuid.uuid4().hex[:8]}")
    db.create_database(warehouse)
    engine = db.make_engine(warehouse)
    db.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER DATABASE {engine.url.database} SET log_min_duration_statement = {args.slow_ms}"))
    engine.dispose()
    log_offset = args.server_log.stat().st_size if args.server_log.exists() else None
    server = start_s3_server(bucket_root)
    sampler = PeakSampler()
    sampler.start()
    try:
        with metadata_database() as metadata_url:
            home = run_dir / "airflow"
            home.mkdir()
            env = {"ABC_DATABASE_URL": warehouse, "AWS_ENDPOINT_URL_S3": server.endpoint_url,
                   "ABC_MIRROR_ROOT": str(run_dir / "mirror")}
            cluster = AirflowCluster(home, metadata_url, REPO / "dags", env, executor="LocalExecutor")
            try:
                cluster.up({TRANSFER_POOL: 4}, dag_ids=["abc_release"])
                cluster.airflow("dags", "unpause", "abc_release")
                wall, _, out = timed([str(BIN / "abc-mirror"), "discover"], cluster.env)
                print(f"abc-mirror discover: {wall:.1f} s\n{out}", flush=True)
                for release in releases_to_process(warehouse):
                    run_id = f"bench_{release}"
                    cluster.airflow("dags", "trigger", "abc_release", "--run-id", run_id,
                                    "--conf", json.dumps({"release": release, "kinds": ["metadata"]}))
                    cluster.wait_for(f"run {run_id}", lambda r=run_id: cluster.run_state("abc_release", r)
                                     in ("success", "failed"), args.timeout)
                    print(f"{run_id}: {cluster.run_state('abc_release', run_id)}", flush=True)
                report(cluster, sampler, warehouse, cluster.env, server.endpoint_url)
                if log_offset is not None:
                    print(f"\nslowest warehouse statements (> {args.slow_ms} ms, {args.server_log}):")
                    print("\n".join(slow_statements(args.server_log, log_offset)))
            finally:
                cluster.stop()
    finally:
        sampler.done.set()
        server.stop()
        db.drop_database(warehouse)


def releases_to_process(warehouse: str) -> list[str]:
    engine = db.make_engine(warehouse)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT version FROM abc.release WHERE status <> 'skipped' "
                                             "ORDER BY version")).scalars())
    finally:
        engine.dispose()


def report(cluster: AirflowCluster, sampler: PeakSampler, warehouse: str, env: dict[str, str],
           endpoint: str) -> None:
    time.sleep(0.5)  # the sampler's last pass over the final task
    releases = []
    for run in cluster.dag_runs("abc_release"):
        release = run.run_id.removeprefix("bench_")
        releases.append(release)
        with cluster.engine.connect() as conn:
            seconds = conn.execute(sa.text("SELECT extract(epoch FROM end_date - start_date) FROM dag_run "
                                           "WHERE dag_id = 'abc_release' AND run_id = :r"),
                                   {"r": run.run_id}).scalar_one()
        print(f"\n### abc_release {release}: {run.state}, {seconds:.1f} s\n")
        print("| task | state | seconds | peak RSS (MB) | queued / started / ended (s from run start) |\n"
              "|---|---|---:|---:|---|")
        for row in task_rows(cluster, run.run_id):
            name = row.task_id + (f"[{row.map_index}]" if row.map_index >= 0 else "")
            peak = sampler.peaks.get(row.id)
            shown = f"{peak / 1024:.0f}" if peak else "(ended before a sample)"
            when = " / ".join("-" if t is None else f"{t:.1f}" for t in (row.queued, row.started, row.ended))
            print(f"| {name} | {row.state} | {row.seconds or 0:.1f} | {shown} | {when} |")
        if run.state != "success":
            print(cluster.task_logs("abc_release", run.run_id))
    engine = db.make_engine(warehouse)
    with engine.connect() as conn:
        size = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one()
    engine.dispose()
    print(f"\nwarehouse size: {size / 2**30:.2f} GiB")
    old, new = releases[0], releases[-1]
    wall, peak, _ = timed([str(BIN / "abc-mirror"), "diff", old, new, "--no-store"], env)
    print(f"abc-mirror diff {old} {new}: {wall:.1f} s, {peak / 1024:.0f} MB peak RSS")
    wall, peak, _ = timed([str(BIN / "abc-mirror"), "status"], env)
    print(f"abc-mirror status: {wall:.2f} s (whole process), {peak / 1024:.0f} MB peak RSS")
    for path in ("/abc-mirror/", "/abc-mirror/releases"):
        url = f"http://127.0.0.1:{cluster.port}{path}"
        seconds = median_seconds(lambda u=url: urllib.request.urlopen(u, timeout=60).read())
        print(f"GET {path}: {seconds * 1000:.0f} ms (median of 5)")
    print(f"source endpoint {endpoint}; load averages {os.getloadavg()}")


if __name__ == "__main__":
    main()
