"""Discovery against a real S3 endpoint (rclone) and the real PostgreSQL server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl import source
from etl.config import Settings
from etl.discovery import discover
from etl.fixtures import BUCKET, CONSENSUS_WMB, NEW_RELEASE, OLD_RELEASE, PRE_CONSENSUS_RELEASE, TAXONOMY
from etl.s3server import free_port, start_s3_server


def _count(engine: sa.Engine, sql: str, **params) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


def test_discovery_records_each_release_and_directory_once(settings: Settings, engine, generated_bucket):
    client = source.make_client(settings)
    first = discover(client, settings, engine)
    assert first.new_releases == generated_bucket.releases
    assert first.bad_manifests == {}
    kinds = {(d.kind, d.dataset, d.version) for d in first.new_directories}
    assert ("metadata", CONSENSUS_WMB, NEW_RELEASE) in kinds
    assert ("expression_matrices", "WMB-10Xv3", "20230630") in kinds
    assert ("metadata", TAXONOMY, OLD_RELEASE) in kinds

    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT version, status, n_files, total_bytes FROM abc.release ORDER BY version")).all()
    assert [r.version for r in rows] == generated_bucket.releases
    # The release before the consensus data is recorded too, as skipped: it is before the history floor.
    assert {r.version: r.status for r in rows} == {PRE_CONSENSUS_RELEASE: "skipped",
                                                   **dict.fromkeys(generated_bucket.consensus_releases, "upstream")}
    assert (first.floor, first.skipped, first.releases_to_process) == (
        OLD_RELEASE, [PRE_CONSENSUS_RELEASE], generated_bucket.consensus_releases)
    for release in generated_bucket.releases:
        assert _count(engine, "SELECT count(*) FROM abc.release_file WHERE release = :r",
                      r=release) == len(generated_bucket.files[release])
    # The newer release pins the new consensus WMB metadata and keeps the WMB matrices.
    pinned = dict(((r.dataset, r.kind), r.version) for r in engine.connect().execute(sa.text(
        "SELECT dataset, kind, version FROM abc.release_directory WHERE release = :r"), {"r": NEW_RELEASE}))
    assert pinned[(CONSENSUS_WMB, "metadata")] == NEW_RELEASE
    assert pinned[("WMB-10Xv3", "expression_matrices")] == "20230630"

    second = discover(client, settings, engine)
    assert second.new_releases == [] and second.new_directories == [] and second.changed_manifests == []
    assert "nothing new" in second.lines()
    assert _count(engine, "SELECT count(*) FROM abc.release") == len(generated_bucket.releases)
    assert _count(engine, "SELECT count(*) FROM abc.upstream_directory") == len(kinds)


def test_manifest_sizes_and_hashes_are_true(generated_bucket):
    from etl.fixtures import md5_of_file
    from etl.manifest import parse_manifest

    bucket_dir = generated_bucket.bucket_dir
    for release in generated_bucket.releases:
        key = f"releases/{release}/manifest.json"
        manifest = parse_manifest((bucket_dir / key).read_bytes(), key)
        assert manifest.version == release
        assert len(manifest.files) == len(generated_bucket.files[release])
        for f in manifest.files:
            path = bucket_dir / f.relative_path
            assert path.stat().st_size == f.size, f.relative_path
            assert md5_of_file(path) == f.md5, f.relative_path


def _copy_bucket(generated_bucket, tmp_path: Path) -> Path:
    root = tmp_path / "served"
    shutil.copytree(generated_bucket.root, root)
    return root


def test_malformed_manifest_is_reported_by_key_and_skipped(generated_bucket, tmp_path, database_url, engine):
    root = _copy_bucket(generated_bucket, tmp_path)
    bad = root / BUCKET / "releases" / NEW_RELEASE / "manifest.json"
    doc = json.loads(bad.read_text())
    first_dataset = next(iter(doc["file_listing"].values()))
    first_tag = next(iter(next(iter(first_dataset.values())).values()))
    entry = first_tag["files"] if "files" in first_tag else next(iter(first_tag.values()))["files"]
    next(iter(entry.values()))["file_hash"] = "not-a-hash"
    bad.write_text(json.dumps(doc))
    (root / BUCKET / "releases" / "20270101").mkdir()
    (root / BUCKET / "releases" / "20270101" / "manifest.json").write_text("{ truncated")

    server = start_s3_server(root)
    try:
        settings = Settings(database_url=database_url, endpoint_url=server.endpoint_url)
        report = discover(source.make_client(settings), settings, engine)
    finally:
        server.stop()
    good = [r for r in generated_bucket.releases if r != NEW_RELEASE]
    assert report.new_releases == good
    bad_key = f"releases/{NEW_RELEASE}/manifest.json"
    assert set(report.bad_manifests) == {bad_key, "releases/20270101/manifest.json"}
    assert "not-a-hash" in report.bad_manifests[bad_key]
    assert "not valid JSON" in report.bad_manifests["releases/20270101/manifest.json"]
    assert _count(engine, "SELECT count(*) FROM abc.release") == len(good)
    assert _count(engine, "SELECT count(*) FROM abc.manifest_problem") == 2


def test_empty_bucket_records_nothing(tmp_path, engine, database_url):
    (tmp_path / "empty" / BUCKET).mkdir(parents=True)
    server = start_s3_server(tmp_path / "empty")
    try:
        settings = Settings(database_url=database_url, endpoint_url=server.endpoint_url)
        report = discover(source.make_client(settings), settings, engine)
    finally:
        server.stop()
    assert report.releases_seen == [] and report.new_releases == [] and report.new_directories == []
    assert _count(engine, "SELECT count(*) FROM abc.release") == 0


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etl.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_discover_prints_new_releases_then_nothing(s3_server, database_url):
    args = ["discover", "--endpoint-url", s3_server.endpoint_url, "--database-url", database_url]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    assert f"new release: {OLD_RELEASE}" in first.stdout and f"new release: {NEW_RELEASE}" in first.stdout
    second = _cli(*args)
    assert second.returncode == 0 and "nothing new" in second.stdout


def test_cli_unreachable_bucket_fails_clearly(database_url):
    port = free_port()  # nothing listens there
    result = _cli("discover", "--endpoint-url", f"http://127.0.0.1:{port}", "--database-url", database_url)
    assert result.returncode == 2
    assert "source unreachable" in result.stderr and str(port) in result.stderr


def test_cli_unreachable_database_fails_clearly(s3_server):
    port = free_port()
    result = _cli("discover", "--endpoint-url", s3_server.endpoint_url,
                  "--database-url", f"postgresql+psycopg://postgres@127.0.0.1:{port}/abc")
    assert result.returncode == 2 and "database unreachable" in result.stderr


@pytest.mark.parametrize("key", ["../../x", "/etc/passwd", "a/../b", "a//b", "a/./b", "a\\b"])
def test_hostile_keys_are_refused(key):
    from etl.manifest import UnsafeKeyError, check_relative_key

    with pytest.raises(UnsafeKeyError, match="key"):
        check_relative_key(key)
