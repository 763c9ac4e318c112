"""The Airflow plugin: Airflow loads it; its page, as headless chromium renders it, and its JSON show every
release with its stages, datasets, sizes, times, links and the cells per class."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from etl import db, diff, source
from etl.discovery import discover
from etl.fixtures import (
    CONSENSUS_RELEASES,
    NEW_RELEASE,
    OLD_RELEASE,
    PRE_CONSENSUS_RELEASE,
    RELEASES,
    UNCHANGED_RELEASE,
)
from etl.manifest import ManifestFile, parse_manifest
from etl.monitor import human_size
from etl.quality import CHECKS
from tests.conftest import REPO, scoped_keys

CHROMIUM = os.environ.get("ABC_TEST_CHROMIUM") or shutil.which("chromium")
HOSTILE_ERROR = '<script>document.title="owned"</script><img src=x onerror=alert(1)> & "quotes"'


def load_plugin():
    spec = importlib.util.spec_from_file_location("abc_mirror_plugin", REPO / "plugins" / "abc_mirror_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def served_like_airflow(plugin) -> Iterator[str]:
    """The plugin's app served by uvicorn on loopback, mounted at its url_prefix as Airflow's api-server mounts
    a plugin's FastAPI app (``app.mount(url_prefix, subapp)`` in airflow/api_fastapi/app.py init_plugins, with
    nothing of its own added to the sub-app's responses); test_airflow_loads_the_plugin checks Airflow finds it.
    Yields the page's URL."""
    import uvicorn
    from fastapi import FastAPI

    root = FastAPI()
    root.mount(plugin.URL_PREFIX, plugin.app)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(root, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}{plugin.URL_PREFIX}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def rendered(url: str, screenshot: Path):
    """The page's DOM as headless chromium rendered it, and its screenshot saved to ``screenshot``."""
    from bs4 import BeautifulSoup

    assert CHROMIUM, "no chromium: scripts/ensure-chromium.sh installs it (make test runs it)"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,2400",
         f"--user-data-dir={screenshot.parent / 'chromium-profile'}", f"--screenshot={screenshot}", "--dump-dom",
         url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-3000:]
    return BeautifulSoup(result.stdout, "html.parser")


def manifest_files(generated_bucket, release: str) -> list[ManifestFile]:
    key = f"releases/{release}/manifest.json"
    return parse_manifest((generated_bucket.bucket_dir / key).read_bytes(), key).files


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
    client = TestClient(load_plugin().app)

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
    assert OLD_RELEASE in page.text and NEW_RELEASE in page.text and '<table id="releases">' in page.text


@pytest.fixture
def processed_releases(airflow_home, settings, engine, generated_bucket, monkeypatch):
    """The four generated releases as the service leaves them: the oldest skipped; OLD_RELEASE mirrored (its
    metadata) and published; UNCHANGED_RELEASE published by reference; NEW_RELEASE mirrored by the
    abc_mirror_release DAG (a real dag.test() run) and published, each with its release notes. Returns the
    Airflow DAG run."""
    from etl import pipeline
    from etl.cli import main
    from tests.test_dag_watch import load_dag

    for name, value in {"ABC_DATABASE_URL": settings.database_url, "ABC_MIRROR_ROOT": settings.mirror_root,
                        "AWS_ENDPOINT_URL_S3": settings.endpoint_url, "ABC_WORKERS": "4"}.items():
        monkeypatch.setenv(name, value)
    discover(source.make_client(settings), settings, engine)
    for release in (OLD_RELEASE, UNCHANGED_RELEASE):
        pipeline.mirror(settings, release, kinds=["metadata"], progress=False)
    run = load_dag("abc_mirror_release", "abc_mirror_release").test(run_conf={"release": NEW_RELEASE})
    assert run.state == "success"
    for release in CONSENSUS_RELEASES:
        assert main(["load", "--release", release]) == 0
    # A failure message quoting upstream names is shown as text, never as markup.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE abc.release SET last_error = :e WHERE version = :r"),
                     {"e": HOSTILE_ERROR, "r": PRE_CONSENSUS_RELEASE})
    return run


