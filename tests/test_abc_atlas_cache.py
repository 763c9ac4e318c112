"""The mirror opened as an ``abc_atlas_access`` cache: what the client would find there after each mirror run.

The client (``AllenInstitute/abc_atlas_access``) is not on PyPI and cannot be installed here, so
these tests read the bookkeeping exactly as its code does (``AbcClientView``: the lookups of
``cloud_cache.py`` and ``manifest.py`` at commit 6d111958, each method naming the client function
it reproduces) and check the files :mod:`etl.abc_atlas_cache` writes in the formats that code reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path, PurePosixPath

import sqlalchemy as sa

from etl import pipeline
from etl.abc_atlas_cache import DOWNLOADED_DATA, MANIFEST_LAST_USED, manifest_name, write_client_cache
from etl.fixtures import NEW_RELEASE, OLD_RELEASE
from tests.conftest import scoped_keys


class AbcClientView:
    """What ``AbcProjectCache`` sees in a cache directory, computed as the client computes it."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    def manifests(self) -> list[str]:
        """``BasicLocalCache.list_all_downloaded_manifests`` (a ``LocalCache``'s manifest names)."""
        return sorted("releases/" + str(PurePosixPath(x)).split("releases/")[-1]
                      for x in self.cache_dir.glob("releases/*/manifest.json"))

    def loaded_manifest(self) -> str:
        """``CloudCacheBase.load_last_manifest`` as ``AbcProjectCache.from_local_cache`` runs it."""
        last_used = self.cache_dir / "_manifest_last_used.txt"
        if not last_used.exists():
            return max(self.manifests())  # load_latest_manifest
        with open(last_used) as in_file:
            to_load = in_file.read()
        return to_load if to_load in self.manifests() else max(self.manifests())

    def warns_of_unrecorded_files(self) -> bool:
        """``CloudCacheBase.__init__``: data files but no ``_downloaded_data.json`` (MissingLocalManifestWarning)."""
        if (self.cache_dir / "_downloaded_data.json").exists():
            return False
        return any(f.is_file() and "json" not in f.name and "_manifest_last_used" not in f.name
                   and "DS_Store" not in f.name for f in self.cache_dir.glob("**/*"))

    def files(self, manifest: str) -> dict[tuple[str, str], Path]:
        """(directory, file name) -> local path of every file the manifest lists, as the client names them
        (``Manifest.list_metadata_files``/``list_data_files``) and places them (``get_file_attributes``)."""
        with open(self.cache_dir / manifest) as f:
            listing = json.load(f)["file_listing"]
        out = {}
        for directory, sub_directories in listing.items():
            for sub_dir, entries in sub_directories.items():
                for name, entry in entries.items():
                    names = [name] if sub_dir == "metadata" or "files" in entry else [f"{name}/{k}" for k in entry]
                    for file_name in names:
                        out[(directory, file_name)] = self.local_path(listing, directory, file_name)
        return out

    def local_path(self, listing: dict, directory: str, file_name: str) -> Path:
        """``Manifest.get_file_attributes``, then ``_create_file_attributes``: ``cache_dir.resolve() / relative_path``
        of the first file type listed."""
        name, _, kind = file_name.partition("/")
        found = None
        for sub_dir in listing[directory].values():
            if name in sub_dir:
                files_data = sub_dir[name]
                files = files_data["files"] if "files" in files_data else files_data[kind]["files"]
                found = files[list(files)[0]]["relative_path"]
        return self.cache_dir.resolve() / found

    def downloads(self, path: Path) -> bool:
        """``S3CloudCache`` (``from_cache_dir`` on a writable directory): ``download_data`` forces a download
        unless the file exists and ``_check_successful_download`` finds it listed; ``_download_file`` then
        fetches whatever does not exist."""
        exists = path.exists() and path.is_file()
        listed_file = self.cache_dir / "_downloaded_data.json"
        listed = False
        if listed_file.exists():
            with open(listed_file, "rb") as in_file:
                listed = str(path.resolve()) in set(json.load(in_file))
        return not (exists and listed)


def _listed(root: Path) -> set[str]:
    return set(json.loads((root / DOWNLOADED_DATA).read_text()))


