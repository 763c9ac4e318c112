"""Mirror a release: every file its manifest lists, verified by size and MD5, into a local directory or S3.

The manifest decides what belongs to a release. A file reaches its final path only by rename
after its bytes matched the manifest; what was placed is recorded in ``abc.mirror_object`` so
later runs trust it (size and mtime unchanged) instead of re-hashing terabytes. Loading and
aggregation read mirrored files only through :func:`release_files_on_disk`.
"""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.config import Settings
from etl.manifest import UnsafeKeyError, check_relative_key

MAX_LISTED = 10


class NotMirroredError(RuntimeError):
    """Files of a release are not (or no longer) mirrored and verified; the message names them."""


def _name_some(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")


class LocalRoot:
    """A local mirror directory that no key can escape: checked keys, and no symlink on the way."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._safe_dirs: set[Path] = {self.root}

    @property
    def target(self) -> str:
        return str(self.root)

    def path(self, key: str) -> Path:
        """The final path of ``key``; refuses unsafe keys and existing symlinks under the root."""
        check_relative_key(key)
        path = self.root.joinpath(*key.split("/"))
        self._check_no_symlink(path.parent)
        if path.is_symlink():
            raise UnsafeKeyError(f"{path} is a symlink; refusing to write through it")
        return path

    def _check_no_symlink(self, directory: Path) -> None:
        if directory in self._safe_dirs:
            return
        self._check_no_symlink(directory.parent)
        if directory.is_symlink():
            raise UnsafeKeyError(f"{directory} is a symlink inside the mirror root; refusing to write through it")
        if directory.exists() and not directory.is_dir():
            raise UnsafeKeyError(f"{directory} exists and is not a directory")
        if directory.is_dir():
            self._safe_dirs.add(directory)


def _selected_release_files(conn: sa.Connection, release: str, datasets: list[str] | None,
                            kinds: list[str] | None, normalizations: list[str] | None) -> list[sa.Row]:
    """Rows of ``abc.release_file`` filtered exactly as :meth:`Manifest.select` filters files."""
    query = "SELECT relative_path, size, md5 FROM abc.release_file WHERE release = :r"
    params: dict[str, object] = {"r": release}
    if datasets:
        query += " AND dataset = ANY(:datasets)"
        params["datasets"] = list(datasets)
    if kinds:
        query += " AND kind = ANY(:kinds)"
        params["kinds"] = list(kinds)
    if normalizations:
        query += " AND (normalization = '' OR normalization = ANY(:norms))"
        params["norms"] = list(normalizations)
    return conn.execute(sa.text(query + " ORDER BY relative_path"), params).all()


def release_files_on_disk(settings: Settings, engine: Engine, release: str, datasets: list[str] | None = None,
                          kinds: list[str] | None = None,
                          normalizations: list[str] | None = None) -> dict[str, Path]:
    """relative_path -> local path of every selected file of ``release``, each verified in the mirror.

    A file counts only if the mirror records it with the manifest's size and MD5 and its size on
    disk still matches; otherwise :class:`NotMirroredError` names the release and the files.
    """
    if not settings.mirror_is_local:
        raise NotMirroredError(f"release {release}: the mirror {settings.mirror_root} is not a local directory")
    root = LocalRoot(settings.mirror_path)
    with engine.connect() as conn:
        if conn.execute(sa.text("SELECT 1 FROM abc.release WHERE version = :r"), {"r": release}).scalar() is None:
            raise NotMirroredError(f"release {release} is not recorded: run discovery and mirror it first")
        wanted = _selected_release_files(conn, release, datasets, kinds, normalizations)
        recorded = {row.relative_path: row for row in conn.execute(
            sa.text("SELECT o.relative_path, o.size, o.md5 FROM abc.mirror_object o "
                    "JOIN abc.release_file rf ON rf.relative_path = o.relative_path "
                    "WHERE rf.release = :r AND o.target = :t"),
            {"r": release, "t": root.target})}
    found: dict[str, Path] = {}
    missing: list[str] = []
    for row in wanted:
        record = recorded.get(row.relative_path)
        try:
            path = root.path(row.relative_path)
            on_disk = os.stat(path).st_size if path.is_file() else None
        except (UnsafeKeyError, OSError):
            on_disk = None
        if record is None or record.md5 != row.md5 or record.size != row.size or on_disk != row.size:
            missing.append(row.relative_path)
        else:
            found[row.relative_path] = path
    if missing:
        raise NotMirroredError(f"release {release}: {len(missing)} of {len(wanted)} selected files are not "
                               f"mirrored and verified in {root.target}: {_name_some(missing)}")
    return found
