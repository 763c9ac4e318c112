"""docker-compose.yml: the production stack is valid Compose and wired the way the DAGs need."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker")


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) when it answers, else `docker-compose`; None without either."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_docker_compose_config_accepts_the_file(tmp_path):
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client on this machine")
    env = {**os.environ, "AIRFLOW_JWT_SECRET": "test-secret"}
    result = subprocess.run([*command, "-f", str(REPO / "docker-compose.yml"), "config"], env=env,
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(AIRFLOW_SERVICES) <= set(resolved["services"])
    worker_env = resolved["services"]["airflow-worker"]["environment"]
    assert worker_env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert worker_env["AIRFLOW__API_AUTH__JWT_SECRET"] == "test-secret"

    unset = {k: v for k, v in env.items() if k != "AIRFLOW_JWT_SECRET"}
    refused = subprocess.run([*command, "-f", str(REPO / "docker-compose.yml"), "config"], env=unset,
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode != 0 and "AIRFLOW_JWT_SECRET" in refused.stderr


def test_every_airflow_component_shares_one_configuration(compose):
    services = compose["services"]
    common = compose["x-airflow-common"]["environment"]
    assert common["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert common["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    assert common["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080/")
    airflow_db = common["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].rsplit("/", 1)[1]
    warehouse_db = common["ABC_DATABASE_URL"].rsplit("/", 1)[1]
    assert (airflow_db, warehouse_db) == ("airflow", "abc")
    for name in (*AIRFLOW_SERVICES, "airflow-init"):
        assert services[name]["image"] == compose["x-airflow-common"]["image"], name
        assert "mirror:/data/mirror" in services[name]["volumes"], name


def test_workers_scale_and_init_prepares_both_databases(compose, airflow_home):
    from tests.test_dag_watch import load_dag

    worker = compose["services"]["airflow-worker"]
    assert "container_name" not in worker and "ports" not in worker, "a fixed name or port blocks --scale"
    assert worker["command"] == "celery worker"
    init = "\n".join(compose["services"]["airflow-init"]["command"])
    for step in ("airflow db migrate", "abc-mirror db upgrade", "connections add abc_postgres",
                 "connections add aws_default", '"signature_version": "unsigned"'):
        assert step in init, step
    mirror_pools = {task.pool for task in load_dag("abc_release", "abc_release").tasks if task.task_id == "mirror"}
    assert mirror_pools and all(f"pools set {pool} " in init for pool in mirror_pools)
    assert "CREATE DATABASE abc" in (REPO / "docker" / "postgres-init.sql").read_text()
