"""The transfer engine: one mirror run's source client, part pool, bandwidth cap and byte counter
(:class:`Transfer`), and the verified local copy of a file already mirrored (:func:`copy_verified`)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import ssl
import threading
import time
from base64 import b64encode
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError
from botocore.httpsession import get_cert_path

from etl.transfer.common import (
    HASH_CHUNK,
    MAX_PARTS,
    PART_MEMORY,
    PART_SIZE,
    PARTIAL_SUFFIX,
    PERSIST_EVERY_S,
    READ_CHUNK,
    S3_MIN_PART_SIZE,
    SIDECAR_SUFFIX,
    Failures,
    FileJob,
    HttpError,
    MiB,
    RateLimiter,
    RetryPolicy,
    ShortRead,
    TransferError,
    content_total,
    write_at,
)
from etl.transfer.files import (
    GroupSync,
    Held,
    PartBuffers,
    PartWriter,
    PayloadMd5,
    Sidecar,
    lock_partial,
    open_nofollow,
    place_held,
    unlink_quietly,
)
from etl.transfer.http_source import HandOver, HttpSource
from etl.transfer.small_files import SmallFileLoop

log = logging.getLogger(__name__)


class Transfer:
    """One mirror run's transfer machinery: source client, part pool, bandwidth cap, byte counter."""

    def __init__(self, client: BaseClient, bucket: str, *, workers: int, part_size: int = PART_SIZE,
                 max_bandwidth: float | None = None, on_bytes: Callable[[int], None] = lambda n: None,
                 durable: bool = True, retry_seconds: float | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.workers = workers
        self.part_size = part_size
        self.limiter = RateLimiter(max_bandwidth) if max_bandwidth else None
        self.on_bytes = on_bytes
        self.durable = durable  # fsync each file before its rename (and .partial ranges before listing them)
        self.http = HttpSource.for_client(client, bucket)  # unsigned GETs without botocore
        self.retry = RetryPolicy.for_client(client, retry_seconds)  # when a failing GET is given up
        self.local = threading.local()  # each thread's read buffer
        self.group_sync = GroupSync()  # small files: one syncfs for all files waiting, before their renames
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="mirror-part")
        self.stopped = threading.Event()  # set on interrupt: transfers stop at the next chunk
        # Parts are held in memory until hashed (and uploaded, for S3 targets): at most this many at once.
        self.buffer_slots = threading.Semaphore(max(2, min(workers + 2, PART_MEMORY // part_size)))
        self.buffers = PartBuffers()
        self.small_loop: SmallFileLoop | None = None  # made at the first small files

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.http is not None:
            self.http.close()

    def part_size_for(self, size: int, minimum: int) -> int:
        """Parts of ``part_size`` (at least ``minimum``), larger when a file would need too many."""
        wanted = max(self.part_size, minimum, -(-size // MAX_PARTS))
        return -(-wanted // MiB) * MiB if wanted > MiB else wanted

    # -- reading the source -------------------------------------------------------------------

    def read_range(self, key: str, start: int, end: int, expected_total: int,
                   write: Callable[[int, memoryview | bytes], None] | None, into: memoryview | None = None) -> str:
        """GET bytes [start, end) of ``key``, handing each chunk and its offset to ``write``; returns the ETag.

        With ``into`` (``end - start`` bytes) the bytes land there, read from the socket straight into
        it, and ``write`` (if any) sees views of it; without, a chunk may be a view of a buffer reused for
        the next one: ``write`` must use it at once. Transient failures are retried as the module
        docstring says, continuing from the last byte received rather than from the start of the range.
        """
        source, origin = self.http, start
        if source is not None and source.enabled:
            try:
                return self._read_range_http(source, key, start, end, expected_total, write, into)
            except HandOver as exc:
                source.enabled = False
                log.warning("GET %s: %s; botocore makes the GETs from now on (it follows redirects)", key, exc)
                start = exc.pos
        return self._read_range_botocore(key, start, end, expected_total, write, into, origin)

    def _read_range_botocore(self, key: str, pos: int, end: int, expected_total: int,
                             write: Callable[[int, memoryview | bytes], None] | None, into: memoryview | None,
                             origin: int) -> str:
        """:meth:`read_range` through botocore, from ``pos``: botocore has retried a GET that raises, as the
        client's config says, so only a body that breaks off is retried here (resumed)."""
        failures = Failures(key, self.retry)
        while True:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={pos}-{end - 1}")
            except ClientError as exc:
                error = exc.response.get("Error", {})
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                raise TransferError(f"GET failed: {error.get('Code') or exc} (HTTP {status}) for {key}") from exc
            except BotoCoreError as exc:
                raise TransferError(f"GET failed: {exc} for {key}") from exc
            body = response["Body"]
            try:
                total = content_total(response)
                if total is not None and total != expected_total:
                    raise TransferError(f"source object is {total} bytes, the manifest says {expected_total}")
                while pos < end:
                    chunk = body.read(min(READ_CHUNK, end - pos))
                    if self.stopped.is_set():
                        raise TransferError("interrupted")
                    if not chunk:
                        raise ShortRead(f"connection ended at byte {pos} of range ending at {end}")
                    if self.limiter:
                        self.limiter.acquire(len(chunk))
                    if into is not None:
                        into[pos - origin:pos - origin + len(chunk)] = chunk
                    if write is not None:
                        write(pos, chunk)
                    pos += len(chunk)
                    self.on_bytes(len(chunk))
                return response.get("ETag", "").strip('"')
            except (BotoCoreError, OSError, ShortRead) as exc:
                failures.failed(exc, pos)
            finally:
                body.close()

    def _buffer(self) -> memoryview:
        view = getattr(self.local, "buffer", None)
        if view is None:
            view = self.local.buffer = memoryview(bytearray(READ_CHUNK))
        return view

    def _read_range_http(self, source: HttpSource, key: str, start: int, end: int, expected_total: int,
                         write: Callable[[int, memoryview], None] | None, into: memoryview | None) -> str:
        """:meth:`read_range` over :class:`HttpSource`: the socket reads into ``into``, or into one reused
        buffer per thread."""
        pos = start
        failures = Failures(key, self.retry)
        buffer = self._buffer() if into is None else None
        while True:
            try:
                response = source.get(key, pos, end)
                total = content_total({"ContentRange": response.getheader("Content-Range")})
                if total is None and response.status == 200:
                    total = response.length
                if total is not None and total != expected_total:
                    raise TransferError(f"source object is {total} bytes, the manifest says {expected_total}")
                etag = (response.getheader("ETag") or "").strip('"')
                while pos < end:
                    size = min(READ_CHUNK, end - pos)
                    target = buffer[:size] if into is None else into[pos - start:pos - start + size]
                    n = response.readinto(target)
                    if self.stopped.is_set():
                        raise TransferError("interrupted")
                    if not n:
                        raise ShortRead(f"connection ended at byte {pos} of range ending at {end}")
                    if self.limiter:
                        self.limiter.acquire(n)
                    if write is not None:
                        write(pos, target[:n])
                    pos += n
                    self.on_bytes(n)
                if not response.complete():  # the server closes it, or sent more than the range
                    source.drop()
                return etag
            except TransferError:
                source.drop()
                raise
            except HandOver as exc:
                source.drop()
                raise HandOver(str(exc), pos) from exc  # where this range stands, for botocore to go on
            except HttpError as exc:
                source.drop()
                if not exc.retryable:
                    raise TransferError(f"GET failed: {exc.code or exc} (HTTP {exc.status}) for {key}") from exc
                failures.failed(exc, pos)
            except ssl.SSLCertVerificationError as exc:
                source.drop()
                raise TransferError(f"GET failed: the TLS certificate of {source.origin} is not trusted ({exc}; "
                                    f"CA bundle: {get_cert_path(source.verify)}) for {key}") from exc
            except (OSError, http.client.HTTPException, ShortRead) as exc:
                source.drop()
                failures.failed(exc, pos)

    def _head_etag(self, job: FileJob) -> str:
        """An empty file is never fetched; only its existence and size are confirmed."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=job.key)
        except ClientError as exc:
            raise TransferError(f"HEAD failed: {exc.response.get('Error', {}).get('Code', exc)}") from exc
        if head.get("ContentLength") != job.size:
            raise TransferError(f"source object is {head.get('ContentLength')} bytes, the manifest says {job.size}")
        return head.get("ETag", "").strip('"')

    # -- parts in parallel, hashed in order ---------------------------------------------------

    def _run_parts(self, job: FileJob, part_size: int, done: set[int], fetch_part: Callable[[int], tuple],
                   hasher: PayloadMd5, persist: Callable[[set[int]], None] | None,
                   slots: threading.Semaphore | None) -> tuple[str, set[str]]:
        """Fetch the parts not in ``done`` through the pool; return (MD5 of all parts, etags).

        ``fetch_part(i)`` returns (etag, payload); each finished part goes to ``hasher``, which says
        which parts it has hashed, and so no longer holds one of ``slots`` (parts held in memory).
        """
        n_parts = max(1, -(-job.size // part_size))
        todo = deque(i for i in range(n_parts) if i not in done)
        pending: dict[Future, int] = {}
        held: set[int] = set()  # parts holding one of ``slots``
        etags: set[str] = set()
        persisted_at = time.monotonic()
        window = 2 * self.workers
        try:
            while todo or pending:
                while todo and len(pending) < window:
                    if slots is not None:
                        if not slots.acquire(blocking=not pending):
                            break
                        held.add(todo[0])
                    i = todo.popleft()
                    pending[self.pool.submit(fetch_part, i)] = i
                finished, _ = wait(pending, timeout=PERSIST_EVERY_S, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = pending.pop(future)
                    etag, payload = future.result()
                    etags.add(etag)
                    done.add(i)
                    for hashed in hasher.part_done(i, payload):
                        if hashed in held:
                            held.discard(hashed)
                            slots.release()
                if persist and time.monotonic() - persisted_at >= PERSIST_EVERY_S:
                    persist(done)
                    persisted_at = time.monotonic()
        except BaseException:
            for future in pending:
                future.cancel()
            if persist:  # keep what reached disk, for the next run
                done.update(i for future, i in pending.items()
                            if not future.cancelled() and future.exception() is None)
                with contextlib.suppress(OSError):  # a full disk: the sidecar saved last lists ranges on disk
                    persist(done)
            raise
        finally:
            for _ in held:
                slots.release()
        return hasher.hexdigest(), etags

    # -- into a local file --------------------------------------------------------------------

    def download(self, job: FileJob, final: Path) -> str:
        """Fetch ``job`` into ``final`` via ``final.partial``; verified, fsynced and renamed. Returns the ETag."""
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        sidecar_path = final.with_name(final.name + SIDECAR_SUFFIX)
        fd, new = lock_partial(partial, final, job)
        if fd is None:
            return ""
        try:
            part_size = self.part_size_for(job.size, 0)
            # A .partial left by an earlier run is continued with the part size it was started with.
            sidecar = (Sidecar(sidecar_path, job.size, job.md5, part_size, None, set()) if new
                       else Sidecar.load(sidecar_path, partial, job, part_size))
            if job.size <= sidecar.part_size and not sidecar.done:
                return self._download_whole(job, fd, final, partial, None if new else sidecar_path)
            if not sidecar.done:
                os.ftruncate(fd, job.size)
            writer = PartWriter(fd, partial, self.durable)
            try:
                md5, etags = self._download_parts(job, fd, sidecar, writer)
            finally:
                writer.close()
            known = etags | ({sidecar.etag} if sidecar.etag else set())
            if len(known) > 1:
                raise self._discard(f"the object changed during the download (ETags {sorted(known)})",
                                    partial, sidecar_path)
            if md5 != job.md5:
                raise self._discard(f"MD5 {md5} of the fetched bytes differs from the manifest's {job.md5}",
                                    partial, sidecar_path)
            if self.durable:
                os.fsync(fd)
            os.replace(partial, final)
            unlink_quietly(sidecar_path)
        finally:
            os.close(fd)  # releases the lock, after the rename
        return next(iter(known), "")

    def _download_parts(self, job: FileJob, fd: int, sidecar: Sidecar, writer: PartWriter) -> tuple[str, set[str]]:
        """The parts not yet on disk, each fetched into a buffer of its own, written from it and hashed from
        it in order (the parts a continued ``.partial`` holds are read back when their turn comes)."""
        hasher = PayloadMd5(self.buffers.give, fd, job.size, sidecar.part_size, sidecar.done)

        def fetch_part(i: int) -> tuple[str, memoryview]:
            start = i * sidecar.part_size
            end = min(job.size, start + sidecar.part_size)
            view = self.buffers.take(end - start)
            try:
                etag = self.read_range(job.key, start, end, job.size, None, into=view)
                writer.write(view, start)
            except BaseException:
                self.buffers.give(view)
                raise
            sidecar.etag = sidecar.etag or etag
            return etag, view

        def persist(done: set[int]) -> None:
            sidecar.done = done
            sidecar.save(fd, self.durable)

        return self._run_parts(job, sidecar.part_size, set(sidecar.done), fetch_part, hasher, persist,
                               self.buffer_slots)

    def _download_whole(self, job: FileJob, fd: int, final: Path, partial: Path, sidecar: Path | None) -> str:
        etag = self._fetch_whole(job, fd, partial, sidecar)
        if self.durable:
            self.group_sync.sync(fd)
        os.replace(partial, final)
        return etag

    def _fetch_whole(self, job: FileJob, fd: int, partial: Path, sidecar: Path | None) -> str:
        """Small files: one GET into the ``.partial``, hashed while it streams (retries continue at the next
        byte: in order); the ``.partial`` is removed if the bytes do not match. ``sidecar`` is None for a
        ``.partial`` just created, which has nothing to clear."""
        if sidecar is not None:
            unlink_quietly(sidecar)
            os.ftruncate(fd, 0)
        digest = hashlib.md5()

        def write(pos: int, chunk: bytes) -> None:
            write_at(fd, chunk, pos, partial)
            digest.update(chunk)

        etag = self.read_range(job.key, 0, job.size, job.size, write) if job.size else self._head_etag(job)
        if digest.hexdigest() != job.md5:
            raise self._discard(f"MD5 {digest.hexdigest()} of the fetched bytes differs from the manifest's "
                                f"{job.md5}", partial)
        return etag

    @property
    def small_files_in_one_thread(self) -> bool:
        """Small files go through one thread driving many connections (:class:`SmallFileLoop`): plain-HTTP
        GETs. botocore's GETs (signed requests, a source that redirected) need a thread per connection."""
        return self.http is not None and self.http.enabled

    def download_small(self, jobs: list[tuple[FileJob, Path]]) -> list[str | Exception]:
        """:meth:`download` of each of many small files, with few syncs for them all.

        Over plain-HTTP GETs, :class:`SmallFileLoop` fetches them over ``workers`` connections at once;
        what it leaves, and everything when botocore makes the GETs, is fetched one after another here.
        Each file is fetched whole into a new ``.partial`` (locked) and verified; then one filesystem
        sync makes a group of them durable (when ``durable``) before any is renamed into place. Per
        file, in order: its ETag, or the error that stopped it.
        """
        if not self.small_files_in_one_thread:
            return self._download_one_by_one(jobs)
        if self.small_loop is None:
            self.small_loop = SmallFileLoop(self.http, self.workers, self.group_sync.sync if self.durable else None,
                                            self.on_bytes, self.limiter, self.stopped)
        results = self.small_loop.fetch(jobs)
        left = [i for i, result in enumerate(results) if result is None]
        for i, result in zip(left, self._download_one_by_one([jobs[i] for i in left]), strict=True):
            results[i] = result
        return results

    def _download_one_by_one(self, jobs: list[tuple[FileJob, Path]]) -> list[str | Exception]:
        """Each file fetched in turn (a file with a ``.partial`` to continue, or too large for one GET,
        through :meth:`download` on its own), one sync for those fetched into new ``.partial`` files."""
        results: list[str | Exception] = []
        held: list[Held] = []  # verified, not yet renamed
        try:
            for job, final in jobs:
                try:
                    results.append(self._fetch_small(job, final, len(results), held))
                except Exception as exc:  # that file's outcome, whatever it is: the others go on
                    results.append(exc)
        finally:
            place_held(held, results, self.group_sync.sync if self.durable else None)
        return results

    def _fetch_small(self, job: FileJob, final: Path, index: int, held: list[Held]) -> str:
        """One file of :meth:`_download_one_by_one`: fetched, verified and added to ``held`` (its lock kept)."""
        if job.size > self.part_size_for(job.size, 0):
            return self.download(job, final)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        fd, new = lock_partial(partial, final, job)
        if fd is None:
            return ""
        if not new:
            os.close(fd)
            return self.download(job, final)
        try:
            etag = self._fetch_whole(job, fd, partial, None)
        except TransferError:
            unlink_quietly(partial)  # a small file has nothing to continue: no empty or cut .partial stays
            os.close(fd)
            raise
        except BaseException:
            os.close(fd)
            raise
        held.append(Held(index, fd, partial, final))
        return etag

    @staticmethod
    def _discard(reason: str, *paths: Path) -> TransferError:
        """Bad bytes never stay: remove them, and say a fresh attempt may succeed."""
        unlink_quietly(*paths)
        return TransferError(reason, retry_file=True)

    # -- into another S3 bucket ---------------------------------------------------------------

    def upload(self, job: FileJob, target: BaseClient, bucket: str, key: str) -> str:
        """Stream ``job`` from the source into ``bucket/key`` of ``target``; completed only if the MD5 matches."""
        part_size = self.part_size_for(job.size, S3_MIN_PART_SIZE)
        metadata = {"md5": job.md5}
        if job.size <= part_size:
            buffer = bytearray()
            etag = (self.read_range(job.key, 0, job.size, job.size, lambda pos, chunk: buffer.extend(chunk))
                    if job.size else self._head_etag(job))
            md5 = hashlib.md5(buffer)
            if md5.hexdigest() != job.md5:
                raise TransferError(f"MD5 {md5.hexdigest()} of the fetched bytes differs from the manifest's "
                                    f"{job.md5}", retry_file=True)
            target.put_object(Bucket=bucket, Key=key, Body=bytes(buffer), Metadata=metadata,
                              ContentMD5=b64encode(md5.digest()).decode())
            return etag
        upload_id = target.create_multipart_upload(Bucket=bucket, Key=key, Metadata=metadata)["UploadId"]
        uploaded: dict[int, str] = {}
        try:
            def fetch_part(i: int) -> tuple[str, bytes]:
                start = i * part_size
                buffer = bytearray()
                etag = self.read_range(job.key, start, min(job.size, start + part_size), job.size,
                                       lambda pos, chunk: buffer.extend(chunk))
                data = bytes(buffer)
                response = target.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=i + 1,
                                              Body=data, ContentMD5=b64encode(hashlib.md5(data).digest()).decode())
                uploaded[i + 1] = response["ETag"]
                return etag, data

            md5, etags = self._run_parts(job, part_size, set(), fetch_part, PayloadMd5(), None, self.buffer_slots)
            if len(etags) > 1:
                raise TransferError(f"the object changed during the download (ETags {sorted(etags)})",
                                    retry_file=True)
            if md5 != job.md5:
                raise TransferError(f"MD5 {md5} of the fetched bytes differs from the manifest's {job.md5}",
                                    retry_file=True)
            target.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": uploaded[n]} for n in sorted(uploaded)]})
        except BaseException:
            target.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        return next(iter(etags), "")


def copy_verified(source: Path, job: FileJob, final: Path, durable: bool = True) -> None:
    """Place a local copy of identical content (same MD5 and size under another key), verified as it is copied."""
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    final.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5()
    with open(source, "rb") as src, os.fdopen(open_nofollow(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                              "wb") as dst:
        while chunk := src.read(HASH_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        if durable:
            os.fsync(dst.fileno())
    if digest.hexdigest() != job.md5 or partial.lstat().st_size != job.size:
        unlink_quietly(partial)
        raise TransferError(f"local copy source {source} no longer matches MD5 {job.md5}", retry_file=True)
    os.replace(partial, final)
