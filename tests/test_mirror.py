"""The mirror engine against rclone-served generated buckets and the real PostgreSQL server."""

from __future__ import annotations

import shutil

import pytest
import sqlalchemy as sa

from etl import source
from etl.discovery import discover
from etl.fixtures import NEW_RELEASE, OLD_RELEASE, md5_of_file
from etl.mirror import NotMirroredError, release_files_on_disk


def _record_by_hand(engine, settings, generated_bucket, release: str) -> None:
    """Copy a release's files into the mirror and record them, as a finished mirror run would."""
    root = settings.mirror_path
    rows = []
    for key in generated_bucket.files[release]:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(generated_bucket.bucket_dir / key, path)
        rows.append({"t": str(root), "k": key, "s": path.stat().st_size, "m": md5_of_file(path),
                     "n": path.stat().st_mtime_ns, "p": str(path)})
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO abc.mirror_object (target, relative_path, size, md5, mtime_ns, local_path) "
                             "VALUES (:t, :k, :s, :m, :n, :p)"), rows)


def test_release_files_on_disk_requires_verified_records(settings, engine, generated_bucket):
    discover(source.make_client(settings), settings, engine)
    with pytest.raises(NotMirroredError, match=OLD_RELEASE):
        release_files_on_disk(settings, engine, OLD_RELEASE)
    _record_by_hand(engine, settings, generated_bucket, OLD_RELEASE)
    files = release_files_on_disk(settings, engine, OLD_RELEASE, kinds=["metadata"])
    assert files and all(key.startswith("metadata/") for key in files)
    assert all(path.read_bytes() == (generated_bucket.bucket_dir / key).read_bytes() for key, path in files.items())
    raw = release_files_on_disk(settings, engine, OLD_RELEASE, kinds=["expression_matrices"], normalizations=["raw"])
    assert raw and all(key.endswith("-raw.h5ad") for key in raw)
    # The newer release pins a new consensus WMB metadata directory that nobody mirrored.
    with pytest.raises(NotMirroredError, match=f"release {NEW_RELEASE}: 4 of"):
        release_files_on_disk(settings, engine, NEW_RELEASE, kinds=["metadata"])
    victim = next(iter(files.values()))
    with victim.open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(NotMirroredError, match="1 of"):
        release_files_on_disk(settings, engine, OLD_RELEASE, kinds=["metadata"])
