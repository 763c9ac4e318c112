"""Shared test fixtures: a throwaway database on the real server, generated buckets served by
``rclone serve s3``, and an isolated Airflow home for ``dag.test()``."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl import db
from etl.config import Settings
from etl.fixtures import FixtureSpec, GeneratedBucket, make_bucket
from etl.s3server import S3Server, start_s3_server
from etl.scope import Scope

SERVER_URL = os.environ.get("ABC_TEST_SERVER_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parent.parent


def scoped_keys(bucket: GeneratedBucket, release: str, scope: Scope | None = None) -> list[str]:
    """Keys of a generated release that ``scope`` (default: the shipped consensus-mouse) mirrors."""
    from etl.manifest import parse_manifest

    key = f"releases/{release}/manifest.json"
    manifest = parse_manifest((bucket.bucket_dir / key).read_bytes(), key)
    return sorted(f.relative_path for f in (scope or Settings().run_scope).mirrored(manifest.files))


@pytest.fixture(autouse=True)
def no_airflow_task_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts outside any Airflow task: ``dag.test()`` runs tasks in this process and leaves their
    ``AIRFLOW_CTX_*`` variables in ``os.environ``, which would make later stages (and the processes tests
    start) a DAG run's instead of a process's own (etl.publish.stage_owner)."""
    for name in [n for n in os.environ if n.startswith("AIRFLOW_CTX_")]:
        monkeypatch.delenv(name)


def _database_url(name: str) -> str:
    return sa.engine.make_url(SERVER_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh, migrated database of the test's own on the real server, dropped afterwards."""
    url = _database_url(f"abc_test_{uuid.uuid4().hex[:10]}")
    db.create_database(url)
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    yield url
    db.drop_database(url)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    eng = db.make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def generated_bucket(tmp_path_factory: pytest.TempPathFactory) -> GeneratedBucket:
    """The small default bucket, generated once per session; tests must not modify it."""
    return make_bucket(tmp_path_factory.mktemp("bucket"), FixtureSpec())


@pytest.fixture(scope="session")
def s3_server(generated_bucket: GeneratedBucket) -> Iterator[S3Server]:
    server = start_s3_server(generated_bucket.root)
    yield server
    server.stop()


@pytest.fixture
def settings(s3_server: S3Server, database_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=database_url, endpoint_url=s3_server.endpoint_url,
                    mirror_root=str(tmp_path / "mirror"), workers=4)


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An isolated Airflow home with a migrated SQLite metadata database."""
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("airflow")
    os.environ.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    })
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, env=os.environ)
    return home
