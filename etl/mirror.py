"""Mirror a release: every file its manifest lists, verified by size and MD5, into a local directory or S3.

The manifest decides what belongs to a release. A file reaches its final path only by rename
after its bytes matched the manifest (see :mod:`etl.transfer`); small files go in batches that
share one sync before their renames, fetched by one thread over many connections when the GETs are
plain HTTP (:mod:`etl.transfer.small_files`); what was placed is recorded in
``abc.mirror_object`` so later runs trust it while its size and mtime hold, instead of
re-hashing terabytes, and a key shared by several releases is fetched once. Files found on disk
without a record (copied by other means) are hashed once and adopted when they match. Loading
and aggregation read mirrored files only through :func:`etl.catalog.release_files_on_disk`.

Why one module of ~590 lines: the two targets (local directory, S3 bucket), the per-file retry and the
records are the steps of one run and share its private types (``_Work``, ``_Outcome``); nothing else
uses them, and the bytes themselves are moved by :mod:`etl.transfer`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TypeVar

import boto3
import sqlalchemy as sa
from botocore import UNSIGNED
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError
from sqlalchemy.engine import Engine

from etl import source
from etl.catalog import MAX_LISTED, LocalRoot, selected_release_files
from etl.config import Settings, target_name
from etl.discovery import ensure_release_recorded, load_manifest
from etl.manifest import Manifest, ManifestFile, UnsafeKeyError, check_relative_key
from etl.scope import Scope
from etl.source import FetchedObject
from etl.transfer import (
    PARTIAL_SUFFIX,
    SIDECAR_SUFFIX,
    FileJob,
    Transfer,
    TransferError,
    backoff_delay,
    copy_verified,
    file_md5,
    write_file_nofollow,
)

log = logging.getLogger(__name__)
_Item = TypeVar("_Item")

class InsufficientSpaceError(RuntimeError):
    """The pre-flight check found less free space than the files still to fetch need."""


FILE_ATTEMPTS = 3  # whole-file attempts after a checksum mismatch or a changed object
SMALL_FILE = 1 << 20  # files up to this size are fetched in batches that share one sync
SMALL_BATCH = 32  # files per batch at most, a batch to a thread (each holds its .partial open until the renames)
LOOP_BATCH = 1000  # files per batch when one thread drives every connection (their outcomes reported together)
RECORD_BATCH = 2000  # records per upsert, from the main thread while the transfers go on
RECORD_EVERY_S = 2.0
LOG_EVERY_S = 10.0


@dataclass
class MirrorReport:
    """Integrity report of one run: ok = fetched + copied + skipped; failed names each file and why."""

    release: str
    target: str
    dry_run: bool = False
    selected: int = 0
    fetched: int = 0
    copied: int = 0
    skipped: int = 0
    adopted: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    bytes_to_fetch: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return self.fetched + self.copied + self.skipped

    def lines(self) -> list[str]:
        if self.dry_run:
            return [f"release {self.release} -> {self.target} (dry run): {self.selected} files selected, "
                    f"{self.skipped} already mirrored, {self.fetched} to fetch ({self.bytes_to_fetch} bytes), "
                    f"{self.copied} to copy from identical local files, {self.adopted} present to verify, "
                    f"{len(self.failed)} refused"] + [f"refused {k}: {why}" for k, why in self.failed.items()]
        rate = self.bytes_fetched / self.seconds / 1e6 if self.seconds else 0.0
        out = [f"release {self.release} -> {self.target}: {self.selected} files, ok {self.ok} (fetched "
               f"{self.fetched}, copied {self.copied}, skipped {self.skipped} of which {self.adopted} adopted), "
               f"failed {len(self.failed)}; {self.bytes_fetched} bytes fetched in {self.seconds:.1f} s "
               f"({rate:.1f} MB/s)"]
        return out + [f"FAILED {key}: {why}" for key, why in sorted(self.failed.items())]


class Action(StrEnum):
    """What a selected file needs, decided before any transfer."""

    SKIP = "skip"  # recorded and trusted: nothing to do
    CHECK = "check"  # something is there: hash it, adopt it when it matches, fetch it otherwise
    COPY = "copy"  # another key with identical content is in the mirror: copy it locally
    FETCH = "fetch"


class Result(StrEnum):
    """What became of a file that needed work."""

    FETCHED = "fetched"
    COPIED = "copied"
    ADOPTED = "adopted"  # what was there matched the manifest
    FAILED = "failed"


@dataclass
class _Work:
    file: ManifestFile
    action: Action
    path: Path | None = None
    copy_from: Path | None = None


@dataclass
class _Outcome:
    key: str
    result: Result
    reason: str = ""
    record: dict | None = None


class Progress:
    """Bytes fetched: a bar (bytes, rate, ETA) on a terminal, a log line every ``LOG_EVERY_S`` otherwise."""

    def __init__(self, label: str, total: int, bar: bool | None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.lock = threading.Lock()
        self.started = self.logged = time.monotonic()
        self.bar = None
        if bar or (bar is None and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr)

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
                return
            now = time.monotonic()
            if now - self.logged < LOG_EVERY_S:
                return
            self.logged = now
        rate = self.done / max(now - self.started, 1e-6)
        eta = (self.total - self.done) / rate if rate else float("inf")
        log.info("%s: %.1f of %.1f MB (%.0f%%), %.1f MB/s, ETA %.0f s", self.label, self.done / 1e6,
                 self.total / 1e6, 100 * self.done / max(self.total, 1), rate / 1e6, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _disk_free(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _resumable_bytes(path: Path) -> int:
    """Bytes an existing ``.partial`` already holds (per its sidecar), so the pre-flight does not count them."""
    try:
        doc = json.loads(path.with_name(path.name + SIDECAR_SUFFIX).read_text())
        return min(len(doc["done"]) * int(doc["part_size"]), int(doc["size"]))
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class _LocalTarget:
    def __init__(self, root: Path) -> None:
        self.root = LocalRoot(root)
        self.name = self.root.target

    def plan(self, f: ManifestFile, record: sa.Row | None, by_content: dict, verify: bool) -> _Work:
        path, st = self.root.lstat(f.relative_path)
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == f.size:
            trusted = record is not None and (record.md5, record.size, record.mtime_ns) == (f.md5, f.size,
                                                                                            st.st_mtime_ns)
            return _Work(f, Action.SKIP if trusted and not verify else Action.CHECK, path)
        for twin in by_content.get((f.md5, f.size), []):
            try:
                twin_path = self.root.path(twin.relative_path)
                if twin.relative_path != f.relative_path and (twin_path.stat().st_size, twin_path.stat().st_mtime_ns) \
                        == (twin.size, twin.mtime_ns):
                    return _Work(f, Action.COPY, path, twin_path)
            except (OSError, UnsafeKeyError):
                continue
        return _Work(f, Action.FETCH, path)

    def preflight(self, work: list[_Work], free_space: Callable[[Path], int]) -> int:
        """Bytes ``work`` still needs on disk; raises :class:`InsufficientSpaceError` when they are not free."""
        # A small file's .partial is not looked for: counting it whole errs on the safe side, by little.
        needed = sum(w.file.size - (_resumable_bytes(w.path) if w.file.size > SMALL_FILE else 0)
                     for w in work if w.action in (Action.FETCH, Action.COPY))
        free = free_space(self.root.root)
        if needed > free:
            raise InsufficientSpaceError(
                f"{self.name}: {needed / 1e9:.2f} GB still to fetch but only {free / 1e9:.2f} GB free "
                f"({needed} bytes needed, {free} bytes free); "
                "free some space or mirror fewer datasets (--dataset, --kind)")
        return needed

    def write_manifest(self, key: str, body: bytes) -> None:
        path = self.root.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{PARTIAL_SUFFIX}")
        write_file_nofollow(tmp, body)
        os.replace(tmp, path)

    def _record(self, work: _Work, etag: str | None) -> dict:
        st = os.stat(work.path)
        return {"k": work.file.relative_path, "s": st.st_size, "m": work.file.md5, "e": etag,
                "n": st.st_mtime_ns, "p": str(work.path)}

    def process(self, work: _Work, transfer: Transfer) -> _Outcome:
        f, job = work.file, FileJob(work.file.relative_path, work.file.size, work.file.md5)
        if work.action == Action.CHECK:
            md5, st = file_md5(work.path)
            if md5 == f.md5 and st.st_size == f.size and os.stat(work.path).st_mtime_ns == st.st_mtime_ns:
                return _Outcome(f.relative_path, Result.ADOPTED, record=self._record(work, None))
            log.info("%s: on disk with MD5 %s, the manifest says %s: fetching again", f.relative_path, md5, f.md5)
        if work.action == Action.COPY:
            try:
                copy_verified(work.copy_from, job, work.path, transfer.durable)
                return _Outcome(f.relative_path, Result.COPIED, record=self._record(work, None))
            except (OSError, TransferError) as exc:
                log.info("%s: local copy from %s failed (%s): fetching", f.relative_path, work.copy_from, exc)
        return _with_file_retries(f, lambda: transfer.download(job, work.path),
                                  lambda etag: self._record(work, etag))

    def fetch_batch(self, batch: list[_Work], transfer: Transfer) -> list[_Outcome]:
        """Small files to fetch, as one batch (:meth:`Transfer.download_small`: one sync for them all); a
        file that failed there has its remaining whole-file attempts on its own."""
        jobs = [(FileJob(w.file.relative_path, w.file.size, w.file.md5), w.path) for w in batch]
        outcomes = []
        for work, job, result in zip(batch, jobs, transfer.download_small(jobs), strict=True):
            attempt = _first_then(result, lambda job=job: transfer.download(*job))
            try:
                outcomes.append(_with_file_retries(work.file, attempt, partial(self._record, work)))
            except Exception as exc:
                outcomes.append(_unexpected(work, exc))
        return outcomes


def _first_then(result: str | Exception, retry: Callable[[], str]) -> Callable[[], str]:
    """An attempt that returns (or raises) ``result`` the first time it is made, and calls ``retry`` after."""
    pending = [result]

    def attempt() -> str:
        if not pending:
            return retry()
        value = pending.pop()
        if isinstance(value, Exception):
            raise value
        return value

    return attempt


class _S3Target:
    def __init__(self, uri: str, endpoint_url: str | None, workers: int, verify: bool) -> None:
        self.verify = verify
        self.name = target_name(uri)
        self.bucket, _, prefix = self.name.removeprefix("s3://").partition("/")
        self.prefix = f"{prefix}/" if prefix else ""
        session = boto3.session.Session()
        config = Config(signature_version=UNSIGNED if session.get_credentials() is None else None,
                        retries={"max_attempts": 8, "mode": "adaptive"}, max_pool_connections=2 * workers + 4)
        self.client: BaseClient = session.client("s3", endpoint_url=endpoint_url, config=config)

    def key(self, relative_path: str) -> str:
        return self.prefix + check_relative_key(relative_path)

    def plan(self, f: ManifestFile, record: sa.Row | None, by_content: dict, verify: bool) -> _Work:
        self.key(f.relative_path)
        trusted = record is not None and (record.md5, record.size) == (f.md5, f.size)
        return _Work(f, Action.SKIP if trusted and not verify else Action.CHECK)

    def preflight(self, work: list[_Work], free_space: Callable[[Path], int]) -> int:
        """Object stores have no free-space figure to check."""
        return 0

    def write_manifest(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=body)

    def _record(self, f: ManifestFile, etag: str | None) -> dict:
        return {"k": f.relative_path, "s": f.size, "m": f.md5, "e": etag, "n": None,
                "p": f"s3://{self.bucket}/{self.key(f.relative_path)}"}

    def _holds(self, f: ManifestFile, verify: bool) -> bool:
        """An object already there: by the MD5 our uploads store in its metadata, or by hashing it (--verify)."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(f.relative_path))
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        if head.get("ContentLength") != f.size:
            return False
        if not verify:
            return f.md5 in (head.get("Metadata", {}).get("md5"), head.get("ETag", "").strip('"'))
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(f.relative_path))["Body"]
        digest = hashlib.md5()
        for chunk in body.iter_chunks(1 << 20):
            digest.update(chunk)
        return digest.hexdigest() == f.md5

    def process(self, work: _Work, transfer: Transfer) -> _Outcome:
        f = work.file
        if work.action == Action.CHECK and self._holds(f, self.verify):
            return _Outcome(f.relative_path, Result.ADOPTED, record=self._record(f, None))
        job = FileJob(f.relative_path, f.size, f.md5)
        return _with_file_retries(f, lambda: transfer.upload(job, self.client, self.bucket, self.key(f.relative_path)),
                                  lambda etag: self._record(f, etag))


