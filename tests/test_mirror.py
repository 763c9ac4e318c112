"""The mirror engine against rclone-served generated buckets and the real PostgreSQL server."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from botocore.client import BaseClient

import etl.transfer.small_files as small_files_module
from etl import cli, source
from etl.catalog import LocalRoot, NotMirroredError, release_files_on_disk
from etl.config import Settings
from etl.discovery import discover
from etl.fixtures import (
    BUCKET,
    CONSENSUS_WMB,
    NEW_DATASET,
    NEW_RELEASE,
    OLD_RELEASE,
    TAXONOMY,
    UNCHANGED_RELEASE,
    WMB_GENE_KEY,
    md5_of_file,
    write_manifest,
)
from etl.manifest import ManifestError, UnsafeKeyError
from etl.mirror import InsufficientSpaceError, mirror_release
from etl.s3server import S3Server, start_s3_server
from etl.transfer import FileJob, Transfer, TransferError
from etl.transfer.files import GroupSync, _reopen_direct
from tests.conftest import REPO

VOLUME = "image_volumes/Test-Volume/20251031/sub/volume.nii.gz"
VOLUME_SIZE = 10 * (1 << 20) + 12345  # several ranged parts locally; a multipart upload to S3
SMALL_PARTS = 256 << 10


def _add_volume(bucket_dir: Path) -> None:
    """A large file of another kind, one level deeper, listed by both releases."""
    path = bucket_dir / VOLUME
    path.parent.mkdir(parents=True)
    path.write_bytes(hashlib.shake_256(b"volume").digest(VOLUME_SIZE))
    for release in (OLD_RELEASE, NEW_RELEASE):
        write_manifest(bucket_dir, release)


@pytest.fixture(scope="module")
def mirror_source(generated_bucket, tmp_path_factory) -> Path:
    """The generated bucket plus a large volume file (the session bucket itself stays untouched)."""
    root = tmp_path_factory.mktemp("mirror-source")
    shutil.copytree(generated_bucket.root, root, dirs_exist_ok=True)
    _add_volume(root / BUCKET)
    return root


@pytest.fixture(scope="module")
def mirror_server(mirror_source):
    server = start_s3_server(mirror_source)
    yield server
    server.stop()


@pytest.fixture
def msettings(mirror_server: S3Server, settings: Settings) -> Settings:
    """The test's settings (own database and mirror root) pointed at the bucket with the volume, in the
    ``atlas`` scope: the engine mirrors every file a manifest lists, of every kind."""
    return replace(settings, endpoint_url=mirror_server.endpoint_url, scope="atlas")


def _manifest_files(bucket_dir: Path, release: str) -> dict[str, dict]:
    from etl.manifest import parse_manifest

    key = f"releases/{release}/manifest.json"
    return {f.relative_path: f for f in parse_manifest((bucket_dir / key).read_bytes(), key).files}


def _release_row(engine, release: str):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT status, mirrored_at, last_error FROM abc.release WHERE version = :r"),
                            {"r": release}).one()


def test_full_mirror_then_nothing_then_only_what_changed(msettings, engine, mirror_source):
    bucket_dir = mirror_source / BUCKET
    old_files = _manifest_files(bucket_dir, OLD_RELEASE)
    first = mirror_release(msettings, engine, OLD_RELEASE, part_size=SMALL_PARTS, progress=False)
    assert first.failed == {} and first.fetched == len(old_files) == first.selected
    assert first.bytes_fetched == sum(f.size for f in old_files.values())
    root = msettings.mirror_path
    for key, f in old_files.items():
        assert (root / key).read_bytes() == (bucket_dir / key).read_bytes(), key
        assert md5_of_file(root / key) == f.md5
    manifest_key = f"releases/{OLD_RELEASE}/manifest.json"
    assert (root / manifest_key).read_bytes() == (bucket_dir / manifest_key).read_bytes()
    assert not list(root.rglob("*.partial*"))
    assert _release_row(engine, OLD_RELEASE).status == "mirrored"
    assert set(release_files_on_disk(msettings, engine, OLD_RELEASE)) == set(old_files)
    with engine.connect() as conn:
        listed = conn.execute(sa.text("SELECT count(*) FROM abc.mirrored_release_file WHERE release = :r "
                                      "AND target = :t AND etag IS NOT NULL"),
                              {"r": OLD_RELEASE, "t": str(root)}).scalar_one()
    assert listed == len(old_files)

    second = mirror_release(msettings, engine, OLD_RELEASE, progress=False)
    assert (second.fetched, second.copied, second.bytes_fetched, second.failed) == (0, 0, 0, {})
    assert second.skipped == second.ok == len(old_files) and second.adopted == 0

    new_files = _manifest_files(bucket_dir, NEW_RELEASE)
    changed = {k for k in new_files if k not in old_files}
    new_directories = (f"metadata/{CONSENSUS_WMB}/{NEW_RELEASE}/", f"metadata/{TAXONOMY}/{NEW_RELEASE}/",
                       f"metadata/{NEW_DATASET}/{UNCHANGED_RELEASE}/")
    assert changed and all(k.startswith(new_directories) for k in changed)
    newer = mirror_release(msettings, engine, NEW_RELEASE, progress=False)
    assert newer.failed == {} and newer.skipped == len(new_files) - len(changed)
    # donor.csv, library.csv, ... did not change between the directories: copied locally, not downloaded.
    assert newer.copied >= 1 and newer.fetched + newer.copied == len(changed)
    assert newer.bytes_fetched < sum(new_files[k].size for k in changed)
    assert all(md5_of_file(root / k) == new_files[k].md5 for k in changed)
    assert _release_row(engine, NEW_RELEASE).status == "mirrored"

    verified = mirror_release(msettings, engine, NEW_RELEASE, verify=True, progress=False)
    assert verified.adopted == len(new_files) and verified.bytes_fetched == 0

    status = "\n".join(cli_output(["status", "--target", str(root), "--database-url", msettings.database_url]))
    assert f"release {OLD_RELEASE}: mirrored" in status
    assert f"{len(old_files)} of the manifest's {len(old_files)} files" in status
    assert "fetched 0" in status and "failed 0" in status


def cli_output(argv: list[str], capsys=None) -> list[str]:
    """Run the CLI in-process and return its standard output lines."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    assert code == 0, out.getvalue()
    return out.getvalue().splitlines()