def test_releases_page_in_a_headless_browser(processed_releases, settings, generated_bucket, tmp_path):
    from PIL import Image

    from tests.test_monitor import expected_cells_per_class

    plugin = load_plugin()
    with served_like_airflow(plugin) as url:
        page = rendered(url, tmp_path / "releases.png")
        notes = urllib.request.urlopen(f"{url}releases/{NEW_RELEASE}/notes").read().decode()
        lineage_runs = json.loads(urllib.request.urlopen(f"{url}releases/{NEW_RELEASE}/lineage").read())

    rows = {row["data-release"]: row for row in page.select("#releases tbody tr")}
    assert list(rows) == RELEASES[::-1]  # newest first
    assert page.find("script") is None and page.title.string == "ABC releases"
    assert rows[PRE_CONSENSUS_RELEASE].select_one(".error").get_text() == HOSTILE_ERROR

    def stages(release: str) -> dict[str, tuple[str, str]]:
        cells = rows[release].select("td.stage")
        return {name: (cell.select_one(".state").get_text(), cell.get_text(" ", strip=True))
                for name, cell in zip(["upstream", "mirror", "load", "expression", "checks", "publish"], cells,
                                      strict=True)}

    def scoped_bytes(release: str) -> int:
        return sum(f.size for f in settings.run_scope.mirrored(manifest_files(generated_bucket, release)))

    new, old, shared, skipped = (stages(r) for r in (NEW_RELEASE, OLD_RELEASE, UNCHANGED_RELEASE,
                                                      PRE_CONSENSUS_RELEASE))
    assert {state for state, _ in skipped.values()} == {"done", "skipped"}
    assert re.fullmatch(r"done seen \d+ (s|min) ago", new["upstream"][1])
    # Sizes in human units (NEW_RELEASE mirrored whole by the DAG).
    total = human_size(scoped_bytes(NEW_RELEASE))
    assert new["mirror"][0] == "done" and f"{total} of {total}" in new["mirror"][1]
    assert new["checks"] == ("done", f"done {len(CHECKS)}/{len(CHECKS)} passed") and new["expression"][0] == "waiting"
    assert re.fullmatch(r"done \d+ (s|min) ago, \d+ (s|min) after upstream", new["publish"][1])
    assert shared["load"] == ("done", f"done by reference: the rows of {OLD_RELEASE}")

    def datasets(release: str) -> dict[str, int]:
        badges = (b.get_text() for b in rows[release].select("details summary .badge"))
        return {state: int(n) for state, n in (b.rsplit(": ", 1) for b in badges)}

    def listed_and_scoped(release: str) -> tuple[int, int]:
        files = manifest_files(generated_bucket, release)
        return len({f.dataset for f in files}), len({f.dataset for f in settings.run_scope.mirrored(files)})

    listed, _ = listed_and_scoped(PRE_CONSENSUS_RELEASE)
    assert datasets(PRE_CONSENSUS_RELEASE) == {"skipped": listed}
    listed, scoped = listed_and_scoped(NEW_RELEASE)
    assert datasets(NEW_RELEASE) == {"published": scoped, "not in scope": listed - scoped}
    listed, scoped = listed_and_scoped(UNCHANGED_RELEASE)
    assert datasets(UNCHANGED_RELEASE) == {f"published by reference (data of {OLD_RELEASE})": scoped,
                                           "not in scope": listed - scoped}

    # Links: the DAG run in the Airflow UI (relative to the page, in the whole window), notes, lineage.
    links = {a.get_text(): a for a in rows[NEW_RELEASE].select("a")}
    dag_run = links[f"abc_mirror_release {processed_releases.run_id}"]
    assert dag_run["href"] == f"../dags/abc_mirror_release/runs/{quote(processed_releases.run_id, safe='')}"
    assert dag_run["target"] == "_top"
    assert links["release notes"]["href"] == f"releases/{NEW_RELEASE}/notes"
    assert notes.startswith("<!DOCTYPE html>") and f"Release {NEW_RELEASE}: changes since {UNCHANGED_RELEASE}" in notes
    assert "release notes" not in {a.get_text() for a in rows[OLD_RELEASE].select("a")}  # nothing to diff against
    lineage_link = links[f"lineage: {len(lineage_runs)} runs"]
    assert lineage_link["href"] == f"releases/{NEW_RELEASE}/lineage"
    assert [(r["step"], r["dag_id"], r["dag_run_id"]) for r in lineage_runs if r["step"] == "mirror"] == [
        ("mirror", "abc_mirror_release", processed_releases.run_id)]

    # The chart drew one bar per class and published release, its length proportional to the class's cells.
    published = [OLD_RELEASE, UNCHANGED_RELEASE, NEW_RELEASE]
    bars = page.select("#cells-per-class svg rect.bar")
    expected = {r: expected_cells_per_class(generated_bucket, r if r != UNCHANGED_RELEASE else OLD_RELEASE)
                for r in published}
    classes = sorted(expected[NEW_RELEASE].keys() - {diff.NO_CLASS})
    assert len(bars) == len(classes) * len(published)
    drawn = {bar.select_one("title").get_text(): float(bar["width"]) for bar in bars}
    assert drawn.keys() == {f"{c}, {r}: {expected[r][c]}" for c in classes for r in published}
    per_cell = [width / int(title.rsplit(": ", 1)[1]) for title, width in drawn.items()]
    assert max(drawn.values()) > 100 and max(per_cell) - min(per_cell) < 0.01

    screenshot = Image.open(tmp_path / "releases.png")
    assert screenshot.format == "PNG" and screenshot.width == 1600
    newest = tuple(int(diff.release_colours(3)[-1][i:i + 2], 16) for i in (1, 3, 5))
    painted = {colour: n for n, colour in screenshot.convert("RGB").getcolors(maxcolors=1 << 24)}
    assert painted.get(newest, 0) > 500  # the newest release's bars, painted


