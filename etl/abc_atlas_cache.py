"""A local mirror opened as an ``abc_atlas_access`` cache: the client's bookkeeping, written beside the mirror.

The Allen Institute's client (``AllenInstitute/abc_atlas_access``, read at
``src/abc_atlas_access/abc_atlas_cache/``: ``abc_project_cache.py``, ``cloud_cache.py`` at commit
6d111958, ``manifest.py``; it is not on PyPI) treats a directory as a cache like this:

- ``manifest.py`` ``Manifest._create_file_attributes``: a file's local path is
  ``<cache_dir, resolved>/<relative_path>``, the manifest's ``relative_path`` being the bucket key,
  which is the mirror's own layout. ``cloud_cache.py`` ``BasicLocalCache.list_all_downloaded_manifests``:
  the manifests it knows locally are ``releases/*/manifest.json``, which the mirror writes.
- ``CloudCacheBase.__init__``: its bookkeeping is ``_downloaded_data.json`` and
  ``_manifest_last_used.txt`` in the cache directory; a directory holding data files but no
  ``_downloaded_data.json`` gets a ``MissingLocalManifestWarning``.
- ``CloudCacheBase._check_successful_download`` (called by ``download_data`` and
  ``download_metadata``): a file on disk is used only if ``str(local_path.resolve())`` is in the JSON
  list ``_downloaded_data.json``; otherwise it is downloaded again (its issue #87). A listed file is
  not hashed or sized again.
- ``CloudCacheBase.load_last_manifest``: loads the manifest named by the whole text of
  ``_manifest_last_used.txt`` (read without stripping) if it is one the cache knows, else the latest.
- ``abc_project_cache.py`` ``AbcProjectCache.from_local_cache`` opens a ``LocalCache``: no download
  ever, a file is there when it exists (``BasicLocalCache._file_exists``), the JSON list is not read.
  ``from_cache_dir`` opens a ``LocalCache`` when the directory is not writable by the user, else an
  ``S3CloudCache`` (the bucket's manifest list online, files not listed downloaded).

So after each mirror run that verified its files, :func:`write_client_cache` replaces each of the
two files whose content changes (temporary file, synced, then rename; one already holding its
content is left alone, so a run that changed nothing writes nothing): ``_downloaded_data.json``
lists every file of the mirror that ``abc.mirror_object`` records as verified against the manifests'
MD5, that every recorded release listing its key lists with that MD5 and size, and whose size and
mtime on disk are still those recorded (the mirror's own trust rule: one ``lstat`` per file, no
directory on its way a symlink); ``_manifest_last_used.txt`` names the manifest of the newest
release whose every file the scope mirrors is so listed (removed when there is none: the client then
loads the newest manifest present). The paths are absolute as this host resolves the mirror root: a
writable mirror mounted elsewhere is re-downloaded by ``S3CloudCache``; read-only mounts
(``LocalCache``) do not read them. Runs writing the same mirror take turns (an advisory lock on the
target), so the last writer has seen every run's records.

An S3 mirror target gets nothing: the client opens a cache only as a local directory, and its
bookkeeping holds local absolute paths, which only a host mounting the bucket would know.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.catalog import LocalRoot
from etl.config import Settings
from etl.manifest import UnsafeKeyError
from etl.transfer import PARTIAL_SUFFIX, SymlinkRefusedError, open_nofollow, write_file_nofollow

DOWNLOADED_DATA = "_downloaded_data.json"
MANIFEST_LAST_USED = "_manifest_last_used.txt"

_VERIFIED = sa.text("""
    SELECT o.relative_path, o.size, o.mtime_ns FROM abc.mirror_object o
    WHERE o.target = :t
      AND EXISTS (SELECT 1 FROM abc.release_file rf WHERE rf.relative_path = o.relative_path)
      AND NOT EXISTS (SELECT 1 FROM abc.release_file rf WHERE rf.relative_path = o.relative_path
                      AND (rf.md5 <> o.md5 OR rf.size <> o.size))""")


@dataclass(frozen=True)
class ClientCache:
    """What :func:`write_client_cache` wrote: the files listed as downloaded and the manifest named as last used."""

    root: Path
    files: int
    manifest_last_used: str | None

    def line(self) -> str:
        return (f"abc_atlas_access cache {self.root}: {self.files} files listed in {DOWNLOADED_DATA}, "
                + (f"{MANIFEST_LAST_USED} {self.manifest_last_used}" if self.manifest_last_used
                   else f"no complete release for {MANIFEST_LAST_USED}"))


def manifest_name(release: str) -> str:
    """A release's manifest as the client names it (its bucket key)."""
    return f"releases/{release}/manifest.json"


def write_client_cache(settings: Settings, engine: Engine) -> ClientCache | None:
    """Replace the client's bookkeeping beside the local mirror ``settings.mirror_root``; None for an S3 one."""
    if not settings.mirror_is_local:
        return None
    root = LocalRoot(settings.mirror_path)
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('abc-mirror client cache ' || :t))"),
                     {"t": root.target})
        listed = {row.relative_path: path for row in conn.execute(_VERIFIED, {"t": root.target})
                  if (path := _still_verified(root, row)) is not None}
        release = _newest_complete_release(conn, root, set(listed), settings)
        _replace(root.root / DOWNLOADED_DATA, json.dumps(sorted(listed.values()), indent=2))
        if release is None:
            (root.root / MANIFEST_LAST_USED).unlink(missing_ok=True)
        else:
            _replace(root.root / MANIFEST_LAST_USED, manifest_name(release))
    return ClientCache(root.root, len(listed), manifest_name(release) if release else None)


def _still_verified(root: LocalRoot, row: sa.Row) -> str | None:
    """The file's path when it is a regular file of the recorded size and mtime, under no symlink."""
    try:
        path = root.read_path(row.relative_path)
        st = os.stat(path, follow_symlinks=False)
    except (UnsafeKeyError, OSError):
        return None
    if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (row.size, row.mtime_ns):
        return path
    return None


def _newest_complete_release(conn: sa.Connection, root: LocalRoot, listed: set[str], settings: Settings) -> str | None:
    """The newest release with a manifest in the mirror whose files in scope (at least one) are all listed."""
    present = sorted((p.parent.name for p in (root.root / "releases").glob("*/manifest.json")), reverse=True)
    scope = settings.run_scope
    files: dict[str, list[sa.Row]] = {}
    for row in conn.execute(sa.text("SELECT release, relative_path, dataset, kind, tag FROM abc.release_file "
                                    "WHERE release = ANY(:r)"), {"r": present}):
        if scope.mirrors(row):
            files.setdefault(row.release, []).append(row)
    return next((release for release in present
                 if files.get(release) and all(row.relative_path in listed for row in files[release])), None)


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole: a temporary file beside it (never through a symlink), synced, then renamed;
    nothing when it is a regular file holding ``text`` already."""
    data = text.encode("utf-8")
    if _content(path) == data:
        return
    partial = path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    write_file_nofollow(partial, data, durable=True)
    os.replace(partial, path)


def _content(path: Path) -> bytes | None:
    """The bytes of the regular file ``path`` (never through a symlink, never waiting on a FIFO); None when
    there is none."""
    try:
        fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    except (SymlinkRefusedError, OSError):
        return None
    with os.fdopen(fd, "rb") as file:
        return file.read() if stat.S_ISREG(os.fstat(fd).st_mode) else None
