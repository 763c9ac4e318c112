"""The Airflow plugin: Airflow loads it, and its page and JSON list the releases with their status."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from etl import db, source
from etl.discovery import discover
from etl.fixtures import CONSENSUS_RELEASES, NEW_RELEASE, OLD_RELEASE, PRE_CONSENSUS_RELEASE, RELEASES
from tests.conftest import REPO, scoped_keys


def test_airflow_loads_the_plugin(airflow_home):
    airflow = Path(sys.executable).parent / "airflow"
    result = subprocess.run([str(airflow), "plugins", "--output", "json"], capture_output=True, text=True,
                            env=os.environ, check=True)
    plugins = {p["name"]: p for p in json.loads(result.stdout[result.stdout.index("["):])}
    plugin = plugins["abc_mirror"]
    assert [app["url_prefix"] for app in plugin["fastapi_apps"]] == ["/abc-mirror"]
    assert [view["href"] for view in plugin["external_views"]] == ["/abc-mirror/"]


def test_page_and_json_list_every_release(settings, monkeypatch, generated_bucket):
    from fastapi.testclient import TestClient

    engine = db.make_engine(settings.database_url)
    discover(source.make_client(settings), settings, engine)
    engine.dispose()
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    spec = importlib.util.spec_from_file_location("abc_mirror_plugin", REPO / "plugins" / "abc_mirror_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    client = TestClient(module.app)

    status = client.get("/releases").json()
    assert [r["release"] for r in status["releases"]] == RELEASES
    assert {r["release"]: (r["status"], r["files_ok"]) for r in status["releases"]} == {
        PRE_CONSENSUS_RELEASE: ("skipped", 0), **{release: ("upstream", 0) for release in CONSENSUS_RELEASES}}
    # Counts are the scope's files, not the manifest's (which lists the whole atlas).
    assert {r["release"]: r["files"] for r in status["releases"] if r["release"] in CONSENSUS_RELEASES} == {
        release: len(scoped_keys(generated_bucket, release)) for release in CONSENSUS_RELEASES}
    assert status["scope"] == "consensus-mouse"
    assert status["lag"]["newest_upstream"] == NEW_RELEASE and status["lag"]["newest_published"] is None

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert OLD_RELEASE in page.text and NEW_RELEASE in page.text and "<table>" in page.text
