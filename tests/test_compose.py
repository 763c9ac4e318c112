"""docker-compose.yml: the production stack is valid Compose, wired the way the DAGs need, and safe by
default (no default passwords, ports on loopback, FAB logins, least-privileged database roles).

The file is validated against the Compose specification's JSON schema (tests/data/compose-spec/,
see SOURCE.md there) after Compose's variable interpolation, done here, so no docker client is
needed and nothing is installed; `docker compose config` is also run where a client exists.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import tomllib

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker")
SECRETS = ("AIRFLOW_JWT_SECRET", "POSTGRES_PASSWORD", "ABC_ETL_PASSWORD", "ABC_WEB_PASSWORD")
TEST_ENV = {name: f"test-{name.lower()}" for name in SECRETS}
COMPOSE_FILE = REPO / "docker-compose.yml"
INIT_SCRIPT = REPO / "docker" / "postgres-init.sh"
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                       r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class Unset(Exception):
    """A required variable (``${NAME:?message}``) is unset or empty."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``,
    ``${NAME:?error}``, ``${NAME?error}``."""
    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg, value = match.group("op"), match.group("arg"), env.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return arg if missing else value
        if op in (":?", "?") and missing:
            raise Unset(f"{name}: {arg}")
        return value or ""
    return _VARIABLE.sub(substitute, text)


def resolved(env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), env))


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) when it answers, else `docker-compose`; None without either."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft201909Validator:
    schema = json.loads((REPO / "tests" / "data" / "compose-spec" / "compose-spec.json").read_text())
    return jsonschema.Draft201909Validator(schema)


def test_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$$SET ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:?e}", env) == "$SET x x d d  x"
    with pytest.raises(Unset, match="EMPTY: e"):
        interpolate("${EMPTY:?e}", env)


def test_the_file_matches_the_compose_specification(validator):
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(resolved(TEST_ENV))]
    assert errors == []
    # The schema is strict enough to catch a typo.
    broken = resolved(TEST_ENV)
    broken["services"]["airflow-worker"]["comand"] = "celery worker"
    assert any("comand" in e.message for e in validator.iter_errors(broken))


@pytest.mark.parametrize("secret", SECRETS)
def test_every_secret_is_required(secret):
    with pytest.raises(Unset, match=secret):
        resolved({k: v for k, v in TEST_ENV.items() if k != secret})
    with pytest.raises(Unset, match=secret):
        resolved({**TEST_ENV, secret: ""})


def test_no_default_passwords(compose):
    text = COMPOSE_FILE.read_text()
    for secret in SECRETS:
        assert re.search(r"\$\{" + secret + r":?-", text) is None, f"{secret} has a default"
    # Every password inside a URL comes from a required variable, never a literal.
    for password in re.findall(r"://[^:/@\s]+:(\$\$?\{[^}]*\}|[^@\s]+)@", text):
        assert re.fullmatch(r"\$\$?\{[A-Z_]+(:\?[^}]*)?\}", password), password
    assert "SIMPLE_AUTH_MANAGER" not in text


def test_published_ports_listen_on_loopback_unless_asked():
    def published(env):
        return {name: service.get("ports", []) for name, service in resolved(env)["services"].items()}
    ports = published(TEST_ENV)
    assert ports["postgres"] and ports["airflow-apiserver"]
    for name, mappings in ports.items():
        for mapping in mappings:
            assert str(mapping).startswith("127.0.0.1:"), (name, mapping)
    assert "redis" not in ports or not ports["redis"]
    opened = published({**TEST_ENV, "ABC_BIND_ADDRESS": "0.0.0.0"})
    assert all(str(m).startswith("0.0.0.0:") for mappings in opened.values() for m in mappings)


def test_logins_are_fab_users(airflow_home):
    common = resolved(TEST_ENV)["x-airflow-common"]["environment"]
    assert common["AIRFLOW__CORE__AUTH_MANAGER"] == FAB
    module, _, name = FAB.rpartition(".")
    assert hasattr(importlib.import_module(module), name), "apache-airflow-providers-fab is not installed"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["airflow"]
    assert any(extra.startswith("apache-airflow-providers-fab") for extra in extras)
    readme = (REPO / "README.md").read_text()
    assert "airflow users create" in readme and "airflow users create" in COMPOSE_FILE.read_text()


def test_the_etl_is_no_superuser_and_the_page_reads_only():
    services = resolved(TEST_ENV)["services"]
    common = resolved(TEST_ENV)["x-airflow-common"]["environment"]
    assert common["ABC_DATABASE_URL"] == "postgresql+psycopg://abc_etl:test-abc_etl_password@postgres:5432/abc"
    init = "\n".join(services["airflow-init"]["command"])
    assert "postgresql://abc_etl:${ABC_ETL_PASSWORD}@postgres:5432/abc" in init
    api = services["airflow-apiserver"]["environment"]
    assert api["ABC_DATABASE_URL"] == "postgresql+psycopg://abc_web:test-abc_web_password@postgres:5432/abc"
    for name in AIRFLOW_SERVICES[1:]:
        assert services[name]["environment"]["ABC_DATABASE_URL"].startswith("postgresql+psycopg://abc_etl:"), name

    roles = {m.group(1): m.group(2) for m in re.finditer(r"CREATE ROLE (\w+) ([^;]*);", INIT_SCRIPT.read_text())}
    assert set(roles) == {"abc_etl", "abc_reader", "abc_web"}
    assert "NOSUPERUSER" in roles["abc_etl"] and "NOSUPERUSER" in roles["abc_web"]
    assert "NOLOGIN" in roles["abc_reader"] and "IN ROLE abc_reader" in roles["abc_web"]
    assert "CREATE DATABASE abc OWNER abc_etl" in INIT_SCRIPT.read_text()
    assert os.access(INIT_SCRIPT, os.X_OK), "docker-entrypoint-initdb.d runs executable .sh files"
    postgres = services["postgres"]["environment"]
    assert postgres["ABC_ETL_PASSWORD"] and postgres["ABC_WEB_PASSWORD"]
    assert "./docker/postgres-init.sh:/docker-entrypoint-initdb.d/10-abc.sh:ro" in services["postgres"]["volumes"]


def test_docker_compose_config_accepts_the_file():
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client on this machine (the schema test above validates the file)")
    env = {**os.environ, **TEST_ENV}
    result = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config"], env=env,
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(AIRFLOW_SERVICES) <= set(config["services"])
    worker_env = config["services"]["airflow-worker"]["environment"]
    assert worker_env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert worker_env["AIRFLOW__API_AUTH__JWT_SECRET"] == TEST_ENV["AIRFLOW_JWT_SECRET"]

    unset = {k: v for k, v in env.items() if k != "AIRFLOW_JWT_SECRET"}
    refused = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config"], env=unset,
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
    assert "CREATE DATABASE abc" in INIT_SCRIPT.read_text()