def test_each_mirror_run_leaves_a_cache_the_client_reads_without_downloading(settings, engine, generated_bucket):
    root = settings.mirror_path
    client = AbcClientView(root)
    old_scope, new_scope = scoped_keys(generated_bucket, OLD_RELEASE), scoped_keys(generated_bucket, NEW_RELEASE)
    old_metadata = [k for k in old_scope if k.startswith("metadata/")]

    # Part of a release: its verified files are listed, but no release is complete to be named last used.
    pipeline.mirror(settings, OLD_RELEASE, kinds=["metadata"], progress=False)
    assert _listed(root) == {str(root / k) for k in old_metadata}
    assert not (root / MANIFEST_LAST_USED).exists()
    assert not client.warns_of_unrecorded_files()
    paths = client.files(client.loaded_manifest())
    assert client.loaded_manifest() == manifest_name(OLD_RELEASE)
    assert {str(p) for p in paths.values() if not client.downloads(p)} == {str(root / k) for k in old_metadata}

    # The whole release: named last used (exact text, no newline), every file in scope found, others not.
    pipeline.mirror(settings, OLD_RELEASE, progress=False)
    assert (root / MANIFEST_LAST_USED).read_text() == manifest_name(OLD_RELEASE)
    paths = client.files(client.loaded_manifest())
    found = {str(p) for p in paths.values() if not client.downloads(p)}
    assert found == {str(root / k) for k in old_scope}
    assert len(paths) > len(found)  # the manifest lists the whole atlas; the scope is mirrored

    pipeline.mirror(settings, NEW_RELEASE, progress=False)
    assert client.loaded_manifest() == manifest_name(NEW_RELEASE)
    assert client.manifests() == [manifest_name(OLD_RELEASE), manifest_name(NEW_RELEASE)]
    assert _listed(root) == {str(root / k) for k in {*old_scope, *new_scope}}
    assert {str(p) for p in client.files(manifest_name(NEW_RELEASE)).values() if not client.downloads(p)} \
        == {str(root / k) for k in new_scope}

    # Mirroring an older release again (a backfill) keeps the newest complete release as last used.
    pipeline.mirror(settings, OLD_RELEASE, progress=False)
    assert client.loaded_manifest() == manifest_name(NEW_RELEASE)

    # A file changed on disk since it was verified is no longer listed, and its release no longer complete.
    changed = root / sorted(set(new_scope) - set(old_scope))[0]
    changed.write_bytes(bytes(b ^ 0xFF for b in changed.read_bytes()))
    written = write_client_cache(settings, engine)
    assert str(changed) not in _listed(root) and client.downloads(changed)
    assert written.files == len({*old_scope, *new_scope}) - 1
    assert written.manifest_last_used == manifest_name(OLD_RELEASE) == client.loaded_manifest()
    # The next mirror run fetches it again and lists it again.
    pipeline.mirror(settings, NEW_RELEASE, progress=False)
    assert str(changed) in _listed(root) and not client.downloads(changed)
    assert client.loaded_manifest() == manifest_name(NEW_RELEASE)
    assert not [p.name for p in root.iterdir() if p.name.endswith(".partial")]
    assert write_client_cache(replace(settings, mirror_root="s3://other-bucket/abc"), engine) is None


def test_a_file_copied_in_by_hand_is_listed_only_once_the_mirror_verified_it(settings, engine, generated_bucket):
    root = settings.mirror_path
    key = next(k for k in scoped_keys(generated_bucket, OLD_RELEASE) if k.endswith("/cell_metadata.csv"))
    pipeline.mirror(settings, OLD_RELEASE, kinds=["metadata"], progress=False)
    assert str(root / key) in _listed(root)
    (root / key).unlink()
    copied = root / key
    copied.write_bytes((generated_bucket.bucket_dir / key).read_bytes())  # the same bytes, copied by other means
    os.utime(copied, ns=(1, 1))
    write_client_cache(settings, engine)
    assert str(copied) not in _listed(root)  # no record of these bytes: the client would download them
    pipeline.mirror(settings, OLD_RELEASE, kinds=["metadata"], progress=False)  # hashed once and adopted
    assert str(copied) in _listed(root) and not AbcClientView(root).downloads(copied)
    # A release listing the key with other bytes: whichever manifest the client loads trusts the listed file
    # without hashing it, so it is not listed.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE abc.release_file SET md5 = :m WHERE relative_path = :k"),
                     {"m": "0" * 32, "k": key})
    write_client_cache(settings, engine)
    assert str(copied) not in _listed(root)


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path, follow_symlinks=False)
    return st.st_ino, st.st_mtime_ns


def test_bookkeeping_is_rewritten_only_when_it_changes(settings, engine, generated_bucket):
    root = settings.mirror_path
    keys = scoped_keys(generated_bucket, OLD_RELEASE)
    pipeline.mirror(settings, OLD_RELEASE, progress=False)
    before = {name: _identity(root / name) for name in (DOWNLOADED_DATA, MANIFEST_LAST_USED)}

    written = write_client_cache(settings, engine)  # nothing changed: both files left as they are
    assert {name: _identity(root / name) for name in before} == before
    assert written.files == len(keys) and written.manifest_last_used == manifest_name(OLD_RELEASE)

    removed = root / next(k for k in keys if k.endswith("/donor.csv"))
    removed.unlink()  # by hand: dropped from the list, the release no longer complete
    written = write_client_cache(settings, engine)
    assert _listed(root) == {str(root / k) for k in keys} - {str(removed)}
    assert _identity(root / DOWNLOADED_DATA) != before[DOWNLOADED_DATA]
    assert written.files == len(keys) - 1 and not (root / MANIFEST_LAST_USED).exists()


def test_files_under_a_directory_replaced_by_a_symlink_are_not_listed(settings, engine, generated_bucket):
    root = settings.mirror_path
    metadata = [k for k in scoped_keys(generated_bucket, OLD_RELEASE) if k.startswith("metadata/")]
    pipeline.mirror(settings, OLD_RELEASE, kinds=["metadata"], progress=False)
    assert _listed(root) == {str(root / k) for k in metadata}

    # The same files, sizes and mtimes, now reached through a symlink: the client would read through it.
    linked = root / "metadata" / "Consensus-WMB-AIBS-10X"
    linked.rename(root / "elsewhere")
    linked.symlink_to(root / "elsewhere", target_is_directory=True)
    under = {k for k in metadata if k.startswith("metadata/Consensus-WMB-AIBS-10X/")}
    assert len(under) > 1 and any(k.count("/") > 3 for k in under)  # files in the directory and deeper
    assert write_client_cache(settings, engine).files == len(metadata) - len(under)
    assert _listed(root) == {str(root / k) for k in metadata if k not in under}
