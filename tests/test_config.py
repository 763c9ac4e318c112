"""Settings: environment variables, and Airflow connections over them in production."""

from __future__ import annotations

import json
import re
from pathlib import Path

from etl import db
from etl.config import ENVIRONMENT, Settings, settings_for_airflow_task

README = Path(__file__).resolve().parent.parent / "README.md"


def test_airflow_connections_override_the_environment(airflow_home, monkeypatch):
    monkeypatch.setenv("ABC_DATABASE_URL", "postgresql+psycopg://env@127.0.0.1/env")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    monkeypatch.delenv("AIRFLOW_CONN_ABC_POSTGRES", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_AWS_DEFAULT", raising=False)
    plain = settings_for_airflow_task()
    assert (plain.database_url, plain.endpoint_url) == (Settings.from_env().database_url, "http://127.0.0.1:1")

    monkeypatch.setenv("AIRFLOW_CONN_ABC_POSTGRES", "postgres://atlas:secret@db.example:5432/atlas")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "extra": {"endpoint_url": "http://s3.example:9000"}}))
    configured = settings_for_airflow_task()
    assert configured.database_url == "postgresql://atlas:secret@db.example:5432/atlas"
    assert db.make_engine(configured.database_url).dialect.driver == "psycopg"  # one driver, whatever the URL says
    assert configured.endpoint_url == "http://s3.example:9000"


def test_settings_repr_masks_the_database_password_and_the_webhook():
    settings = Settings(database_url="postgresql+psycopg://atlas:s3cr3t@db.example:5432/abc",
                        webhook_url="https://hooks.slack.com/services/T000/B000/XXXXSECRET")
    shown = repr(settings)
    assert "s3cr3t" not in shown and "XXXXSECRET" not in shown and "T000" not in shown
    assert "postgresql+psycopg://atlas:***@db.example:5432/abc" in shown
    assert "'https://hooks.slack.com/***'" in shown
    assert "bucket='allen-brain-cell-atlas'" in shown
    assert settings.database_url.endswith("s3cr3t@db.example:5432/abc")  # only the repr is masked
    assert repr(Settings(webhook_url=None)).count("webhook_url=None") == 1


def _client_options(client) -> dict:
    credentials = client._request_signer._credentials
    return {"region": client.meta.region_name, "endpoint": client.meta.endpoint_url,
            "signature": client.meta.config.signature_version,
            "access_key": credentials.access_key if credentials else None,
            "s3": client.meta.config.s3}


def test_source_client_follows_the_aws_default_connection(airflow_home, monkeypatch):
    from botocore import UNSIGNED

    from etl.source import make_client

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL_S3", "ABC_REGION", "ABC_S3_UNSIGNED", "AIRFLOW_CONN_AWS_DEFAULT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")

    # No connection: the environment (anonymous requests to us-west-2 on AWS).
    plain = settings_for_airflow_task()
    assert (plain.region, plain.unsigned, plain.aws_access_key_id) == ("us-west-2", True, None)
    assert _client_options(make_client(plain)) == {"region": "us-west-2", "endpoint": "https://s3.us-west-2.amazonaws.com",
                                                   "signature": UNSIGNED, "access_key": None, "s3": None}

    # A connection edited in the UI: region, endpoint, keys and botocore options all reach the client.
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": "AKIDEXAMPLE", "password": "wJalrXUtnFEMI",
        "extra": {"region_name": "eu-central-1", "endpoint_url": "http://s3.example:9000",
                  "config_kwargs": {"signature_version": "s3v4", "s3": {"addressing_style": "path"}}}}))
    signed = settings_for_airflow_task()
    assert (signed.region, signed.endpoint_url, signed.unsigned) == ("eu-central-1", "http://s3.example:9000", False)
    assert _client_options(make_client(signed)) == {"region": "eu-central-1", "endpoint": "http://s3.example:9000",
                                                    "signature": "s3v4", "access_key": "AKIDEXAMPLE",
                                                    "s3": {"addressing_style": "path"}}
    assert make_client(signed).meta.config.retries["mode"] == "adaptive"  # ours, kept under the connection's
    assert "wJalrXUtnFEMI" not in repr(signed) and "AKIDEXAMPLE" in repr(signed)

    # The production default (docker-compose's airflow-init): anonymous through config_kwargs.
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "extra": {"config_kwargs": {"signature_version": "unsigned"}}}))
    anonymous = settings_for_airflow_task()
    assert (anonymous.region, anonymous.unsigned, anonymous.aws_access_key_id) == ("us-west-2", True, None)
    assert _client_options(make_client(anonymous))["signature"] is UNSIGNED

    monkeypatch.setenv("ABC_S3_UNSIGNED", "0")  # a connection that does not say leaves it to the environment
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({"conn_type": "aws", "extra": {}}))
    assert settings_for_airflow_task().unsigned is False


def test_source_from_the_aws_connection_lists_the_served_bucket(airflow_home, s3_server, monkeypatch):
    from etl import source

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "extra": {"endpoint_url": s3_server.endpoint_url, "region_name": "us-east-1",
                                       "config_kwargs": {"signature_version": "unsigned"}}}))
    settings = settings_for_airflow_task()
    assert source.list_release_versions(source.make_client(settings), settings)


def test_readme_configuration_table_lists_every_variable_with_its_default():
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", README.read_text(), re.M))
    for name, (default, _) in ENVIRONMENT.items():
        assert name in rows, f"{name} is missing from the README's configuration table"
        shown = rows[name].strip()
        assert shown == f"`{default}`" if default else not shown.startswith("`"), (name, shown, default)
    assert {name for name in rows if name.startswith("ABC_")} <= set(ENVIRONMENT), "a variable etl.config does not read"
