"""Settings: environment variables, and Airflow connections over them in production."""

from __future__ import annotations

import json

from etl.config import Settings, settings_for_airflow_task


def test_airflow_connections_override_the_environment(airflow_home, monkeypatch):
    monkeypatch.setenv("ABC_DATABASE_URL", "postgresql+psycopg2://env@127.0.0.1/env")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    monkeypatch.delenv("AIRFLOW_CONN_ABC_POSTGRES", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_AWS_DEFAULT", raising=False)
    plain = settings_for_airflow_task()
    assert (plain.database_url, plain.endpoint_url) == (Settings.from_env().database_url, "http://127.0.0.1:1")

    monkeypatch.setenv("AIRFLOW_CONN_ABC_POSTGRES", "postgres://atlas:secret@db.example:5432/atlas")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "extra": {"endpoint_url": "http://s3.example:9000"}}))
    configured = settings_for_airflow_task()
    assert configured.database_url == "postgresql+psycopg2://atlas:secret@db.example:5432/atlas"
    assert configured.endpoint_url == "http://s3.example:9000"


def test_settings_repr_masks_the_database_password_and_the_webhook():
    settings = Settings(database_url="postgresql+psycopg2://atlas:s3cr3t@db.example:5432/abc",
                        webhook_url="https://hooks.slack.com/services/T000/B000/XXXXSECRET")
    shown = repr(settings)
    assert "s3cr3t" not in shown and "XXXXSECRET" not in shown and "T000" not in shown
    assert "postgresql+psycopg2://atlas:***@db.example:5432/abc" in shown
    assert "'https://hooks.slack.com/***'" in shown
    assert "bucket='allen-brain-cell-atlas'" in shown
    assert settings.database_url.endswith("s3cr3t@db.example:5432/abc")  # only the repr is masked
    assert repr(Settings(webhook_url=None)).count("webhook_url=None") == 1
