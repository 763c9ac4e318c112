"""A real Airflow 3 deployment for end-to-end tests: its components as child processes.

An api-server (Airflow 3 task runners talk to it), a scheduler, a dag-processor and, under the
CeleryExecutor, ``airflow celery worker`` processes with their own names, all sharing one
configuration (environment variables) and a fresh PostgreSQL database as Airflow's metadata
database. Under the LocalExecutor the scheduler runs the tasks itself and no worker is started.
Every process writes a log in the Airflow home; ``logs()`` returns their tails for failure reports.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from etl import db
from tests.conftest import REPO, _database_url

AIRFLOW = Path(sys.executable).parent / "airflow"
BROKER_URL = os.environ.get("ABC_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_WORKERS = ("worker-a", "worker-b")
STARTUP_TIMEOUT = 120.0


def worker_hostname() -> str:
    """``[core] hostname_callable`` for the tests: two workers on one machine need distinct names."""
    return os.environ.get("ABC_TEST_WORKER_NAME") or socket.getfqdn()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def metadata_database() -> Iterator[str]:
    """A fresh PostgreSQL database for Airflow's own metadata, dropped afterwards."""
    url = _database_url(f"airflow_test_{uuid.uuid4().hex[:10]}")
    db.create_database(url)
    try:
        yield url
    finally:
        db.drop_database(url)


class AirflowCluster:
    """Airflow components as child processes sharing one configuration (environment variables).

    ``executor`` is ``CeleryExecutor`` (then ``workers`` names the Celery workers to start, on a
    queue of the cluster's own on the local Redis) or ``LocalExecutor`` (no workers).
    """

    def __init__(self, home: Path, metadata_url: str, dags_folder: Path, extra_env: dict[str, str],
                 executor: str = "CeleryExecutor", workers: Sequence[str] = CELERY_WORKERS) -> None:
        self.home = home
        self.executor = executor
        self.workers = tuple(workers) if executor == "CeleryExecutor" else ()
        self.queue = f"abc_test_{uuid.uuid4().hex[:8]}"
        port = _free_port()
        self.env = {
            **os.environ,
            **extra_env,
            "AIRFLOW_HOME": str(home),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        }
        if executor == "CeleryExecutor":
            self.env.update({
                "AIRFLOW__CELERY__BROKER_URL": BROKER_URL,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata_url,
                # A queue of the test's own, so that concurrent runs on the same Redis never share tasks.
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            })
        self.port = port
        self.processes: dict[str, subprocess.Popen] = {}
        self._engine: sa.Engine | None = None

    @property
    def engine(self) -> sa.Engine:
        """An engine on the metadata database (disposed by ``stop``)."""
        if self._engine is None:
            self._engine = sa.create_engine(self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        return self._engine

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
        for name in self.workers:
            self.start(name, "celery", "worker", "--celery-hostname", f"{name}@%h", "--queues", self.queue,
                       "--concurrency", "1", "--skip-serve-logs", ABC_TEST_WORKER_NAME=name)

    def up(self, pools: dict[str, int], dag_ids: Sequence[str] = ()) -> None:
        """Migrate the metadata database, create ``pools``, start every component and wait until the
        api-server (and the Celery workers) answer and the dag-processor has serialized ``dag_ids``."""
        self.airflow("db", "migrate")
        for pool, slots in pools.items():
            self.airflow("pools", "set", pool, str(slots), "end-to-end test")
        self.start_all()
        what = "the api-server and both Celery workers" if self.workers else "the api-server"
        self.wait_for(what, lambda: self.api_ready() and self.workers_ready(), STARTUP_TIMEOUT)
        for dag_id in dag_ids:
            self.wait_for(f"the dag-processor to serialize {dag_id}", lambda d=dag_id: self.serialized(d),
                          STARTUP_TIMEOUT)

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
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
                   and " ready." in self.log_path(name).read_text(errors="replace") for name in self.workers)

    def api_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def serialized(self, dag_id: str) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(sa.text("SELECT 1 FROM serialized_dag WHERE dag_id = :d"), {"d": dag_id}).first()
        return found is not None

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.text("SELECT state FROM dag_run WHERE dag_id = :d AND run_id = :r"),
                                {"d": dag_id, "r": run_id}).scalar()

    def dag_runs(self, dag_id: str) -> list[sa.Row]:
        """Every run of ``dag_id``: run_id, run_type, state, partition_key, oldest first."""
        with self.engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT run_id, run_type, state, partition_key FROM dag_run WHERE dag_id = :d ORDER BY id"),
                {"d": dag_id}).all()

    def task_instances(self, dag_id: str, run_id: str) -> list[sa.Row]:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT task_id, map_index, state, hostname, try_number FROM task_instance "
                "WHERE dag_id = :d AND run_id = :r ORDER BY task_id, map_index"), {"d": dag_id, "r": run_id}).all()

    def task_logs(self, dag_id: str, run_id: str, limit: int = 4000) -> str:
        """The tails of the task logs of one run that did not succeed (files under the Airflow home)."""
        base = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        parts = []
        for path in sorted(base.rglob("*.log")) if base.is_dir() else []:
            text = path.read_text(errors="replace")
            if '"level":"error"' in text or "ERROR" in text or "Traceback" in text:
                parts.append(f"----- {path.relative_to(self.home)} -----\n{text[-limit:]}")
        return "\n".join(parts)

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
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
