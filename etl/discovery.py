"""Watch the bucket: record new release manifests and new dated dataset directories.

Idempotent by construction: rows are keyed by release version / directory, inserted with
``ON CONFLICT DO NOTHING``, and a release's manifest, directories and files go in one
transaction, so a crash mid-way leaves either the whole release recorded or none of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import sqlalchemy as sa
from botocore.client import BaseClient
from sqlalchemy.engine import Engine

from etl.config import Settings
from etl.lineage import record_discovery
from etl.manifest import Manifest, ManifestError, parse_manifest
from etl.scope import history_floor
from etl.source import (
    DatedDirectory,
    FetchedObject,
    fetch_small_object,
    list_dated_directories,
    list_release_versions,
    manifest_key,
)

log = logging.getLogger(__name__)


@dataclass
class DiscoveryReport:
    releases_seen: list[str] = field(default_factory=list)
    new_releases: list[str] = field(default_factory=list)
    changed_manifests: list[str] = field(default_factory=list)
    new_directories: list[DatedDirectory] = field(default_factory=list)
    bad_manifests: dict[str, str] = field(default_factory=dict)
    floor: str | None = None
    skipped: list[str] = field(default_factory=list)  # recorded now as before the history floor

    @property
    def releases_to_process(self) -> list[str]:
        """New releases at or after the floor: the ones a scheduled deployment runs."""
        return [v for v in self.new_releases if v not in self.skipped]

    def lines(self) -> list[str]:
        out = [f"releases upstream: {', '.join(self.releases_seen) or 'none'}",
               f"history floor: {self.floor or 'none (no release holds the scope yet)'}"]
        out += [f"new release: {v}" + (" (before the floor: recorded, skipped)" if v in self.skipped else "")
                for v in self.new_releases]
        out += [f"manifest changed upstream: {v}" for v in self.changed_manifests]
        out += [f"new directory: {d.prefix}" for d in self.new_directories]
        out += [f"skipped malformed manifest {key}: {why}" for key, why in self.bad_manifests.items()]
        if not (self.new_releases or self.changed_manifests or self.new_directories):
            out.append("nothing new")
        return out


def parse_release_manifest(fetched: FetchedObject, version: str) -> Manifest:
    manifest = parse_manifest(fetched.body, fetched.key)
    if manifest.version != version:
        raise ManifestError(f"{fetched.key}: says version {manifest.version}, lives under {version}")
    return manifest


def load_manifest(client: BaseClient, settings: Settings, version: str) -> tuple[FetchedObject, Manifest]:
    """Fetch and validate one release's manifest (used by discovery and by the mirror)."""
    fetched = fetch_small_object(client, settings, manifest_key(version))
    return fetched, parse_release_manifest(fetched, version)


def _record_release(conn: sa.Connection, fetched: FetchedObject, manifest: Manifest) -> None:
    conn.execute(sa.text("DELETE FROM abc.release_directory WHERE release = :v"), {"v": manifest.version})
    conn.execute(sa.text("DELETE FROM abc.release_file WHERE release = :v"), {"v": manifest.version})
    conn.execute(
        sa.text("""
            INSERT INTO abc.release (version, manifest_key, manifest_md5, manifest_size,
                                     manifest_etag, resource_uri, n_files, total_bytes)
            VALUES (:version, :key, :md5, :size, :etag, :uri, :n, :bytes)
            ON CONFLICT (version) DO UPDATE SET
                manifest_md5 = EXCLUDED.manifest_md5, manifest_size = EXCLUDED.manifest_size,
                manifest_etag = EXCLUDED.manifest_etag, resource_uri = EXCLUDED.resource_uri,
                n_files = EXCLUDED.n_files, total_bytes = EXCLUDED.total_bytes,
                status = 'upstream', last_error = NULL"""),
        {"version": manifest.version, "key": fetched.key, "md5": fetched.md5,
         "size": len(fetched.body), "etag": fetched.etag, "uri": manifest.resource_uri,
         "n": len(manifest.files), "bytes": manifest.total_bytes},
    )
    if manifest.directories:
        conn.execute(
            sa.text("INSERT INTO abc.release_directory VALUES (:r, :dataset, :kind, :version, :path, :size)"),
            [{"r": manifest.version, "dataset": d.dataset, "kind": d.kind, "version": d.version,
              "path": d.relative_path, "size": d.total_size} for d in manifest.directories],
        )
    if manifest.files:
        conn.execute(
            sa.text("INSERT INTO abc.release_file VALUES (:r, :path, :dataset, :kind, :tag, :norm, "
                    ":ftype, :version, :size, :md5)"),
            [{"r": manifest.version, "path": f.relative_path, "dataset": f.dataset, "kind": f.kind,
              "tag": f.tag, "norm": f.normalization, "ftype": f.file_type, "version": f.version,
              "size": f.size, "md5": f.md5} for f in manifest.files],
        )