def test_files_copied_by_other_means_are_adopted_and_bad_ones_replaced(msettings, engine, mirror_source):
    root = msettings.mirror_path
    files = _manifest_files(mirror_source / BUCKET, OLD_RELEASE)
    for key in files:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mirror_source / BUCKET / key, root / key)
    damaged = next(k for k in files if k.endswith(".csv"))
    data = bytearray((root / damaged).read_bytes())
    data[10] ^= 0xFF
    (root / damaged).write_bytes(bytes(data))

    dry = mirror_release(msettings, engine, OLD_RELEASE, dry_run=True)
    assert dry.dry_run and dry.adopted == len(files) and dry.fetched == 0
    report = mirror_release(msettings, engine, OLD_RELEASE, progress=False)
    assert report.failed == {} and report.fetched == 1 and report.adopted == len(files) - 1
    assert report.bytes_fetched == files[damaged].size
    assert md5_of_file(root / damaged) == files[damaged].md5


def test_dry_run_changes_nothing(msettings, engine):
    report = mirror_release(msettings, engine, OLD_RELEASE, kinds=["metadata"], dry_run=True)
    assert report.fetched == report.selected > 0 and report.bytes_to_fetch > 0
    assert not msettings.mirror_path.exists()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM abc.release")).scalar_one() == 0


