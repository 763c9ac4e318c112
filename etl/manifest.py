"""Release manifests: parse, validate and flatten ``releases/<date>/manifest.json``.

The schema is the one ``manifest_builder.py`` of abc_atlas_access writes. Everything later
(mirror, load, diff, lineage) works from the flat list of :class:`ManifestFile` rows this
module produces, so every check on keys happens here, once.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass

DATE_RE = re.compile(r"^\d{8}$")
MD5_RE = re.compile(r"^[0-9a-f]{32}$")


class ManifestError(ValueError):
    """A manifest that cannot be trusted; the message names the manifest and the problem."""


class UnsafeKeyError(ManifestError):
    """A key that would escape the mirror root (``..``, absolute path, empty segment)."""


def check_relative_key(key: str) -> str:
    """Refuse keys that could land outside a mirror root; return the key unchanged."""
    if not isinstance(key, str) or not key:
        raise UnsafeKeyError(f"empty or non-string key {key!r}")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise UnsafeKeyError(f"key {key!r} is absolute or contains a forbidden character")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeKeyError(f"key {key!r} has an empty, '.' or '..' segment")
    if posixpath.normpath(key) != key:
        raise UnsafeKeyError(f"key {key!r} is not in normal form")
    return key


@dataclass(frozen=True)
class ManifestDirectory:
    dataset: str
    kind: str
    version: str
    relative_path: str
    total_size: int | None


@dataclass(frozen=True)
class ManifestFile:
    dataset: str
    kind: str
    tag: str
    normalization: str  # 'raw' / 'log2' for h5ad matrices, '' otherwise
    file_type: str  # csv, json, h5, geojson, h5ad, nii.gz, ...
    version: str
    relative_path: str
    size: int
    md5: str

    @property
    def name(self) -> str:
        return self.relative_path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Manifest:
    version: str
    resource_uri: str
    directories: tuple[ManifestDirectory, ...]
    files: tuple[ManifestFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def select(
        self,
        datasets: list[str] | None = None,
        kinds: list[str] | None = None,
        normalizations: list[str] | None = None,
    ) -> list[ManifestFile]:
        """Files of the manifest filtered as the CLI's --dataset/--kind/--normalization ask."""
        chosen = []
        for f in self.files:
            if datasets and f.dataset not in datasets:
                continue
            if kinds and f.kind not in kinds:
                continue
            if normalizations and f.normalization and f.normalization not in normalizations:
                continue
            chosen.append(f)
        return chosen


def _require(cond: bool, where: str, problem: str) -> None:
    if not cond:
        raise ManifestError(f"{where}: {problem}")


def _parse_file_entry(where: str, dataset: str, kind: str, tag: str, norm: str, files: object):
    _require(isinstance(files, dict) and files, where, "'files' must be a non-empty object")
    for file_type, entry in files.items():
        at = f"{where}.files.{file_type}"
        _require(isinstance(entry, dict), at, "must be an object")
        for name in ("version", "relative_path", "size", "file_hash"):
            _require(name in entry, at, f"missing '{name}'")
        size, md5 = entry["size"], entry["file_hash"]
        _require(isinstance(size, int) and size >= 0, at, f"size {size!r} is not a non-negative integer")
        _require(isinstance(md5, str) and MD5_RE.match(md5), at, f"file_hash {md5!r} is not an MD5 hex digest")
        try:
            key = check_relative_key(entry["relative_path"])
        except UnsafeKeyError as exc:
            raise UnsafeKeyError(f"{at}: {exc}") from None
        yield ManifestFile(dataset, kind, tag, norm, file_type, str(entry["version"]), key, size, md5)


def parse_manifest(raw: bytes | str, source: str) -> Manifest:
    """Parse and validate manifest JSON; ``source`` (its key or path) names it in errors."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{source}: not valid JSON ({exc})") from None
    _require(isinstance(doc, dict), source, "top level must be an object")
    for name in ("version", "resource_uri", "directory_listing", "file_listing"):
        _require(name in doc, source, f"missing '{name}'")
    version = doc["version"]
    _require(isinstance(version, str) and bool(DATE_RE.match(version)), source,
             f"version {version!r} is not YYYYMMDD")

    directories: list[ManifestDirectory] = []
    listing = doc["directory_listing"]
    _require(isinstance(listing, dict), source, "'directory_listing' must be an object")
    for dataset, body in listing.items():
        where = f"{source}: directory_listing.{dataset}"
        _require(isinstance(body, dict) and isinstance(body.get("directories"), dict), where,
                 "missing 'directories' object")
        for kind, d in body["directories"].items():
            at = f"{where}.{kind}"
            _require(isinstance(d, dict) and "version" in d and "relative_path" in d, at,
                     "needs 'version' and 'relative_path'")
            try:
                rel = check_relative_key(d["relative_path"])
            except UnsafeKeyError as exc:
                raise UnsafeKeyError(f"{at}: {exc}") from None
            directories.append(ManifestDirectory(dataset, kind, str(d["version"]), rel,
                                                 d.get("total_size")))

    files: list[ManifestFile] = []
    file_listing = doc["file_listing"]
    _require(isinstance(file_listing, dict), source, "'file_listing' must be an object")
    for dataset, kinds in file_listing.items():
        _require(isinstance(kinds, dict), f"{source}: file_listing.{dataset}", "must be an object")
        for kind, tags in kinds.items():
            _require(isinstance(tags, dict), f"{source}: file_listing.{dataset}.{kind}",
                     "must be an object")
            for tag, entry in tags.items():
                where = f"{source}: file_listing.{dataset}.{kind}.{tag}"
                _require(isinstance(entry, dict), where, "must be an object")
                if "files" in entry:
                    files.extend(_parse_file_entry(where, dataset, kind, tag, "", entry["files"]))
                else:
                    _require(bool(entry), where, "has neither 'files' nor normalizations")
                    for norm, sub in entry.items():
                        _require(isinstance(sub, dict) and "files" in sub, f"{where}.{norm}",
                                 "missing 'files'")
                        files.extend(_parse_file_entry(f"{where}.{norm}", dataset, kind, tag, norm,
                                                       sub["files"]))
    seen: set[str] = set()
    for f in files:
        _require(f.relative_path not in seen, source, f"{f.relative_path} is listed twice")
        seen.add(f.relative_path)
    return Manifest(version, str(doc["resource_uri"]), tuple(directories),
                    tuple(sorted(files, key=lambda f: f.relative_path)))
