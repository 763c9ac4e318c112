"""`make demo`: the service end to end, offline, on a generated bucket served over real S3.

Generates a whole-atlas-shaped bucket tree (a release history of four manifests, the consensus
data among other datasets), serves it with ``rclone serve s3`` on loopback, creates a fresh
warehouse database, and runs the Airflow DAGs for real (``airflow dags test``) with the shipped
defaults: the watch (the release before the consensus data is recorded as skipped), the release
DAG for each release from the history floor, one after the other (the one unchanged in scope is
published by reference), the monitor. Then prints the status table with each dataset's state, the
release diff, the lineage behind an analyst view, and three analyst queries run as ``abc_reader``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from etl import db
from etl.fixtures import CONSENSUS_RELEASES, NEW_RELEASE, OLD_RELEASE, FixtureSpec, make_bucket
from etl.s3server import start_s3_server

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo"
DATABASE_URL = os.environ.get("ABC_DEMO_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/abc_demo")


CURRENT = "(SELECT data_release FROM abc.current_release)"
ANALYST_QUERIES = [
    ("cells per class per dataset, newest published release",
     "SELECT dataset, term_name AS class_name, n_cells AS cells FROM abc.current_term_cell_count "
     "WHERE term_set_name = 'class' ORDER BY dataset, class_name"),
    ("clusters present in both datasets",
     "SELECT count(*) AS clusters_in_both FROM (SELECT cluster_alias FROM abc.current_cluster_cell_count "
     "GROUP BY cluster_alias HAVING count(DISTINCT dataset) = 2) c"),
    ("where is Gad1 expressed? top 10 clusters by mean log2 expression",
     "SELECT dataset, group_name AS cluster, mean, fraction, n_cells FROM abc.expression_by_cluster "
     f"WHERE release = {CURRENT} AND gene_symbol = 'Gad1' ORDER BY mean DESC LIMIT 10"),
]
LINEAGE_QUERY = """
    SELECT step, run_ref, code, count(*) AS files, sum(size) AS bytes
    FROM (SELECT DISTINCT step, run_ref, code_version AS code, source_key, size
          FROM abc.lineage_sources('abc.expression_by_cluster', :r)) s
    GROUP BY step, run_ref, code ORDER BY step"""


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(env: dict[str, str], command: str, *args: str) -> str:
    """Run a command of this virtualenv (``airflow``, ``abc-mirror``); stop the demo, showing why, if it fails."""
    result = subprocess.run([str(Path(sys.executable).parent / command), *args], env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
        raise SystemExit(f"{command} {' '.join(args)} failed")
    return result.stdout


def main() -> None:
    bucket_root = DEMO / "bucket"
    if not (bucket_root / "allen-brain-cell-atlas").exists():
        step("generating a bucket tree shaped like s3://allen-brain-cell-atlas")
        generated = make_bucket(bucket_root, FixtureSpec(cells=6000, genes=800, clusters=64))
        for release in generated.releases:
            print(f"release {release}: {len(generated.files[release])} files")

    step("serving it over S3 with rclone")
    server = start_s3_server(bucket_root)
    print(f"endpoint {server.endpoint_url}")
    try:
        step(f"fresh warehouse {sa.engine.make_url(DATABASE_URL).database}")
        db.drop_database(DATABASE_URL)
        db.create_database(DATABASE_URL)
        print("\n".join(f"applied {name}" for name in db.upgrade(db.make_engine(DATABASE_URL))))

        env = dict(os.environ)
        env.update({
            "ABC_DATABASE_URL": DATABASE_URL,
            "AWS_ENDPOINT_URL_S3": server.endpoint_url,
            "ABC_MIRROR_ROOT": str(DEMO / "mirror"),
            "AIRFLOW_HOME": str(DEMO / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        })
        step("airflow db migrate (SQLite metadata database for the demo)")
        run(env, "airflow", "db", "migrate")
        step("airflow dags test abc_watch: every release recorded, those before the history floor skipped")
        watched = run(env, "airflow", "dags", "test", "abc_watch")
        print("\n".join(line.split("INFO - ", 1)[-1] for line in watched.splitlines()
                        if "history floor" in line or "new release" in line))
        for release in CONSENSUS_RELEASES:
            step(f"airflow dags test abc_release (release {release}): mirror, load, aggregate, publish the "
                 "consensus scope")
            started = time.monotonic()
            output = run(env, "airflow", "dags", "test", "abc_release", "--conf", json.dumps({"release": release}))
            shared = [line.split("INFO - ", 1)[-1] for line in output.splitlines() if "published by reference" in line]
            print("\n".join(shared[:1]) + ("\n" if shared else "") + f"done in {time.monotonic() - started:.0f} s")

        step("airflow dags test abc_monitor: quality checks, diffs, lag")
        run(env, "airflow", "dags", "test", "abc_monitor")

        step("abc-mirror status")
        print(run(env, "abc-mirror", "status"), end="")
        step(f"abc-mirror diff {OLD_RELEASE} {NEW_RELEASE} (also kept as release notes beside the mirror)")
        print(run(env, "abc-mirror", "diff", OLD_RELEASE, NEW_RELEASE, "--no-store"), end="")
        notes = DEMO / "mirror" / "releases" / NEW_RELEASE / "release-notes.html"
        print(f"release notes: {notes} ({'present' if notes.is_file() else 'MISSING'})")

        engine = db.make_engine(DATABASE_URL)
        step(f"lineage: the source files behind abc.expression_by_cluster of {NEW_RELEASE}")
        with engine.connect() as conn:
            for row in conn.execute(sa.text(LINEAGE_QUERY), {"r": NEW_RELEASE}):
                print(f"{row.step:<14} {row.files:>3} files  {row.bytes:>10} bytes  {row.run_ref}  code {row.code}")
        for title, query in ANALYST_QUERIES:
            step(f"analyst query (as abc_reader): {title}")
            with engine.begin() as conn:
                conn.execute(sa.text("SET LOCAL ROLE abc_reader"))
                result = conn.execute(sa.text(query))
                columns = list(result.keys())
                rows = result.all()
            print("  ".join(columns))
            for row in rows:
                print("  ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