def test_selection_by_dataset_kind_and_normalization(msettings, engine):
    report = mirror_release(msettings, engine, OLD_RELEASE, kinds=["expression_matrices"],
                            normalizations=["raw"], progress=False)
    assert report.failed == {} and report.fetched == report.selected > 0
    on_disk = [p for p in msettings.mirror_path.rglob("*.h5ad")]
    assert on_disk and all(p.name.endswith("-raw.h5ad") for p in on_disk)
    # Only part of the release is there: it is not 'mirrored', and loading refuses the rest.
    assert _release_row(engine, OLD_RELEASE).status == "upstream"
    with pytest.raises(NotMirroredError, match="not mirrored and verified"):
        release_files_on_disk(msettings, engine, OLD_RELEASE, kinds=["metadata"])


def test_two_releases_mirrored_at_once_share_their_files(msettings, engine, mirror_source):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda r: mirror_release(msettings, engine, r, part_size=SMALL_PARTS, progress=False),
                                [OLD_RELEASE, NEW_RELEASE]))
    assert all(r.failed == {} for r in reports)
    for release in (OLD_RELEASE, NEW_RELEASE):
        manifest = _manifest_files(mirror_source / BUCKET, release)
        files = release_files_on_disk(msettings, engine, release)
        assert set(files) == set(manifest) and all(md5_of_file(p) == manifest[k].md5 for k, p in files.items())
    assert not list(msettings.mirror_path.rglob("*.partial*"))


