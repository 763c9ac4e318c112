"""Scale-out proof: a DAG run under the CeleryExecutor, for real, on this machine.

Starts what a production deployment runs, as separate processes: an api-server (Airflow 3
workers talk to it), a scheduler, a dag-processor and two ``airflow celery worker`` processes
with their own names, against the local Redis broker and a fresh PostgreSQL database as
Airflow's metadata database. Everything is torn down afterwards; on failure every process's log
is printed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl import db, source
from etl.discovery import discover
from etl.fixtures import OLD_RELEASE
from tests.conftest import REPO, _database_url

TRANSFER_POOL = "abc_transfers"

AIRFLOW = Path(sys.executable).parent / "airflow"
BROKER_URL = os.environ.get("ABC_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
WORKERS = ("worker-a", "worker-b")
STARTUP_TIMEOUT = 120.0
RUN_TIMEOUT = 180.0


def worker_hostname() -> str:
    """``[core] hostname_callable`` for the test: two workers on one machine need distinct names."""
    return os.environ.get("ABC_TEST_WORKER_NAME") or socket.getfqdn()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CeleryCluster:
    """Airflow components as child processes sharing one configuration (environment variables)."""

    def __init__(self, home: Path, metadata_url: str, dags_folder: Path, extra_env: dict[str, str]) -> None:
        self.home = home
        self.queue = f"abc_test_{uuid.uuid4().hex[:8]}"
        port = _free_port()
        self.env = {
            **os.environ,
            **extra_env,
            "AIRFLOW_HOME": str(home),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__CELERY__BROKER_URL": BROKER_URL,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata_url,
            # A queue of the test's own, so that concurrent runs on the same Redis never share tasks.
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        }
        self.port = port
        self.processes: dict[str, subprocess.Popen] = {}

    def log_path(self, name: str) -> Path:
        return self.home / f"{name}.log"

    def airflow(self, *args: str) -> str:
        result = subprocess.run([str(AIRFLOW), *args], env=self.env, capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result.stdout

    def start(self, name: str, *args: str, **env: str) -> None:
        log = self.log_path(name).open("wb")
        self.processes[name] = subprocess.Popen(
            [str(AIRFLOW), *args], env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def start_all(self) -> None:
        self.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1")
        self.start("scheduler", "scheduler")
        self.start("dag-processor", "dag-processor")
        for name in WORKERS:
            self.start(name, "celery", "worker", "--celery-hostname", f"{name}@%h", "--queues", self.queue,
                       "--concurrency", "1", "--skip-serve-logs", ABC_TEST_WORKER_NAME=name)

    def wait_for(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited with {process.returncode} while waiting for {what}")
            if ready():
                return
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def workers_ready(self) -> bool:
        return all(f"{name}@" in self.log_path(name).read_text(errors="replace")
                   and " ready." in self.log_path(name).read_text(errors="replace") for name in WORKERS)

    def api_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def logs(self) -> str:
        return "\n".join(f"----- {name} -----\n{self.log_path(name).read_text(errors='replace')[-6000:]}"
                         for name in self.processes)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def metadata_url() -> Iterator[str]:
    """A fresh PostgreSQL database for Airflow's own metadata, dropped afterwards."""
    url = _database_url(f"airflow_test_{uuid.uuid4().hex[:10]}")
    db.create_database(url)
    yield url
    db.drop_database(url)


def run_on_celery(cluster: CeleryCluster, dag_id: str, conf: dict, pools: dict[str, int]) -> tuple[str, list]:
    """Start the cluster, trigger ``dag_id`` once and wait for the run to finish; return its state and TIs."""
    cluster.airflow("db", "migrate")
    for pool, slots in pools.items():
        cluster.airflow("pools", "set", pool, str(slots), "scale-out test")
    cluster.start_all()
    cluster.wait_for("the api-server and both Celery workers", lambda: cluster.api_ready() and cluster.workers_ready(),
                     STARTUP_TIMEOUT)
    engine = sa.create_engine(cluster.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    try:
        cluster.wait_for(f"the dag-processor to serialize {dag_id}", lambda: _serialized(engine, dag_id),
                         STARTUP_TIMEOUT)
        cluster.airflow("dags", "unpause", dag_id)
        run_id = f"celery_{uuid.uuid4().hex[:8]}"
        cluster.airflow("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf))
        cluster.wait_for(f"run {run_id} to finish", lambda: _run_state(engine, dag_id, run_id) in ("success", "failed"),
                         RUN_TIMEOUT)
        with engine.connect() as conn:
            instances = conn.execute(sa.text(
                "SELECT task_id, map_index, state, hostname, try_number FROM task_instance "
                "WHERE dag_id = :d AND run_id = :r ORDER BY task_id, map_index"), {"d": dag_id, "r": run_id}).all()
        return _run_state(engine, dag_id, run_id), instances
    finally:
        engine.dispose()


def _serialized(engine: sa.Engine, dag_id: str) -> bool:
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT 1 FROM serialized_dag WHERE dag_id = :d"), {"d": dag_id}).first()
    return found is not None


def _run_state(engine: sa.Engine, dag_id: str, run_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT state FROM dag_run WHERE dag_id = :d AND run_id = :r"),
                            {"d": dag_id, "r": run_id}).scalar()


@pytest.mark.slow
def test_release_mirrors_on_two_celery_workers_and_publishes_once(tmp_path, metadata_url, settings, engine):
    discover(source.make_client(settings), settings, engine)
    with engine.connect() as conn:
        total_bytes = conn.execute(sa.text("SELECT total_bytes FROM abc.release WHERE version = :r"),
                                   {"r": OLD_RELEASE}).scalar_one()
    home = tmp_path / "airflow"
    home.mkdir()
    cluster = CeleryCluster(home, metadata_url, REPO / "dags", {
        "ABC_DATABASE_URL": settings.database_url,
        "AWS_ENDPOINT_URL_S3": settings.endpoint_url,
        "ABC_MIRROR_ROOT": settings.mirror_root,
        "ABC_WORKERS": "2",
    })
    try:
        # Six batches of the release's files: more mapped mirror tasks than workers. Throttled so
        # each takes seconds: a worker busy with one batch (concurrency 1, prefetch 1) cannot take
        # the next, so the other worker must, however quickly the first one would have finished.
        state, instances = run_on_celery(cluster, "abc_release",
                                         {"release": OLD_RELEASE, "batch_bytes": total_bytes // 6 + 1,
                                          "max_bandwidth": "1M"},
                                         pools={TRANSFER_POOL: 4})
        assert state == "success", instances
        mirror_hosts = [ti.hostname for ti in instances if ti.task_id == "mirror"]
        assert len(mirror_hosts) >= 2 and set(mirror_hosts) == set(WORKERS), instances
        assert all(ti.state == "success" and ti.try_number == 1 for ti in instances), instances
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM abc.release WHERE version = :r"),
                            {"r": OLD_RELEASE}).scalar_one() == "published"
        cells, distinct = conn.execute(sa.text(
            "SELECT count(*), count(DISTINCT (dataset, cell_label)) FROM abc.cell WHERE release = :r"),
            {"r": OLD_RELEASE}).one()
    assert cells == distinct > 0