def test_stage_states_of_a_release_under_way():
    from etl.monitor import ReleaseStatus
    from etl.overview import Stage, StepRun, duration, stages

    now = datetime(2026, 4, 2, 12, tzinfo=UTC)
    release = ReleaseStatus(NEW_RELEASE, "loading", None, now - timedelta(hours=3), None, None, None, "4/5",
                            files_failed=2, files=10, files_ok=7, bytes=3_000_000, bytes_ok=2_100_000, datasets={})
    steps = {"load_metadata": StepRun("running", now - timedelta(minutes=12), None, None),
             "aggregate": StepRun("failed", now - timedelta(hours=1), now - timedelta(minutes=50), "MemoryError")}
    assert {s.name: (s.state, s.detail) for s in stages(release, steps, now)} == {
        "upstream": ("done", "seen 3 h ago"), "mirror": ("failed", "2 failed; 7/10 files, 2.1 MB of 3.0 MB"),
        "load": ("running", "started 12 min ago"), "expression": ("failed", "failed 50 min ago: MemoryError"),
        "checks": ("failed", "1 of 5 failed"), "publish": ("waiting", "not yet")}
    assert stages(replace(release, files_failed=0), {}, now)[1] == Stage("mirror", "partial",
                                                                         "7/10 files, 2.1 MB of 3.0 MB")
    assert [duration(timedelta(seconds=s)) for s in (0, 89, 90, 5399, 5400, 129600)] == [
        "0 s", "89 s", "2 min", "90 min", "2 h", "2 d"]


def test_release_notes_are_served_but_never_through_a_symlink(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    mirror = tmp_path / "mirror"
    notes = diff.release_notes_path(mirror, NEW_RELEASE)
    notes.parent.mkdir(parents=True)
    notes.write_text("<p>the notes</p>")
    secret = tmp_path / "secret.txt"
    secret.write_text("a password")
    planted = diff.release_notes_path(mirror, OLD_RELEASE)
    planted.parent.mkdir(parents=True)
    planted.symlink_to(secret)
    (mirror / "releases" / UNCHANGED_RELEASE).symlink_to(tmp_path)  # a directory on the way
    (tmp_path / "release-notes.html").write_text("outside the mirror")
    monkeypatch.setenv("ABC_MIRROR_ROOT", str(mirror))
    client = TestClient(load_plugin().app)

    served = client.get(f"/releases/{NEW_RELEASE}/notes")
    assert served.status_code == 200 and served.text == "<p>the notes</p>"
    for release in (OLD_RELEASE, UNCHANGED_RELEASE):
        refused = client.get(f"/releases/{release}/notes")
        assert refused.status_code == 403 and "symlink" in refused.text, refused.text
        assert "password" not in refused.text and "outside the mirror" not in refused.text
    assert client.get(f"/releases/{PRE_CONSENSUS_RELEASE}/notes").status_code == 404
    assert client.get("/releases/..%2F..%2Fsecret/notes").status_code in (404, 422)
