"""`make demo`: the service end to end, offline, on a generated bucket served over real S3.

Generates a bucket tree (two releases), serves it with ``rclone serve s3`` on loopback, creates a
fresh warehouse database, and runs the Airflow DAGs for real (``airflow dags test``), then
prints what the warehouse holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from etl import db
from etl.fixtures import NEW_RELEASE, OLD_RELEASE, FixtureSpec, make_bucket
from etl.s3server import start_s3_server

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo"
DATABASE_URL = os.environ.get("ABC_DEMO_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/abc_demo")


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def airflow(env: dict[str, str], *args: str) -> None:
    binary = Path(sys.executable).parent / "airflow"
    result = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
        raise SystemExit(f"airflow {' '.join(args)} failed")


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
        airflow(env, "db", "migrate")
        step("airflow dags test abc_watch")
        airflow(env, "dags", "test", "abc_watch")
        for release in (OLD_RELEASE, NEW_RELEASE):
            step(f"airflow dags test abc_release (release {release}): mirror, load, aggregate, publish")
            airflow(env, "dags", "test", "abc_release", "--conf", json.dumps({"release": release}))

        step("releases recorded in abc.release")
        engine = db.make_engine(DATABASE_URL)
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT version, status, n_files, pg_size_pretty(total_bytes) AS size FROM abc.release "
                "ORDER BY version")).all()
            for row in rows:
                print(f"{row.version}  {row.status:<10} {row.n_files:>4} files  {row.size}")
            pinned = conn.execute(sa.text(
                "SELECT release, dataset, kind, version FROM abc.release_directory ORDER BY 1, 2, 3")).all()
        step("dataset directories pinned by each release")
        for row in pinned:
            print(f"{row.release}  {row.kind:<20} {row.dataset:<30} {row.version}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