def test_killed_download_resumes_from_its_partial(msettings, engine, mirror_source):
    env = {**os.environ, "ABC_DATABASE_URL": msettings.database_url, "AWS_ENDPOINT_URL_S3": msettings.endpoint_url}
    command = [sys.executable, "-m", "etl.cli", "mirror", "--release", OLD_RELEASE, "--target", msettings.mirror_root,
               "--dataset", "Test-Volume", "--scope", "atlas", "--part-size", "1", "--workers", "2",
               "--max-bandwidth", "3M", "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecar = msettings.mirror_path / (VOLUME + ".partial.json")
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                if len(json.loads(sidecar.read_text())["done"]) >= 3:
                    break
            except (OSError, ValueError):
                pass
            assert process.poll() is None, "the mirror finished before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert (msettings.mirror_path / (VOLUME + ".partial")).exists()
    assert not (msettings.mirror_path / VOLUME).exists()

    report = mirror_release(msettings, engine, OLD_RELEASE, datasets=["Test-Volume"], progress=False)
    assert report.failed == {} and report.fetched == 1
    assert 0 < report.bytes_fetched <= VOLUME_SIZE - 3 * (1 << 20)
    assert (msettings.mirror_path / VOLUME).read_bytes() == (mirror_source / BUCKET / VOLUME).read_bytes()
    assert not sidecar.exists()


@pytest.fixture(scope="module")
def tampered_server(mirror_source, tmp_path_factory):
    """A copy whose objects no longer match the manifest: a small CSV and the large volume, same sizes."""
    root = tmp_path_factory.mktemp("tampered")
    shutil.copytree(mirror_source, root, dirs_exist_ok=True)
    bucket_dir = root / BUCKET
    for key in (VOLUME, f"metadata/{CONSENSUS_WMB}/{OLD_RELEASE}/donor.csv"):
        data = bytearray((bucket_dir / key).read_bytes())
        data[len(data) // 2] ^= 0x01
        (bucket_dir / key).write_bytes(bytes(data))
    server = start_s3_server(root)
    yield server
    server.stop()


def test_corrupted_objects_are_never_placed(tampered_server, msettings, engine, capsys, monkeypatch):
    settings = replace(msettings, endpoint_url=tampered_server.endpoint_url)
    bad = {VOLUME, f"metadata/{CONSENSUS_WMB}/{OLD_RELEASE}/donor.csv"}
    monkeypatch.setattr("etl.mirror.backoff_delay", lambda attempt: 0.0)
    report = mirror_release(settings, engine, OLD_RELEASE, part_size=SMALL_PARTS, progress=False)
    assert set(report.failed) == bad
    assert all("differs from the manifest" in why and "attempt 3 of 3" in why for why in report.failed.values())
    root = settings.mirror_path
    for key in bad:
        assert not (root / key).exists() and not (root / (key + ".partial")).exists()
    assert report.ok == report.selected - 2
    row = _release_row(engine, OLD_RELEASE)
    assert row.status == "failed" and "donor.csv" in row.last_error
    with pytest.raises(NotMirroredError, match="donor.csv"):
        release_files_on_disk(settings, engine, OLD_RELEASE)

    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)
    capsys.readouterr()
    code = cli.main(["mirror", "--release", OLD_RELEASE, "--target", settings.mirror_root, "--scope", "atlas",
                     "--no-progress"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_FAILED
    assert "2 files failed" in captured.err and VOLUME in captured.err and "donor.csv" in captured.err
    assert "fetched 0" in captured.out  # the good files were not fetched again


def test_hostile_keys_and_symlinks_are_refused(msettings, engine, tmp_path):
    root = LocalRoot(tmp_path / "dest")
    for key in ("../escape.csv", "/etc/passwd", "a/../../b", "a//b", "./a"):
        with pytest.raises(UnsafeKeyError):
            root.path(key)
    outside = tmp_path / "outside"
    outside.mkdir()
    mirror_root = msettings.mirror_path
    mirror_root.mkdir(parents=True)
    (mirror_root / "metadata").symlink_to(outside, target_is_directory=True)
    report = mirror_release(msettings, engine, OLD_RELEASE, kinds=["metadata"], progress=False)
    assert report.failed and all("symlink" in why for why in report.failed.values())
    assert report.fetched == 0 and list(outside.iterdir()) == []


def test_a_symlink_planted_at_the_partial_path_is_refused_not_followed(msettings, engine, mirror_source, tmp_path):
    files = _manifest_files(mirror_source / BUCKET, OLD_RELEASE)
    small = min((f for f in files.values() if f.kind == "metadata"), key=lambda f: f.size).relative_path
    large = max((f for f in files.values() if f.size > 2 * SMALL_PARTS), key=lambda f: f.size).relative_path
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("not the mirror's\n")
    planted = {}
    for key, target in ((small, victim), (large, outside / "created-by-mirror")):
        final = msettings.mirror_path.joinpath(*key.split("/"))
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(final.name + ".partial")
        partial.symlink_to(target)  # an existing file outside, and a dangling link the mirror would create
        planted[key] = partial
    report = mirror_release(msettings, engine, OLD_RELEASE, keys=[small, large], part_size=SMALL_PARTS,
                            progress=False)
    assert set(report.failed) == {small, large}
    for key, partial in planted.items():
        assert f"{partial} is a symlink" in report.failed[key], report.failed[key]
        assert partial.is_symlink() and not msettings.mirror_path.joinpath(*key.split("/")).exists()
    assert victim.read_text() == "not the mirror's\n" and sorted(outside.iterdir()) == [victim]


def test_sidecar_and_temporary_files_never_follow_a_symlink(tmp_path):
    from etl.transfer import SymlinkRefusedError, write_file_nofollow
    from etl.transfer.files import Sidecar

    outside = tmp_path / "outside.json"
    outside.write_text("keep")
    sidecar = tmp_path / "mirror" / "x.h5ad.partial.json"
    sidecar.parent.mkdir()
    sidecar.with_name(sidecar.name + ".tmp").symlink_to(outside)
    with pytest.raises(SymlinkRefusedError, match="x.h5ad.partial.json.tmp is a symlink"):
        Sidecar(sidecar, 10, "0" * 32, 4, None, {0}).save(-1, durable=False)
    with pytest.raises(SymlinkRefusedError, match="release-notes.md.partial is a symlink"):
        (tmp_path / "mirror" / "release-notes.md.partial").symlink_to(outside)
        write_file_nofollow(tmp_path / "mirror" / "release-notes.md.partial", b"notes")
    assert outside.read_text() == "keep"


def test_manifest_with_hostile_key_is_refused_whole(mirror_source, tmp_path, database_url, engine):
    root = tmp_path / "served"
    shutil.copytree(mirror_source, root)
    path = root / BUCKET / "releases" / OLD_RELEASE / "manifest.json"
    doc = json.loads(path.read_text())
    entry = doc["file_listing"][CONSENSUS_WMB]["metadata"]["donor"]["files"]["csv"]
    entry["relative_path"] = "../../outside.csv"
    path.write_text(json.dumps(doc))
    server = start_s3_server(root)
    try:
        settings = Settings(database_url=database_url, endpoint_url=server.endpoint_url,
                            mirror_root=str(tmp_path / "mirror"))
        with pytest.raises(ManifestError, match=r"\.\./\.\./outside\.csv"):
            mirror_release(settings, engine, OLD_RELEASE, progress=False)
    finally:
        server.stop()
    assert not (tmp_path / "mirror").exists() and not (tmp_path / "outside.csv").exists()


def test_disk_space_preflight_fails_before_fetching(msettings, engine):
    with pytest.raises(InsufficientSpaceError, match="still to fetch but only 0.00 GB free"):
        mirror_release(msettings, engine, OLD_RELEASE, free_space=lambda path: 1000, progress=False)
    assert [p for p in msettings.mirror_path.rglob("*") if p.is_file()] == []  # nothing fetched, not even a .partial
    # Metadata alone fits.
    metadata_bytes = mirror_release(msettings, engine, OLD_RELEASE, kinds=["metadata"], dry_run=True).bytes_to_fetch
    report = mirror_release(msettings, engine, OLD_RELEASE, kinds=["metadata"], progress=False,
                            free_space=lambda path: metadata_bytes)
    assert report.failed == {} and report.fetched == report.selected


def test_free_space_is_checked_once_for_the_whole_planned_release(msettings, engine):
    from etl import pipeline
    from etl.mirror import check_free_space

    discover(source.make_client(msettings), msettings, engine)
    files = pipeline.release_files(engine, OLD_RELEASE, msettings.run_scope)
    keys = [f.key for f in files]
    total = sum(f.size for f in files)
    batches = pipeline.plan_batches(files, batch_bytes=max(1, total // 8))
    assert len(batches) > 1
    # Each batch alone fits in what is free, the release as a whole does not.
    free = max(sum(f.size for f in files if f.key in batch) for batch in batches)
    assert free < total
    seen: list[Path] = []

    def free_space(path: Path) -> int:
        seen.append(path)
        return free

    with pytest.raises(InsufficientSpaceError) as refused:
        check_free_space(msettings, engine, OLD_RELEASE, keys, free_space=free_space)
    message = str(refused.value)
    assert str(msettings.mirror_path) in message and OLD_RELEASE in message
    assert f"{total} bytes needed" in message and f"{free} bytes free" in message
    assert seen == [msettings.mirror_path]
    assert not msettings.mirror_path.exists() or not any(msettings.mirror_path.rglob("*"))

    # Files already mirrored and recorded are not counted again.
    metadata = mirror_release(msettings, engine, OLD_RELEASE, kinds=["metadata"], progress=False)
    assert metadata.failed == {} and metadata.fetched > 0
    metadata_bytes = sum(f.size for f in files if f.key.startswith("metadata/"))
    assert check_free_space(msettings, engine, OLD_RELEASE, keys, free_space=lambda p: total) == total - metadata_bytes
    assert check_free_space(msettings.with_overrides(mirror_root="s3://elsewhere/abc"), engine, OLD_RELEASE, keys,
                            free_space=lambda p: 0) == 0


def test_s3_target(msettings, engine, mirror_source, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    calls: list[str] = []
    make_api_call = BaseClient._make_api_call

    def spy(self, operation, params):
        calls.append(operation)
        return make_api_call(self, operation, params)

    monkeypatch.setattr(BaseClient, "_make_api_call", spy)
    (tmp_path / "target" / "mirror-target").mkdir(parents=True)
    target_server = start_s3_server(tmp_path / "target")
    try:
        settings = replace(msettings, mirror_root="s3://mirror-target/abc/")
        files = _manifest_files(mirror_source / BUCKET, OLD_RELEASE)
        report = mirror_release(settings, engine, OLD_RELEASE, target_endpoint_url=target_server.endpoint_url,
                                part_size=SMALL_PARTS, progress=False)
        assert report.failed == {} and report.fetched == len(files) and report.target == "s3://mirror-target/abc"
        target = source.make_client(Settings(endpoint_url=target_server.endpoint_url))
        assert calls.count("UploadPart") == 2 and calls.count("CompleteMultipartUpload") == 1  # the volume
        for key, f in files.items():
            body = target.get_object(Bucket="mirror-target", Key=f"abc/{key}")["Body"].read()
            assert hashlib.md5(body).hexdigest() == f.md5, key
        manifest_key = f"releases/{OLD_RELEASE}/manifest.json"
        manifest = target.get_object(Bucket="mirror-target", Key=f"abc/{manifest_key}")
        assert manifest["Body"].read() == (mirror_source / BUCKET / manifest_key).read_bytes()
        assert _release_row(engine, OLD_RELEASE).status == "mirrored"

        again = mirror_release(settings, engine, OLD_RELEASE, target_endpoint_url=target_server.endpoint_url,
                               progress=False)
        assert (again.fetched, again.bytes_fetched, again.skipped) == (0, 0, len(files))
    finally:
        target_server.stop()


def test_release_files_on_disk_requires_verified_records(settings, engine, generated_bucket):
    discover(source.make_client(settings), settings, engine)
    with pytest.raises(NotMirroredError, match=OLD_RELEASE):
        release_files_on_disk(settings, engine, OLD_RELEASE)
    mirror_release(settings, engine, OLD_RELEASE, progress=False)
    files = release_files_on_disk(settings, engine, OLD_RELEASE, kinds=["metadata"])
    assert files and all(key.startswith("metadata/") for key in files)
    assert all(path.read_bytes() == (generated_bucket.bucket_dir / key).read_bytes() for key, path in files.items())
    raw = release_files_on_disk(settings, engine, OLD_RELEASE, kinds=["expression_matrices"], normalizations=["raw"])
    assert raw and all(key.endswith("-raw.h5ad") for key in raw)
    # The newer release pins new consensus WMB and taxonomy metadata directories that nobody mirrored;
    # what the consensus scope selects of its metadata: the consensus datasets' and the AIBS genes.
    selected = [k for k in generated_bucket.files[NEW_RELEASE] if k.startswith("metadata/")
                and (settings.run_scope.has_loader(k.split("/")[1]) or k == WMB_GENE_KEY)]
    unmirrored = [k for k in selected if k not in generated_bucket.files[OLD_RELEASE]]
    assert len(unmirrored) > 4
    with pytest.raises(NotMirroredError, match=f"release {NEW_RELEASE}: {len(unmirrored)} of {len(selected)} "):
        release_files_on_disk(settings, engine, NEW_RELEASE, kinds=["metadata"])
    victim = next(iter(files.values()))
    with victim.open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(NotMirroredError, match="1 of"):
        release_files_on_disk(settings, engine, OLD_RELEASE, kinds=["metadata"])


class _FlakyS3(http.server.BaseHTTPRequestHandler):
    """Serves ``/bucket/<key>`` with Range support; the first requests fail (503 SlowDown, a cut body)."""

    protocol_version = "HTTP/1.1"
    data = b""
    failures: list[str] = []
    seen: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def send_error_body(self, status: int, code: str) -> None:
        body = f"<Error><Code>{code}</Code></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Range", ""))
        if not self.path.startswith("/bucket/blob"):
            self.send_error_body(404, "NoSuchKey")
            return
        first, last = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        body = self.data[first:last + 1]
        failure = self.failures.pop(0) if self.failures else ""
        if failure == "503":
            self.send_error_body(503, "SlowDown")
            return
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(self.data)}")
        self.send_header("ETag", '"flaky"')
        self.end_headers()
        if failure == "cut":  # half the body, then the connection drops
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def flaky_s3():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_unsigned_gets_retry_throttling_and_dropped_connections(flaky_s3, tmp_path, monkeypatch):
    """The plain-HTTP GET path: 503 SlowDown and a body cut short are retried (from the byte reached), MD5 checked."""
    monkeypatch.setattr("etl.transfer.common.backoff_delay", lambda attempt: 0.0)
    data = hashlib.shake_256(b"flaky").digest(3 * (1 << 20) + 777)
    _FlakyS3.data, _FlakyS3.failures, _FlakyS3.seen = data, ["503", "cut", "503", "cut"], []
    client = source.make_client(Settings(endpoint_url=flaky_s3))
    transfer = Transfer(client, "bucket", workers=3, part_size=1 << 20, durable=True)
    try:
        assert transfer.http is not None  # unsigned: no botocore per GET
        job = FileJob("blob", len(data), hashlib.md5(data).hexdigest())
        assert transfer.download(job, tmp_path / "blob") == "flaky"
        assert (tmp_path / "blob").read_bytes() == data and not list(tmp_path.glob("*.partial*"))
        assert _FlakyS3.failures == [] and len(_FlakyS3.seen) == 4 + 4  # 4 parts, 4 failed attempts
        # A dropped connection continues where it stopped, not at the start of the range.
        assert any(int(r.removeprefix("bytes=").split("-")[0]) % (1 << 20) for r in _FlakyS3.seen)
        with pytest.raises(TransferError, match="GET failed: NoSuchKey"):
            transfer.download(FileJob("missing", 10, "0" * 32), tmp_path / "missing")
        wrong = FileJob("blob", len(data), "0" * 32)
        with pytest.raises(TransferError, match="differs from the manifest") as failed:
            transfer.download(wrong, tmp_path / "wrong")
        assert failed.value.retry_file and not list(tmp_path.glob("wrong*"))
    finally:
        transfer.close()
    signed = source.make_client(Settings(endpoint_url=flaky_s3, unsigned=False))
    assert Transfer(signed, "bucket", workers=1).http is None  # signed requests keep botocore


class _WriteSpy:
    """Records every ``os.pwrite`` and ``os.pread`` of the transfer module: (O_DIRECT?, offset, length)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse_direct_write: bool = False) -> None:
        self.writes: list[tuple[bool, int, int]] = []
        self.reads = 0
        pwrite, pread = os.pwrite, os.pread

        def spied_pwrite(fd: int, data, offset: int) -> int:
            direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
            if direct and refuse_direct_write:
                raise OSError(errno.EINVAL, "Invalid argument")
            written = pwrite(fd, data, offset)
            self.writes.append((direct, offset, written))
            return written

        def spied_pread(fd: int, n: int, offset: int) -> bytes:
            self.reads += 1
            return pread(fd, n, offset)

        monkeypatch.setattr("etl.transfer.files.os.pwrite", spied_pwrite)
        monkeypatch.setattr("etl.transfer.files.os.pread", spied_pread)


def _download_blob(flaky_s3: str, tmp_path: Path, durable: bool = True) -> bytes:
    data = hashlib.shake_256(b"direct").digest(3 * (1 << 20) + 777)
    _FlakyS3.data, _FlakyS3.failures, _FlakyS3.seen = data, [], []
    transfer = Transfer(source.make_client(Settings(endpoint_url=flaky_s3)), "bucket", workers=3,
                        part_size=1 << 20, durable=durable)
    try:
        transfer.download(FileJob("blob", len(data), hashlib.md5(data).hexdigest()), tmp_path / "blob")
    finally:
        transfer.close()
    assert (tmp_path / "blob").read_bytes() == data and not list(tmp_path.glob("*.partial*"))
    return data


def test_large_files_are_written_with_o_direct_and_hashed_from_memory(flaky_s3, tmp_path, monkeypatch):
    probe = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT)
    try:
        if _reopen_direct(probe) is None:
            pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    finally:
        os.close(probe)
    spy = _WriteSpy(monkeypatch)
    data = _download_blob(flaky_s3, tmp_path)
    # Every whole part went to the disk without the page cache; only the last 777 bytes (unaligned) did not.
    assert sorted(w for w in spy.writes if w[0]) == [(True, i << 20, 1 << 20) for i in range(3)]
    assert [w for w in spy.writes if not w[0]] == [(False, 3 << 20, 777)]
    assert sum(w[2] for w in spy.writes) == len(data)
    assert spy.reads == 0  # nothing read back to be hashed


@pytest.mark.parametrize("refused", ["at open", "at write", "not durable"])
def test_without_o_direct_parts_go_through_the_page_cache(flaky_s3, tmp_path, monkeypatch, refused):
    """A filesystem that refuses O_DIRECT (at open, or at the first write, as some do) still gets every
    byte, written through the page cache and still hashed from memory; so does a run without fsync."""
    if refused == "at open":
        monkeypatch.setattr("etl.transfer.files.os.O_DIRECT", 0o40000000, raising=False)
        real_open = os.open

        def refusing_open(path, flags: int, *args):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr("etl.transfer.files.os.open", refusing_open)
    spy = _WriteSpy(monkeypatch, refuse_direct_write=refused == "at write")
    data = _download_blob(flaky_s3, tmp_path, durable=refused != "not durable")
    assert not any(direct for direct, _, _ in spy.writes)
    assert sum(w[2] for w in spy.writes) == len(data) and spy.reads == 0


def test_small_files_are_made_durable_by_one_sync_per_batch_before_their_renames(msettings, engine, monkeypatch):
    """Thousands of small files must not cost a sync each: a batch of them is fetched into .partial files,
    synced once, then renamed (a file is never renamed before its bytes are on disk)."""
    synced: list[int] = []
    sync = GroupSync.sync

    def counted(self: GroupSync, fd: int) -> None:
        synced.append(len(list(msettings.mirror_path.rglob("*.partial"))))  # not renamed yet
        sync(self, fd)

    monkeypatch.setattr(GroupSync, "sync", counted)
    report = mirror_release(msettings, engine, OLD_RELEASE, kinds=["metadata"], workers=2, progress=False)
    assert report.failed == {} and report.fetched >= 10
    assert 1 <= len(synced) <= 4 and min(synced) >= 1
    assert not list(msettings.mirror_path.rglob("*.partial*"))


@pytest.mark.parametrize("small_files", ["in one thread", "a batch to a thread"])
def test_an_unexpected_error_in_a_batch_fails_that_file_only(msettings, engine, monkeypatch, small_files):
    """Whether small files go through the selector loop (plain-HTTP GETs) or a batch to each thread (botocore's
    GETs), an error nobody expected while writing one of them fails that file alone."""
    victim = f"metadata/{CONSENSUS_WMB}/{OLD_RELEASE}/donor.csv"
    if small_files == "in one thread":
        write_at = small_files_module.write_at

        def failing_write(fd: int, chunk: bytes, pos: int, path: Path) -> None:
            if str(path).endswith(f"{victim}.partial"):
                raise RuntimeError("not a transfer error")
            write_at(fd, chunk, pos, path)

        monkeypatch.setattr(small_files_module, "write_at", failing_write)
    else:
        fetch_whole = Transfer._fetch_whole

        def failing(self: Transfer, job: FileJob, *args) -> str:
            if job.key == victim:
                raise RuntimeError("not a transfer error")
            return fetch_whole(self, job, *args)

        monkeypatch.setattr(Transfer, "small_files_in_one_thread", property(lambda self: False))
        monkeypatch.setattr(Transfer, "_fetch_whole", failing)
    report = mirror_release(msettings, engine, OLD_RELEASE, kinds=["metadata"], workers=2, progress=False)
    assert report.failed == {victim: "RuntimeError: not a transfer error"}
    assert report.fetched == report.selected - 1 >= 10
    # The others of its batch were placed; its own .partial stays for the next run, as after any failure.
    assert [p.name for p in msettings.mirror_path.rglob("*.partial*")] == ["donor.csv.partial"]
