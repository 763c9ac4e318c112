"""The read side of the mirror: which files of a release are mirrored and verified, where they are on
disk, and which cells of a release are in which cluster.

Loading, aggregation, the diff and the abc_atlas_access cache read the mirror and the warehouse only
through these functions, so none of them needs the transfer engine (:mod:`etl.mirror`), which writes
what they read.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Engine

from etl.config import Settings
from etl.manifest import UnsafeKeyError, check_relative_key
from etl.publish import staged_or_published
from etl.scope import FileRow

if TYPE_CHECKING:
    import pandas as pd

MAX_LISTED = 10


class NotMirroredError(RuntimeError):
    """Files of a release are not (or no longer) mirrored and verified; the message names them."""


def name_some(keys: list[str]) -> str:
    """The first :data:`MAX_LISTED` keys, and how many more: for messages about many files."""
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")


class LocalRoot:
    """A local mirror directory that no key can escape: checked keys, and no symlink on the way."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._safe_dirs: set[Path] = {self.root}
        self._dirs: dict[str, Path] = {"": self.root}  # the key prefixes whose directory was checked
        self._prefix = os.path.join(self.root, "")  # what a key is appended to, for its path as a string

    @property
    def target(self) -> str:
        return str(self.root)

    def path(self, key: str) -> Path:
        """The final path of ``key``; refuses unsafe keys and existing symlinks under the root."""
        return self.lstat(key)[0]

    def lstat(self, key: str) -> tuple[Path, os.stat_result | None]:
        """:meth:`path`, and what is there (``os.lstat``; None if nothing), in one system call. For the 10,000 keys
        of a no-op re-sync: 84-89 ms through the old ``path`` (a ``Path`` built from every segment, a symlink check)
        and a stat, 66-72 ms so, 28-30 ms for the bare stats (benchmarks/RESULTS.md, "Issue 16 again")."""
        check_relative_key(key)
        parent, _, name = key.rpartition("/")
        path = self._directory(parent) / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path, None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeKeyError(f"{path} is a symlink; refusing to write through it")
        return path, st

    def read_path(self, key: str) -> str:
        """The path of ``key`` as a string, checked as :meth:`lstat` checks it but for the file itself, which the
        caller reads without following a symlink (``os.stat(..., follow_symlinks=False)``): no ``Path`` built per
        key, for reading many files (10,000 keys and their stats: 42-64 ms, 66-72 ms through :meth:`lstat`)."""
        check_relative_key(key)
        self._directory(key.rpartition("/")[0])
        return self._prefix + key

    def _directory(self, prefix: str) -> Path:
        """The directory of the keys under ``prefix``, checked for symlinks the first time it is asked for."""
        directory = self._dirs.get(prefix)
        if directory is None:
            directory = self.root.joinpath(*prefix.split("/"))
            self._check_no_symlink(directory)
            self._dirs[prefix] = directory
        return directory

    def _check_no_symlink(self, directory: Path) -> None:
        """Each directory is checked once: a real directory, or none yet (the mirror makes it, not a link)."""
        if directory in self._safe_dirs:
            return
        self._check_no_symlink(directory.parent)
        try:
            mode = directory.lstat().st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and stat.S_ISLNK(mode):
            raise UnsafeKeyError(f"{directory} is a symlink inside the mirror root; refusing to write through it")
        if mode is not None and not stat.S_ISDIR(mode):
            raise UnsafeKeyError(f"{directory} exists and is not a directory")
        self._safe_dirs.add(directory)


def selected_release_files(conn: sa.Connection, release: str, datasets: list[str] | None = None,
                           kinds: list[str] | None = None, normalizations: list[str] | None = None,
                           keep: Callable[[FileRow], bool] | None = None) -> list[sa.Row]:
    """Rows of ``abc.release_file`` filtered as :meth:`Manifest.select` filters files, then by ``keep``
    (a scope's :meth:`~etl.scope.Scope.mirrors` or :meth:`~etl.scope.Scope.feeds_warehouse`)."""
    query = "SELECT relative_path, size, md5, dataset, kind, tag FROM abc.release_file WHERE release = :r"
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
    rows = conn.execute(sa.text(query + " ORDER BY relative_path"), params).all()
    return [row for row in rows if keep is None or keep(row)]


def release_files_on_disk(settings: Settings, engine: Engine, release: str, datasets: list[str] | None = None,
                          kinds: list[str] | None = None, normalizations: list[str] | None = None,
                          keep: Callable[[FileRow], bool] | None = None) -> dict[str, Path]:
    """relative_path -> local path of every selected file of ``release``, each verified in the mirror.

    Files are selected as :func:`selected_release_files` does, ``keep`` defaulting to what the
    configured scope mirrors. A file counts only if the mirror records it with the manifest's size
    and MD5 and its size on disk still matches; otherwise :class:`NotMirroredError` names the
    release and the files.
    """
    if not settings.mirror_is_local:
        raise NotMirroredError(f"release {release}: the mirror {settings.mirror_root} is not a local directory")
    root = LocalRoot(settings.mirror_path)
    with engine.connect() as conn:
        if conn.execute(sa.text("SELECT 1 FROM abc.release WHERE version = :r"), {"r": release}).scalar() is None:
            raise NotMirroredError(f"release {release} is not recorded: run discovery and mirror it first")
        wanted = selected_release_files(conn, release, datasets, kinds, normalizations,
                                        keep or settings.run_scope.mirrors)
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
                               f"mirrored and verified in {root.target}: {name_some(missing)}")
    return found


def cell_assignments(conn: psycopg.Connection, release: str, dataset: str,
                     feature_matrix_label: str | None = None) -> pd.DataFrame:
    """Cells of one dataset of a release (of one matrix file, with ``feature_matrix_label``) with their
    cluster, region and matrix, staged or published.

    The staged tables are read while the release's stage is live (a load not yet published, or,
    in the run staging it, a reload of a published release), else the partitions. A
    cell's cluster is its own ``cluster_alias`` or the taxonomy's cell_to_cluster_membership row,
    its region its own or its library's, as the consensus release keeps them there.
    """
    import pandas as pd  # here, not at the top: `abc-mirror status` reads this module and starts in < 1 s

    def source(table: str) -> sql.Identifier:
        return staged_or_published(conn, table, release)

    query = sql.SQL(
        "COPY (SELECT c.cell_label, coalesce(c.cluster_alias, m.cluster_alias) AS cluster_alias, "
        "coalesce(c.region_of_interest_acronym, l.region_of_interest_acronym) AS region_of_interest_acronym, "
        "c.feature_matrix_label FROM {} c "
        "LEFT JOIN {} m ON m.release = c.release AND m.cell_label = c.cell_label "
        "LEFT JOIN {} l ON l.release = c.release AND l.dataset = c.dataset AND l.library_label = c.library_label "
        "WHERE c.release = {} AND c.dataset = {}{} ORDER BY c.cell_label) TO STDOUT (FORMAT csv, HEADER true)").format(
        source("cell"), source("cell_cluster_membership"), source("library"), sql.Literal(release),
        sql.Literal(dataset), sql.SQL(" AND c.feature_matrix_label = {}").format(sql.Literal(feature_matrix_label))
        if feature_matrix_label is not None else sql.SQL(""))
    buffer = io.BytesIO()
    with conn.cursor().copy(query) as copy:
        for data in copy:
            buffer.write(data)
    buffer.seek(0)
    return pd.read_csv(buffer, dtype={"cell_label": str, "cluster_alias": "Int64",
                                      "region_of_interest_acronym": str, "feature_matrix_label": str},
                       keep_default_na=False, na_values=[""])