def _with_file_retries(f: ManifestFile, attempt: Callable[[], str], record: Callable[[str], dict]) -> _Outcome:
    """Whole-file attempts: a checksum mismatch or a changed object is retried, then reported."""
    n = 1
    while True:
        try:
            etag = attempt()
            return _Outcome(f.relative_path, Result.FETCHED, record=record(etag))
        except TransferError as exc:
            if not exc.retry_file or n == FILE_ATTEMPTS:
                return _Outcome(f.relative_path, Result.FAILED, f"{exc} (attempt {n} of {FILE_ATTEMPTS})")
            log.warning("%s: %s; retrying the whole file", f.relative_path, exc)
            time.sleep(backoff_delay(n))
            n += 1
        except (OSError, ClientError) as exc:
            return _Outcome(f.relative_path, Result.FAILED, f"{type(exc).__name__}: {exc}")


_UPSERT = sa.text("""
    INSERT INTO abc.mirror_object (target, relative_path, size, md5, etag, mtime_ns, local_path, verified_at)
    SELECT :t, r.k, r.s, r.m, r.e, r.n, r.p, now()
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(k text, s bigint, m text, e text, n bigint, p text)
    ORDER BY r.k
    ON CONFLICT (target, relative_path) DO UPDATE SET
        size = EXCLUDED.size, md5 = EXCLUDED.md5, etag = COALESCE(EXCLUDED.etag, abc.mirror_object.etag),
        mtime_ns = EXCLUDED.mtime_ns, local_path = EXCLUDED.local_path, verified_at = now()""")