def ensure_release_recorded(engine: Engine, fetched: FetchedObject, manifest: Manifest) -> bool:
    """Record a release unless this very manifest (same MD5) already is; True if rows were written."""
    with engine.begin() as conn:
        known = conn.execute(sa.text("SELECT manifest_md5 FROM abc.release WHERE version = :v"),
                             {"v": manifest.version}).scalar()
        if known == fetched.md5:
            return False
        _record_release(conn, fetched, manifest)
    return True


def _record_problem(engine: Engine, fetched: FetchedObject, problem: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("""INSERT INTO abc.manifest_problem (manifest_key, manifest_md5, problem)
                       VALUES (:k, :m, :p)
                       ON CONFLICT (manifest_key, manifest_md5) DO UPDATE
                       SET last_seen_at = now(), problem = EXCLUDED.problem"""),
            {"k": fetched.key, "m": fetched.md5, "p": problem},
        )


def apply_history_floor(engine: Engine, settings: Settings) -> tuple[str | None, list[str]]:
    """Mark recorded releases before the history floor ``skipped``; return the floor and those marked.

    Only releases still at ``upstream`` are marked: one an operator backfilled keeps its state.
    Without a floor (no release holds the scope yet) every such release is skipped.
    """
    with engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT r.version, array_remove(array_agg(DISTINCT d.dataset), NULL) "
                                    "FROM abc.release r LEFT JOIN abc.release_directory d ON d.release = r.version "
                                    "GROUP BY r.version")).all()
        floor = history_floor({v: set(datasets) for v, datasets in rows}, settings.run_scope, settings.first_release)
        skipped = conn.execute(sa.text("UPDATE abc.release SET status = 'skipped' WHERE status = 'upstream' "
                                       "AND (CAST(:floor AS text) IS NULL OR version < :floor) RETURNING version"),
                               {"floor": floor}).scalars().all()
    return floor, sorted(skipped)


def discover(client: BaseClient, settings: Settings, engine: Engine) -> DiscoveryReport:
    """List the bucket, record what is new, and say what that was (releases before the floor as skipped)."""
    report = DiscoveryReport()
    report.releases_seen = list_release_versions(client, settings)
    with engine.connect() as conn:
        known = dict(conn.execute(sa.text("SELECT version, manifest_etag FROM abc.release")).all())

    for version in report.releases_seen:
        key = manifest_key(version)
        if version in known:
            head = client.head_object(Bucket=settings.bucket, Key=key)
            if head.get("ETag", "").strip('"') == (known[version] or ""):
                continue
        fetched = fetch_small_object(client, settings, key)
        try:
            manifest = parse_release_manifest(fetched, version)
        except ManifestError as exc:
            log.warning("skipping manifest: %s", exc)
            report.bad_manifests[key] = str(exc)
            _record_problem(engine, fetched, str(exc))
            continue
        with engine.begin() as conn:
            _record_release(conn, fetched, manifest)
        record_discovery(engine, client, settings, fetched.key, manifest)
        (report.changed_manifests if version in known else report.new_releases).append(version)
        log.info("recorded release %s (%d files, %d bytes)", version, len(manifest.files),
                 manifest.total_bytes)

    directories = list_dated_directories(client, settings)
    with engine.begin() as conn:
        for d in directories:
            inserted = conn.execute(
                sa.text("INSERT INTO abc.upstream_directory (kind, dataset, version) "
                        "VALUES (:k, :d, :v) ON CONFLICT DO NOTHING"),
                {"k": d.kind, "d": d.dataset, "v": d.version},
            ).rowcount
            if inserted:
                report.new_directories.append(d)
    report.floor, skipped = apply_history_floor(engine, settings)
    report.skipped = [v for v in skipped if v in report.new_releases or v in report.changed_manifests]
    return report