def _save_records(engine: Engine, target: str, records: list[dict]) -> None:
    """Upsert a batch of placed files' records, as one statement over a JSON array (a parameter set per row
    costs more than the transfer of a small file), in key order: two runs sharing keys (two releases
    mirrored at once) then lock their rows in the same order and cannot deadlock each other."""
    if records:
        rows = {r["k"]: r for r in records}.values()  # a key once per statement (ON CONFLICT needs it)
        with engine.begin() as conn:
            conn.execute(_UPSERT, {"t": target, "rows": json.dumps(list(rows))})
        records.clear()


def _known_objects(engine: Engine, target: str, files: list[ManifestFile]) -> tuple[dict, dict]:
    """Records of the selected keys, and of any key with the same content (for local copies)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT relative_path, size, md5, mtime_ns FROM abc.mirror_object "
            "WHERE target = :t AND (relative_path = ANY(:keys) OR md5 = ANY(:md5s))"),
            {"t": target, "keys": [f.relative_path for f in files], "md5s": list({f.md5 for f in files})}).all()
    by_key = {row.relative_path: row for row in rows}
    by_content: dict[tuple[str, int], list[sa.Row]] = {}
    for row in rows:
        by_content.setdefault((row.md5, row.size), []).append(row)
    return by_key, by_content


def _start_run(engine: Engine, release: str, target: str, selection: dict, verify: bool) -> tuple[int, str]:
    """A mirror_run row, and the release marked 'mirroring' unless a later stage already holds it."""
    with engine.begin() as conn:
        previous = conn.execute(sa.text("SELECT status FROM abc.release WHERE version = :r FOR UPDATE"),
                                {"r": release}).scalar_one()
        conn.execute(sa.text("UPDATE abc.release SET status = 'mirroring' WHERE version = :r "
                             "AND status IN ('upstream', 'skipped', 'mirrored', 'failed')"), {"r": release})
        run_id = conn.execute(sa.text(
            "INSERT INTO abc.mirror_run (release, target, selection, verify) VALUES (:r, :t, :s, :v) RETURNING id"),
            {"r": release, "t": target, "s": json.dumps(selection), "v": verify}).scalar_one()
    return run_id, previous


def _finish_run(engine: Engine, run_id: int, report: MirrorReport, previous: str, scope: Scope) -> None:
    """Close the run; the release is 'mirrored' once every file its scope mirrors is verified in the target."""
    with engine.begin() as conn:
        conn.execute(sa.text("""
            UPDATE abc.mirror_run SET finished_at = now(), status = :status, files_selected = :sel, files_ok = :ok,
                files_fetched = :fetched, files_skipped = :skipped, files_failed = :failed, bytes_fetched = :bytes,
                failures = :failures
            WHERE id = :id"""),
            {"id": run_id, "status": "failed" if report.failed else "succeeded", "sel": report.selected,
             "ok": report.ok, "fetched": report.fetched + report.copied, "skipped": report.skipped,
             "failed": len(report.failed), "bytes": report.bytes_fetched, "failures": json.dumps(report.failed)})
        missing = sum(scope.mirrors(row) for row in conn.execute(sa.text("""
            SELECT rf.dataset, rf.kind, rf.tag FROM abc.release_file rf
            LEFT JOIN abc.mirror_object o ON o.target = :t AND o.relative_path = rf.relative_path
                AND o.md5 = rf.md5 AND o.size = rf.size
            WHERE rf.release = :r AND o.relative_path IS NULL"""), {"r": report.release, "t": report.target}))
        if report.failed:
            first = sorted(report.failed)[:MAX_LISTED]
            error = f"mirror to {report.target}: {len(report.failed)} files failed: " + "; ".join(
                f"{k}: {report.failed[k]}" for k in first)
            conn.execute(sa.text("UPDATE abc.release SET last_error = :e, status = CASE WHEN status = 'mirroring' "
                                 "THEN 'failed' ELSE status END WHERE version = :r"), {"e": error, "r": report.release})
        elif missing == 0:
            conn.execute(sa.text("UPDATE abc.release SET status = CASE WHEN status = 'mirroring' THEN 'mirrored' "
                                 "ELSE status END, mirrored_at = now(), last_error = NULL WHERE version = :r"),
                         {"r": report.release})
        else:  # a partial selection that went well: the release is as mirrored as it was before
            conn.execute(sa.text("UPDATE abc.release SET status = :p WHERE version = :r AND status = 'mirroring'"),
                         {"p": previous if previous != "mirroring" else "upstream", "r": report.release})


def check_free_space(settings: Settings, engine: Engine, release: str, keys: list[str],
                     free_space: Callable[[Path], int] = _disk_free) -> int:
    """Check once that the whole planned file set of ``release`` fits: returns the bytes still to fetch.

    ``keys`` are every file the run will mirror (all its batches); what is still to fetch is judged as
    the mirror judges it (records, files on disk, local copies, what a ``.partial`` already holds).
    Raises :class:`InsufficientSpaceError` naming the target, the bytes needed and the bytes free.
    The release DAG calls this in ``plan``, before its mirror batches run side by side; each batch
    still checks its own files (``mirror_release``), which catches a disk that filled up since.
    An S3 target has no free-space figure: 0.
    """
    if not settings.mirror_is_local:
        return 0
    target = _LocalTarget(settings.mirror_path)
    wanted = set(keys)
    with engine.connect() as conn:
        files = [row for row in selected_release_files(conn, release) if row.relative_path in wanted]
    by_key, by_content = _known_objects(engine, target.name, files)
    work = []
    for f in files:
        try:
            work.append(target.plan(f, by_key.get(f.relative_path), by_content, verify=False))
        except UnsafeKeyError:
            continue  # refused by name when its batch runs
    try:
        return target.preflight([w for w in work if w.action != Action.SKIP], free_space)
    except InsufficientSpaceError as exc:
        raise InsufficientSpaceError(f"release {release} ({len(files)} files) does not fit: {exc}") from None


def mirror_release(settings: Settings, engine: Engine, release: str, *, datasets: list[str] | None = None,
                   kinds: list[str] | None = None, normalizations: list[str] | None = None,
                   keys: list[str] | None = None, verify: bool = False, dry_run: bool = False,
                   workers: int | None = None, max_bandwidth: float | None = None, part_size: int | None = None,
                   progress: bool | None = None, target_endpoint_url: str | None = None, durable: bool = True,
                   free_space: Callable[[Path], int] = _disk_free,
                   fetched: tuple[FetchedObject, Manifest] | None = None) -> MirrorReport:
    """Mirror the selected files of ``release`` into ``settings.mirror_root``; see the module docstring.

    ``keys`` narrows the selection to those relative paths (the release DAG mirrors batches);
    ``progress`` None shows a bar only on a terminal; ``free_space`` is injectable for tests;
    ``fetched``: the release's manifest as the caller has just fetched it (not fetched again).
    Raises :class:`InsufficientSpaceError` before fetching anything when the disk is too small;
    failed files do not raise: they are in the report (and the run is recorded as failed).
    """
    started = time.monotonic()
    workers = workers or settings.workers
    client = source.make_client(settings, max_pool_connections=2 * workers + 4)
    fetched_manifest, manifest = fetched or load_manifest(client, settings, release)
    if not dry_run:
        ensure_release_recorded(engine, fetched_manifest, manifest)
    scope = settings.run_scope
    files = [f for f in manifest.select(datasets, kinds, normalizations) if scope.mirrors(f)]
    if keys is not None:
        wanted = set(keys)
        files = [f for f in files if f.relative_path in wanted]
    target = (_S3Target(settings.mirror_root, target_endpoint_url, workers, verify) if not settings.mirror_is_local
              else _LocalTarget(settings.mirror_path))
    report = MirrorReport(release, target.name, dry_run=dry_run, selected=len(files))

    by_key, by_content = _known_objects(engine, target.name, files)
    work: list[_Work] = []
    for f in files:
        try:
            work.append(target.plan(f, by_key.get(f.relative_path), by_content, verify))
        except UnsafeKeyError as exc:
            report.failed[f.relative_path] = f"refused: {exc}"
    todo = [w for w in work if w.action != Action.SKIP]
    report.skipped = len(work) - len(todo)
    report.bytes_to_fetch = sum(w.file.size for w in todo if w.action == Action.FETCH)
    if dry_run:
        report.fetched = sum(w.action == Action.FETCH for w in todo)
        report.copied = sum(w.action == Action.COPY for w in todo)
        report.adopted = sum(w.action == Action.CHECK for w in todo)
        return report
    target.preflight(todo, free_space)

    target.write_manifest(fetched_manifest.key, fetched_manifest.body)
    run_id, previous = _start_run(engine, release, target.name,
                                  {"datasets": datasets, "kinds": kinds, "normalizations": normalizations,
                                   "keys": len(keys) if keys is not None else None}, verify)
    meter = Progress(f"mirror {release}", report.bytes_to_fetch, progress)
    transfer = Transfer(client, settings.bucket, workers=workers, max_bandwidth=max_bandwidth,
                        on_bytes=meter.add, durable=durable, **({"part_size": part_size} if part_size else {}))
    records: list[dict] = []
    saved_at = time.monotonic()
    one_thread = transfer.small_files_in_one_thread
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="mirror-file") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="mirror-small") as small_pool:
            # Largest first: the long transfers start at once and small files fill the gaps, not the tail.
            alone, small = [], []
            for w in sorted(todo, key=lambda w: w.file.size, reverse=True):
                batched = isinstance(target, _LocalTarget) and w.action == Action.FETCH and w.file.size <= SMALL_FILE
                (small if batched else alone).append(w)
            futures = [pool.submit(_process_safely, target, w, transfer) for w in alone]
            # Small files: one thread driving every connection (plain-HTTP GETs), or a batch to each thread.
            futures += [(small_pool if one_thread else pool).submit(_fetch_batch_safely, target, batch, transfer)
                        for batch in small_batches(small, workers, one_thread)]
            try:
                for future in as_completed(futures):
                    for outcome in future.result():
                        if outcome.result == Result.FAILED:
                            report.failed[outcome.key] = outcome.reason
                            log.error("%s: %s", outcome.key, outcome.reason)
                            continue
                        report.fetched += outcome.result == Result.FETCHED
                        report.copied += outcome.result == Result.COPIED
                        report.adopted += outcome.result == Result.ADOPTED
                        report.skipped += outcome.result == Result.ADOPTED
                        records.append(outcome.record)
                    if len(records) >= RECORD_BATCH or time.monotonic() - saved_at >= RECORD_EVERY_S:
                        _save_records(engine, target.name, records)
                        saved_at = time.monotonic()
            except BaseException:
                transfer.stopped.set()
                for future in futures:
                    future.cancel()
                raise
    finally:
        transfer.close()
        meter.close()
        _save_records(engine, target.name, records)
    report.bytes_fetched = meter.done
    report.seconds = time.monotonic() - started
    _finish_run(engine, run_id, report, previous, scope)
    return report


class MirrorFailedError(RuntimeError):
    """Files of a release could not be placed; the message names them (a failed Airflow task), ``report``
    is the run's whole report."""

    def __init__(self, message: str, report: MirrorReport) -> None:
        super().__init__(message)
        self.report = report


def _process_safely(target: _LocalTarget | _S3Target, work: _Work, transfer: Transfer) -> list[_Outcome]:
    """One file's outcome; an unexpected error fails that file only, naming the error."""
    try:
        return [target.process(work, transfer)]
    except Exception as exc:
        return [_unexpected(work, exc)]


def _unexpected(work: _Work, exc: Exception) -> _Outcome:
    log.error("%s: unexpected error", work.file.relative_path, exc_info=exc)
    return _Outcome(work.file.relative_path, Result.FAILED, f"{type(exc).__name__}: {exc}")


def small_batches(files: list[_Item], workers: int, one_thread: bool) -> list[list[_Item]]:
    """Small files in the batches the transfer gets them: ``LOOP_BATCH`` at a time for the one thread driving every
    connection, else at most ``SMALL_BATCH`` to a thread, spread over ``workers`` threads."""
    size = LOOP_BATCH if one_thread else max(1, min(SMALL_BATCH, -(-len(files) // workers)))
    return [files[i:i + size] for i in range(0, len(files), size)]


def _fetch_batch_safely(target: _LocalTarget, batch: list[_Work], transfer: Transfer) -> list[_Outcome]:
    """A batch's outcomes; an unexpected error fails the files of that batch only, naming the error."""
    try:
        return target.fetch_batch(batch, transfer)
    except Exception as exc:
        log.exception("a batch of %d small files from %s: unexpected error", len(batch), batch[0].file.relative_path)
        return [_Outcome(w.file.relative_path, Result.FAILED, f"{type(exc).__name__}: {exc}") for w in batch]
