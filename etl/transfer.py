"""Moving bytes for the mirror: parallel ranged GETs into a resumable ``.partial`` file or an S3 upload.

Every transfer is checked against the manifest's size and MD5 before anything becomes visible:
a local file is renamed from ``<name>.partial`` only after its whole content hashed right, and an
S3 upload is completed only then (a multipart upload is aborted otherwise). Large files are split
into byte ranges (parts) fetched by a shared pool of threads, each part read from the socket
straight into a page-aligned buffer of its own, written from that buffer (``O_DIRECT`` where the
filesystem takes it and files are made durable: no copy into the page cache) and hashed from it
in order: a part that arrives ahead of its turn is held until the parts before it are hashed, so
no byte is read back from disk. Parts held in memory are bounded (``PART_MEMORY``), whatever the
file size. The parts already on disk are listed in ``<name>.partial.json`` (written after an
fdatasync), so an interrupted download continues where it stopped; those parts are read back to
be hashed when their turn comes. Small files (one part) are fetched with one GET into a new
``.partial``, hashed as they stream.

Requests to a public bucket are unsigned; those GETs skip botocore and go over plain
``http.client`` keep-alive connections (one per thread), reading the socket straight into the
part's buffer (small files: a reused one). They go where botocore's would, as botocore's would:
its URL for the key (endpoint, region, virtual-hosted or path addressing), its certificate checks
(``AWS_CA_BUNDLE``, ``verify``), its proxy (``HTTPS_PROXY``/``NO_PROXY``: a CONNECT tunnel for
HTTPS) and timeouts; a client whose transport they cannot reproduce (signed, a client
certificate, proxy TLS options), or a source that redirects, gets botocore's GETs instead.

Retries are one layer per failure. botocore retries its own requests as the client's config says; a
body that breaks off mid-range is resumed here, from the last byte received. The plain-HTTP path
does both itself, with the client's attempt count and botocore's backoff: throttling, 500/502/503/504
and dropped connections are retried, other errors (403, 404, an untrusted certificate) are not. A
range gives up after the client's attempts, or ``ABC_TRANSFER_RETRY_SECONDS`` after it started
failing without progress, with an error naming the key and the last reason; a file is fetched again
whole only when its bytes did not match (mirror's ``FILE_ATTEMPTS``), never for a failed GET.

Durability (``durable``, the default): a file is fsynced before its rename, so a placed file
survives a power cut. Large files' parts go to the disk as they are written (``O_DIRECT``, or a
writeback started at once where the filesystem refuses it), so that fsync finds little left to
wait for; small files share one ``syncfs`` among all files waiting for theirs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import http.client
import io
import json
import logging
import mmap
import os
import random
import re
import socket
import ssl
import threading
import time
from base64 import b64encode
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from botocore import UNSIGNED
from botocore.awsrequest import AWSPreparedRequest
from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError
from botocore.httpsession import URLLib3Session, get_cert_path, mask_proxy_url
from botocore.retries.standard import DEFAULT_MAX_ATTEMPTS

from etl.config import env

log = logging.getLogger(__name__)

MiB = 1 << 20
PART_SIZE = 32 * MiB
S3_MIN_PART_SIZE = 8 * MiB  # S3 refuses multipart parts under 5 MiB; 8 MiB keeps part counts sane
MAX_PARTS = 9000  # below S3's 10,000-part limit; also keeps the resume sidecar small
PART_MEMORY = 256 * MiB  # parts held in memory until hashed (and uploaded), at most about this much
READ_CHUNK = 1 * MiB
MAX_HEADER_LINE = 65536  # http.client's limits on a response's header lines
MAX_HEADERS = 100
HASH_CHUNK = 4 * MiB
DIRECT_ALIGN = 4096  # O_DIRECT wants buffer, offset and length aligned to the logical block size; 4 KiB covers all
LEGACY_MAX_ATTEMPTS = 5  # botocore's attempts in its legacy retry mode when none are configured
PERSIST_EVERY_S = 1.0
PARTIAL_SUFFIX = ".partial"
SIDECAR_SUFFIX = ".partial.json"
RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests"}
RETRYABLE_STATUSES = {429, 500, 502, 503, 504}
REDIRECT_STATUSES = {301, 302, 307, 308}


class TransferError(RuntimeError):
    """A file could not be transferred. ``retry_file``: a fresh attempt at the whole file may help."""

    def __init__(self, message: str, retry_file: bool = False) -> None:
        super().__init__(message)
        self.retry_file = retry_file


class LocalWriteError(TransferError):
    """Writing the mirror's own file failed (no space left on the device, an I/O error): not a fault of
    the source, so not retried like a dropped connection; the ``.partial`` keeps the ranges that
    reached disk for the next run."""


def _pwrite(fd: int, chunk: memoryview | bytes, pos: int, path: Path) -> None:
    """All of ``chunk`` at ``pos``; an OS error becomes :class:`LocalWriteError` naming the file."""
    view = memoryview(chunk)
    try:
        while view:
            written = os.pwrite(fd, view, pos)
            view, pos = view[written:], pos + written
    except OSError as exc:
        raise LocalWriteError(f"writing {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class FileJob:
    key: str
    size: int
    md5: str


def parse_rate(text: str | None) -> float | None:
    """``50M``, ``1.5G``, ``800k`` or plain bytes per second -> bytes per second (None: unlimited)."""
    if not text:
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("/s").removesuffix("b")
    factor = units.get(text[-1:], 1)
    value = float(text[:-1] if text[-1:] in units else text) * factor
    if value <= 0:
        raise ValueError(f"bandwidth {text!r} must be positive")
    return value


class RateLimiter:
    """A token bucket shared by all transfer threads: ``--max-bandwidth``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate / 4, READ_CHUNK)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate) - n
            self.updated = now
            wait_s = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait_s:
            time.sleep(wait_s)


class _ShortRead(Exception):
    """The connection ended before the requested range did."""


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 20.0) -> float:
    """Exponential backoff with full jitter, so throttled workers do not retry in step.

    The defaults are botocore's own (up to 1, 2, 4, ... s, at most 20 s) for the ``attempt``-th failure.
    """
    return random.uniform(0, min(cap, base * 2 ** attempt))


def _content_total(response: dict) -> int | None:
    content_range = response.get("ContentRange") or ""
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else None


@dataclass(frozen=True)
class RetryPolicy:
    """When a failing data GET is given up: after ``attempts`` tries of a range, or once ``seconds`` have
    passed since it started failing without a byte more arriving.

    ``attempts`` is the S3 client's own count (botocore's ``retries`` config, ``AWS_MAX_ATTEMPTS``),
    so a GET gives up after as many tries on either path; ``seconds`` is ``ABC_TRANSFER_RETRY_SECONDS``.
    """

    attempts: int
    seconds: float

    @classmethod
    def for_client(cls, client: BaseClient, seconds: float | None = None) -> RetryPolicy:
        retries = client.meta.config.retries or {}
        attempts = retries.get("total_max_attempts") or (
            LEGACY_MAX_ATTEMPTS if retries.get("mode") == "legacy" else DEFAULT_MAX_ATTEMPTS)
        return cls(int(attempts), float(env("ABC_TRANSFER_RETRY_SECONDS")) if seconds is None else seconds)


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, _HttpError) else f"{type(exc).__name__}: {exc}"


class _Failures:
    """One range's failed attempts: waits (backoff) before the next one, or gives up as the policy says."""

    def __init__(self, key: str, policy: RetryPolicy) -> None:
        self.key, self.policy = key, policy
        self.count = 0
        self.since = 0.0  # when the current run of failures without progress began
        self.pos = -1  # the byte reached at the last failure

    def failed(self, exc: Exception, pos: int) -> None:
        """Sleep before the next attempt, or raise :class:`TransferError` naming the key and ``exc``."""
        now = time.monotonic()
        self.count += 1
        if pos != self.pos:  # the first failure, or bytes arrived since the last one: the clock starts again
            self.since, self.pos = now, pos
        delay = backoff_delay(self.count)
        if self.count >= self.policy.attempts or now + delay - self.since > self.policy.seconds:
            raise TransferError(f"GET gave up on {self.key} after {self.count} attempts "
                                f"({now - self.since:.1f} s without progress): {_reason(exc)}") from exc
        time.sleep(delay)


class _HttpError(Exception):
    """A non-2xx answer to a GET: the HTTP status and the S3 error code from its body."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"HTTP {status} {code}".strip())
        self.status, self.code = status, code

    @property
    def retryable(self) -> bool:
        """What botocore retries: throttling and transient error codes, and 500, 502, 503, 504 (and 429)."""
        return self.code in RETRYABLE_CODES or self.status in RETRYABLE_STATUSES


class _HandOver(Exception):
    """The source answered a GET as the plain path does not follow: a redirect (a bucket in another region),
    which botocore follows, or a body of unknown length. botocore makes the GETs from then on.

    ``pos`` is the byte the range had reached, where botocore takes over.
    """

    def __init__(self, message: str, pos: int = 0) -> None:
        super().__init__(message)
        self.pos = pos


class _FastPathUnsupported(Exception):
    """The client has a setting the plain-HTTP path does not reproduce; botocore then makes every GET."""


class _Captured(Exception):
    """Stops botocore's probe request just before it would be sent."""


def botocore_get_url(client: BaseClient, bucket: str, key: str) -> str:
    """The URL botocore requests for GET ``bucket/key`` with ``client``, taken from its own request before sending.

    Endpoint, region, addressing style (virtual-hosted or path), dualstack and key quoting are then
    botocore's by construction. (A presigned URL is not the same: it names the global endpoint.)
    """
    seen: list[str] = []

    def capture(request: AWSPreparedRequest, **kwargs: object) -> None:
        if key in request.url:  # only the probe: other threads may use the client meanwhile
            seen.append(request.url)
            raise _Captured

    event, unique_id = "before-send.s3.GetObject", f"abc-mirror-get-url-{id(seen)}"
    client.meta.events.register_first(event, capture, unique_id=unique_id)
    try:
        client.get_object(Bucket=bucket, Key=key)
    except _Captured:
        pass
    finally:
        client.meta.events.unregister(event, unique_id=unique_id)
    if not seen:
        raise _FastPathUnsupported("botocore sent no GET request to look at")
    return seen[0]


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """What botocore's connections check: ``verify`` False nothing; True the CA bundle botocore uses by
    default (certifi's); a path (``AWS_CA_BUNDLE``, ``REQUESTS_CA_BUNDLE``, ``verify=``) that bundle alone."""
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=get_cert_path(verify))


class _Tuned:
    """Connects within the client's connect timeout (TCP, proxy tunnel, TLS handshake), then reads with its
    read timeout, as botocore's urllib3 connections do; TCP keepalive if the client's config asks for it.

    http.client only connects (proxy tunnel and TLS included): requests are written and responses read
    on ``sock`` by :class:`_Response`, through ``reader``, one buffered reader for the connection's life.
    """

    read_timeout: float
    keepalive: bool
    sock: socket.socket | None
    reader: io.BufferedReader | None = None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.settimeout(self.read_timeout)
        if self.keepalive:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        if self.reader is not None:  # the socket stays open while a file made from it is
            self.reader.close()
            self.reader = None
        super().close()  # type: ignore[misc]


class _Response:
    """A GET's response, read off the connection by hand: status, headers, then a body of known length.

    http.client parses each response's headers into an ``email`` message, which costs more CPU than a
    small object's bytes; this reads what the GET path needs and no more. Informational (1xx) answers
    are skipped; a body without ``Content-Length`` is read to its end only for errors (chunked, or up to
    the connection's close), as :meth:`error_body`.
    """

    def __init__(self, reader: io.BufferedReader) -> None:
        self.reader = reader
        while True:
            line = reader.readline(MAX_HEADER_LINE + 1)
            if not line:
                raise http.client.RemoteDisconnected("the connection closed without a response")
            version, _, rest = line.partition(b" ")
            if not version.startswith(b"HTTP/") or not rest[:3].isdigit() or len(line) > MAX_HEADER_LINE:
                raise http.client.BadStatusLine(repr(line[:100]))
            self.status = int(rest[:3])
            self.headers: dict[str, str] = {}
            for _ in range(MAX_HEADERS):
                line = reader.readline(MAX_HEADER_LINE + 1)
                if line in (b"\r\n", b"\n", b""):
                    break
                if len(line) > MAX_HEADER_LINE:
                    raise http.client.LineTooLong("header line")
                name, _, value = line.decode("latin-1").partition(":")
                self.headers[name.strip().lower()] = value.strip()
            else:
                raise http.client.HTTPException(f"more than {MAX_HEADERS} headers")
            if not 100 <= self.status < 200:
                break
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length", "")
        self.length = int(length) if length.isdigit() and not self.chunked else None
        self.reusable = version != b"HTTP/1.0" and self.headers.get("connection", "").lower() != "close"

    def getheader(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def readinto(self, view: memoryview) -> int:
        """Body bytes into ``view``, at most what is left of the body; 0 at its end."""
        n = self.reader.readinto(view[:self.length]) if self.length else 0
        self.length -= n
        return n

    def complete(self) -> bool:
        """The whole body was read and the server keeps the connection: ready for the next request."""
        return self.length == 0 and self.reusable

    def error_body(self, limit: int) -> bytes:
        """At most ``limit`` bytes of an error's body (the connection is dropped after it)."""
        if self.length is not None:
            return self.reader.read(min(self.length, limit))
        if not self.chunked:
            return self.reader.read(limit)  # delimited by the connection's close
        body = b""
        while len(body) < limit:
            size = int(self.reader.readline(MAX_HEADER_LINE).split(b";")[0].strip() or b"0", 16)
            if not size:
                break
            body += self.reader.read(size)
            self.reader.readline(MAX_HEADER_LINE)
        return body[:limit]


class _HttpConnection(_Tuned, http.client.HTTPConnection):
    pass


class _HttpsConnection(_Tuned, http.client.HTTPSConnection):
    pass


class _HttpSource:
    """Unsigned ranged GETs over plain ``http.client``: one keep-alive connection per thread.

    The public bucket needs no signature, so the request is a bare GET with a Range header. Bytes go
    from the socket straight into a caller's buffer (``readinto``), skipping botocore's per-request
    machinery and urllib3's buffering. Everything else is the botocore client's: the URL of each key
    (:func:`botocore_get_url`), certificate checks (its ``verify``), its proxy for the URL's scheme
    (``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` as botocore read them, or ``Config(proxies=...)``:
    HTTPS through a CONNECT tunnel, HTTP forwarded), its timeouts and TCP keepalive. A client with
    anything else in its transport gets no fast path (:meth:`for_client`).
    """

    def __init__(self, client: BaseClient, bucket: str) -> None:
        marker = "abc-mirror-key-marker"
        url = urlsplit(botocore_get_url(client, bucket, marker))
        if url.scheme not in ("http", "https") or not url.path.endswith(marker) or url.query or url.fragment:
            raise _FastPathUnsupported(f"botocore's GET URL {url.geturl()} is not scheme://host/path<key>")
        # botocore keeps the transport settings it resolved (verify, proxies, client certificate) on its
        # session only; another botocore without these attributes gets botocore GETs (AttributeError).
        session = getattr(getattr(client, "_endpoint", None), "http_session", None)
        if type(session) is not URLLib3Session:
            raise _FastPathUnsupported(f"the client's HTTP session is a {type(session).__name__}")
        verify, proxies, client_cert = session._verify, session._proxy_config, session._cert_file
        if client_cert:
            raise _FastPathUnsupported("the client presents a TLS client certificate")
        if proxies.settings:
            raise _FastPathUnsupported(f"the client's proxies_config {sorted(proxies.settings)}")
        proxy = proxies.proxy_url_for(url.geturl())
        if proxy and urlsplit(proxy).scheme != "http":
            raise _FastPathUnsupported(f"the proxy {mask_proxy_url(proxy)} is not reached over plain HTTP")
        config = client.meta.config
        self.enabled = True  # False once the source redirected a GET: botocore makes them from then on
        self.https = url.scheme == "https"
        self.origin = f"{url.scheme}://{url.netloc}"
        self.host, self.port = url.hostname, url.port
        self.proxy = urlsplit(proxy) if proxy else None
        self.proxy_headers = proxies.proxy_headers_for(proxy) if proxy else {}
        self.path_prefix = url.path[: -len(marker)]
        # What every GET sends besides its target and range (http.client's Host, as for this URL).
        self.request_headers = f"Host: {url.netloc}\r\nUser-Agent: abc-mirror\r\nAccept-Encoding: identity\r\n"
        # A plain-HTTP proxy is asked for the absolute URL; HTTPS goes through a tunnel to the host.
        self.forwarded = bool(self.proxy) and not self.https
        if self.forwarded:
            self.request_headers += "".join(f"{name}: {value}\r\n" for name, value in self.proxy_headers.items())
        self.verify = verify
        self.context = _tls_context(verify) if self.https else None
        self.connect_timeout = config.connect_timeout or 60
        self.read_timeout = config.read_timeout or 60
        self.keepalive = bool(config.tcp_keepalive)
        self.local = threading.local()
        self.connections: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()

    @classmethod
    def for_client(cls, client: BaseClient, bucket: str) -> _HttpSource | None:
        """The fast path when requests are unsigned and the transport is one it reproduces; None (botocore
        for every GET) otherwise: signed requests, a client certificate, ``proxies_config`` options, a
        proxy reached over HTTPS, a custom HTTP session, or a GET URL with a query."""
        if client.meta.config.signature_version is not UNSIGNED:
            return None
        try:
            return cls(client, bucket)
        except (_FastPathUnsupported, BotoCoreError, AttributeError, OSError) as exc:  # OSError: an unreadable CA
            log.info("GETs from s3://%s go through botocore: %s", bucket, exc)
            return None

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            host, port = (self.proxy.hostname, self.proxy.port or 80) if self.proxy else (self.host, self.port)
            if self.https:
                conn = _HttpsConnection(host, port, timeout=self.connect_timeout, context=self.context)
                if self.proxy:
                    conn.set_tunnel(self.host, self.port, headers=self.proxy_headers)
            else:
                conn = _HttpConnection(host, port, timeout=self.connect_timeout)
            conn.read_timeout, conn.keepalive = self.read_timeout, self.keepalive
            self.local.conn = conn
            with self.lock:
                self.connections.append(conn)
        return conn

    def drop(self) -> None:
        """Forget this thread's connection (after an error it may be mid-response)."""
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            self.local.conn = None

    def close(self) -> None:
        with self.lock:
            for conn in self.connections:
                conn.close()
            self.connections.clear()

    def url(self, key: str) -> str:
        """The URL of ``key``: botocore's for the marker key, with this key quoted as botocore quotes keys."""
        return self.origin + self.path_prefix + quote(key, safe="/~")

    def get(self, key: str, start: int, end: int) -> _Response:
        """The response to GET bytes [start, end) of ``key``, its body unread.

        Raises :class:`_HttpError` for an error status, :class:`_HandOver` for a redirect or a body of
        unknown length.
        """
        conn = self._connection()
        if conn.sock is None:
            conn.connect()
        url = self.url(key)
        conn.sock.sendall(f"GET {url if self.forwarded else url[len(self.origin):]} HTTP/1.1\r\n"
                          f"Range: bytes={start}-{end - 1}\r\n{self.request_headers}\r\n".encode())
        response = _Response(conn.reader)
        if response.status in REDIRECT_STATUSES:
            region = response.getheader("x-amz-bucket-region")
            raise _HandOver(f"HTTP {response.status} from {self.origin}"
                            + (f" (the bucket is in {region})" if region else ""))
        if response.status not in (200, 206):
            found = re.search(rb"<Code>([^<]*)</Code>", response.error_body(64 << 10))
            raise _HttpError(response.status, found.group(1).decode(errors="replace") if found else "")
        if response.length is None:
            raise _HandOver(f"HTTP {response.status} from {self.origin} without a Content-Length")
        content_range = response.getheader("Content-Range")
        # An object shorter than the range asked for is answered, cut: the caller names both sizes.
        if content_range is None:  # the whole object: fine only if that is what was asked for
            ok = start == 0 and response.length <= end
        else:
            served, _, total = content_range.removeprefix("bytes ").partition("/")
            ok = served == f"{start}-{end - 1}" or (total.isdigit() and int(total) < end)
        if not ok:
            raise _HttpError(response.status, f"RangeIgnored ({content_range or 'no Content-Range'})")
        return response


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if hasattr(os, "fdatasync") else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, start: int, length: int) -> None:
    """Ask the kernel to start writing [start, start + length) to disk now, without waiting (Linux).

    A later fdatasync then has little left to wait for: the disk works while the download goes on.
    Elsewhere (or if the call is missing) this does nothing and fdatasync does all the work.
    """
    func = getattr(_libc, "sync_file_range", None)
    if func is not None:
        func(ctypes.c_int(fd), ctypes.c_longlong(start), ctypes.c_longlong(length),
             ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


@dataclass
class _Sidecar:
    """What a ``.partial`` holds: the ranges that reached disk, for the manifest entry it was started for."""

    path: Path
    size: int
    md5: str
    part_size: int
    etag: str | None
    done: set[int]

    @classmethod
    def load(cls, path: Path, partial: Path, job: FileJob, part_size: int) -> _Sidecar:
        fresh = cls(path, job.size, job.md5, part_size, None, set())
        try:
            fd = open_nofollow(path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as handle:
                doc = json.loads(handle.read())
            if (doc["size"], doc["md5"]) != (job.size, job.md5) or partial.lstat().st_size != job.size:
                return fresh
            return cls(path, job.size, job.md5, int(doc["part_size"]), doc.get("etag"), set(doc["done"]))
        except (OSError, ValueError, KeyError, TypeError):
            return fresh

    def save(self, fd: int, durable: bool) -> None:
        """Without ``durable`` a power cut may lose listed ranges: the MD5 check then discards the file."""
        if durable:
            os.fdatasync(fd)  # the ranges listed must really be on disk
        tmp = self.path.with_name(self.path.name + ".tmp")
        write_file_nofollow(tmp, json.dumps({"size": self.size, "md5": self.md5, "part_size": self.part_size,
                                             "etag": self.etag, "done": sorted(self.done)}).encode(), durable)
        os.replace(tmp, self.path)  # replaces a symlink at the sidecar's name itself, never its target


class SymlinkRefusedError(TransferError):
    """A file the mirror writes (``.partial``, sidecar, temporary file) is a symlink: never followed."""


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` with ``O_NOFOLLOW``: a symlink planted at ``path`` is refused by name, never followed."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and os.path.islink(path)):
            raise SymlinkRefusedError(f"{path} is a symlink; refusing to follow it") from None
        raise


def write_file_nofollow(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` (created or truncated) without following a symlink there."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_chunks(fd: int, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of an open file, in chunks; positional reads, so threads may share ``fd``."""
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(HASH_CHUNK, end - pos), pos)
        if not chunk:
            raise TransferError(f"file ended at byte {pos}, expected {end}")
        yield chunk
        pos += len(chunk)


def file_md5(path: Path) -> tuple[str, os.stat_result]:
    """MD5 of a whole file and its stat taken before reading (what a record of it must match)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        digest = hashlib.md5()
        for chunk in read_chunks(fd, 0, st.st_size):
            digest.update(chunk)
        return digest.hexdigest(), st
    finally:
        os.close(fd)


def _lock_partial(partial: Path, final: Path, job: FileJob) -> tuple[int | None, bool]:
    """The ``.partial`` of ``final``, opened and locked, and whether it is new (created here and locked at
    once: nothing in it to continue); None if a concurrent run placed the file meanwhile.

    Two runs (releases sharing a key, mirrored at once) must not write one ``.partial`` together:
    the second waits for the lock, then finds the file placed, or continues what the first left.
    The directory is made only when the file cannot be created without it (no mkdir per file).
    """
    while True:
        try:
            fd, new = open_nofollow(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL), True
        except FileExistsError:
            fd, new = open_nofollow(partial, os.O_RDWR | os.O_CREAT), False
        except FileNotFoundError:
            partial.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_EX)
            new = False
        try:
            if os.lstat(partial).st_ino == os.fstat(fd).st_ino:
                return fd, new
        except FileNotFoundError:
            pass
        os.close(fd)  # renamed into place or discarded by the other run while we waited
        if final.is_file() and final.stat().st_size == job.size and file_md5(final)[0] == job.md5:
            return None, False


def _unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class _GroupSync:
    """Durability for many small files at the cost of few syncs: one ``syncfs`` serves every waiting file.

    A file whose bytes are written takes a ticket and waits until a filesystem sync that started
    after its ticket has finished (its bytes are then on disk); the first waiter runs the sync
    for everyone who took a ticket before it started, later arrivals wait for the next one. This
    replaces thousands of per-file fsyncs (each a journal commit) by a few. Without ``syncfs``
    (not Linux) each file is fsynced on its own.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.tickets = 0  # tickets handed out
        self.synced = 0  # every ticket up to this one is durable
        self.running = False
        self.syncs = 0

    def sync(self, fd: int) -> None:
        func = getattr(_libc, "syncfs", None)
        if func is None:
            os.fsync(fd)
            return
        with self.cond:
            self.tickets += 1
            ticket = self.tickets
            while self.synced < ticket:
                if not self.running:
                    break
                self.cond.wait()
            else:
                return
            self.running, covered = True, self.tickets
        ok = False
        try:
            if func(ctypes.c_int(fd)) != 0:
                raise OSError(ctypes.get_errno(), "syncfs failed")
            ok = True
        finally:
            with self.cond:
                self.running = False
                self.syncs += 1
                if ok:
                    self.synced = max(self.synced, covered)
                self.cond.notify_all()


class _PayloadMd5:
    """The MD5 of parts that arrive out of order in memory: each is held until every part before it is
    hashed, then hashed and let go (``let_go``, e.g. its buffer back to the pool). Parts already on disk
    (``on_disk``: a ``.partial`` being continued) are read back from ``fd`` when their turn comes."""

    def __init__(self, let_go: Callable[[memoryview | bytes], None] = lambda payload: None, fd: int = -1,
                 size: int = 0, part_size: int = 0, on_disk: set[int] | None = None) -> None:
        self.digest = hashlib.md5()
        self.let_go = let_go
        self.fd, self.size, self.part_size = fd, size, part_size
        self.on_disk = set(on_disk or ())
        self.next = 0  # the next part to hash
        self.waiting: dict[int, memoryview | bytes] = {}

    def part_done(self, i: int, payload: memoryview | bytes) -> list[int]:
        """Part ``i`` arrived; the parts hashed now from memory (their memory may go)."""
        self.waiting[i] = payload
        return self._catch_up()

    def _catch_up(self) -> list[int]:
        hashed = []
        while True:
            if self.next in self.waiting:
                payload = self.waiting.pop(self.next)
                self.digest.update(payload)
                self.let_go(payload)
                hashed.append(self.next)
            elif self.next in self.on_disk:
                start = self.next * self.part_size
                for chunk in read_chunks(self.fd, start, min(self.size, start + self.part_size)):
                    self.digest.update(chunk)
            else:
                return hashed
            self.next += 1

    def hexdigest(self) -> str:
        self._catch_up()
        if self.size and self.next * self.part_size < self.size:
            raise TransferError(f"hashed {self.next} parts of {self.size} bytes: parts missing")
        return self.digest.hexdigest()


class _PartBuffers:
    """Page-aligned buffers for whole parts (anonymous mmap: what O_DIRECT needs), reused from part to part.

    The caller bounds how many are out at once (``Transfer.buffer_slots``), so the pool stays that small.
    """

    def __init__(self) -> None:
        self.free: list[mmap.mmap] = []
        self.lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        """A view of ``size`` bytes of a buffer; give it back with :meth:`give`."""
        with self.lock:
            while self.free:
                buffer = self.free.pop()
                if len(buffer) >= size:
                    return memoryview(buffer)[:size]
        return memoryview(mmap.mmap(-1, size))[:size]

    def give(self, view: memoryview | bytes) -> None:
        if isinstance(view, memoryview):
            with self.lock:
                self.free.append(view.obj)


def _reopen_direct(fd: int) -> int | None:
    """A second descriptor of the open file ``fd`` with ``O_DIRECT``, reopened through ``/proc`` (the very same
    inode, never a path that may have changed since); None where the system or the filesystem refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        log.debug("O_DIRECT refused (%s): writes go through the page cache", exc)
        return None


class _PartWriter:
    """Writes whole parts of a ``.partial`` from their buffers.

    ``durable``: with ``O_DIRECT`` where the filesystem takes it, the bytes go from the buffer (where
    they are also hashed) to the disk without a copy into the page cache, the kernel's largest cost
    here otherwise; they must reach the disk before the rename anyway. Where it is refused, at open or
    at a write (``EINVAL``: tmpfs on older kernels, some network filesystems), the writes go through
    the page cache, each handed to writeback at once. The unaligned tail of a file (under
    ``DIRECT_ALIGN`` bytes) always does. Not ``durable``: through the page cache, left to the kernel.
    """

    def __init__(self, fd: int, path: Path, durable: bool) -> None:
        self.fd, self.path, self.durable = fd, path, durable
        self.direct = _reopen_direct(fd) if durable else None
        self.use_direct = self.direct is not None

    def write(self, view: memoryview, pos: int) -> None:
        if self.use_direct and pos % DIRECT_ALIGN == 0:
            aligned = len(view) - len(view) % DIRECT_ALIGN
            written = 0
            try:
                while written < aligned:
                    written += os.pwrite(self.direct, view[written:aligned], pos + written)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise LocalWriteError(f"writing {self.path}: {exc.strerror or exc}") from exc
                log.info("%s: O_DIRECT write refused (%s): writing through the page cache", self.path, exc)
                self.use_direct = False
            view, pos = view[written:], pos + written
        if view:
            _pwrite(self.fd, view, pos, self.path)
            if self.durable:
                start_writeback(self.fd, pos, len(view))

    def close(self) -> None:
        if self.direct is not None:
            os.close(self.direct)


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
        self.http = _HttpSource.for_client(client, bucket)  # unsigned GETs without botocore
        self.retry = RetryPolicy.for_client(client, retry_seconds)  # when a failing GET is given up
        self.local = threading.local()  # each thread's read buffer
        self.group_sync = _GroupSync()  # small files: one syncfs for all files waiting, before their renames
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="mirror-part")
        self.stopped = threading.Event()  # set on interrupt: transfers stop at the next chunk
        # Parts are held in memory until hashed (and uploaded, for S3 targets): at most this many at once.
        self.buffer_slots = threading.Semaphore(max(2, min(workers + 2, PART_MEMORY // part_size)))
        self.buffers = _PartBuffers()

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
            except _HandOver as exc:
                source.enabled = False
                log.warning("GET %s: %s; botocore makes the GETs from now on (it follows redirects)", key, exc)
                start = exc.pos
        return self._read_range_botocore(key, start, end, expected_total, write, into, origin)

    def _read_range_botocore(self, key: str, pos: int, end: int, expected_total: int,
                             write: Callable[[int, memoryview | bytes], None] | None, into: memoryview | None,
                             origin: int) -> str:
        """:meth:`read_range` through botocore, from ``pos``: botocore has retried a GET that raises, as the
        client's config says, so only a body that breaks off is retried here (resumed)."""
        failures = _Failures(key, self.retry)
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
                total = _content_total(response)
                if total is not None and total != expected_total:
                    raise TransferError(f"source object is {total} bytes, the manifest says {expected_total}")
                while pos < end:
                    chunk = body.read(min(READ_CHUNK, end - pos))
                    if self.stopped.is_set():
                        raise TransferError("interrupted")
                    if not chunk:
                        raise _ShortRead(f"connection ended at byte {pos} of range ending at {end}")
                    if self.limiter:
                        self.limiter.acquire(len(chunk))
                    if into is not None:
                        into[pos - origin:pos - origin + len(chunk)] = chunk
                    if write is not None:
                        write(pos, chunk)
                    pos += len(chunk)
                    self.on_bytes(len(chunk))
                return response.get("ETag", "").strip('"')
            except (BotoCoreError, OSError, _ShortRead) as exc:
                failures.failed(exc, pos)
            finally:
                body.close()

    def _buffer(self) -> memoryview:
        view = getattr(self.local, "buffer", None)
        if view is None:
            view = self.local.buffer = memoryview(bytearray(READ_CHUNK))
        return view

    def _read_range_http(self, source: _HttpSource, key: str, start: int, end: int, expected_total: int,
                         write: Callable[[int, memoryview], None] | None, into: memoryview | None) -> str:
        """:meth:`read_range` over :class:`_HttpSource`: the socket reads into ``into``, or into one reused
        buffer per thread."""
        pos = start
        failures = _Failures(key, self.retry)
        buffer = self._buffer() if into is None else None
        while True:
            try:
                response = source.get(key, pos, end)
                total = _content_total({"ContentRange": response.getheader("Content-Range")})
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
                        raise _ShortRead(f"connection ended at byte {pos} of range ending at {end}")
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
            except _HandOver as exc:
                source.drop()
                exc.pos = pos
                raise
            except _HttpError as exc:
                source.drop()
                if not exc.retryable:
                    raise TransferError(f"GET failed: {exc.code or exc} (HTTP {exc.status}) for {key}") from exc
                failures.failed(exc, pos)
            except ssl.SSLCertVerificationError as exc:
                source.drop()
                raise TransferError(f"GET failed: the TLS certificate of {source.origin} is not trusted ({exc}; "
                                    f"CA bundle: {get_cert_path(source.verify)}) for {key}") from exc
            except (OSError, http.client.HTTPException, _ShortRead) as exc:
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
                   hasher: _PayloadMd5, persist: Callable[[set[int]], None] | None,
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
        fd, new = _lock_partial(partial, final, job)
        if fd is None:
            return ""
        try:
            part_size = self.part_size_for(job.size, 0)
            # A .partial left by an earlier run is continued with the part size it was started with.
            sidecar = (_Sidecar(sidecar_path, job.size, job.md5, part_size, None, set()) if new
                       else _Sidecar.load(sidecar_path, partial, job, part_size))
            if job.size <= sidecar.part_size and not sidecar.done:
                return self._download_whole(job, fd, final, partial, None if new else sidecar_path)
            if not sidecar.done:
                os.ftruncate(fd, job.size)
            writer = _PartWriter(fd, partial, self.durable)
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
            _unlink(sidecar_path)
        finally:
            os.close(fd)  # releases the lock, after the rename
        return next(iter(known), "")

    def _download_parts(self, job: FileJob, fd: int, sidecar: _Sidecar, writer: _PartWriter) -> tuple[str, set[str]]:
        """The parts not yet on disk, each fetched into a buffer of its own, written from it and hashed from
        it in order (the parts a continued ``.partial`` holds are read back when their turn comes)."""
        hasher = _PayloadMd5(self.buffers.give, fd, job.size, sidecar.part_size, sidecar.done)

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
            _unlink(sidecar)
            os.ftruncate(fd, 0)
        digest = hashlib.md5()

        def write(pos: int, chunk: bytes) -> None:
            _pwrite(fd, chunk, pos, partial)
            digest.update(chunk)

        etag = self.read_range(job.key, 0, job.size, job.size, write) if job.size else self._head_etag(job)
        if digest.hexdigest() != job.md5:
            raise self._discard(f"MD5 {digest.hexdigest()} of the fetched bytes differs from the manifest's "
                                f"{job.md5}", partial)
        return etag

    def download_small(self, jobs: list[tuple[FileJob, Path]]) -> list[str | Exception]:
        """:meth:`download` of each of many small files, one after another, with one sync for them all.

        Each file is fetched whole into a new ``.partial`` (locked) and verified; then one filesystem
        sync makes them all durable (when ``durable``) before any is renamed into place. Thousands of
        small files thus cost a few syncs, not one each. Per file, in order: its ETag, or the error that
        stopped it. A file with a ``.partial`` to continue, or too large for one GET, goes through
        :meth:`download` on its own.
        """
        results: list[str | Exception] = []
        held: list[tuple[int, int, Path, Path]] = []  # verified, not yet renamed: (index, fd, .partial, final)
        try:
            for job, final in jobs:
                try:
                    results.append(self._fetch_small(job, final, len(results), held))
                except Exception as exc:  # that file's outcome, whatever it is: the others go on
                    results.append(exc)
            try:
                if held and self.durable:
                    self.group_sync.sync(held[0][1])
            except OSError as exc:
                for index, _, _, _ in held:
                    results[index] = exc
                return results
            for index, _, partial, final in held:
                try:
                    os.replace(partial, final)
                except OSError as exc:
                    results[index] = exc
        finally:
            for _, fd, _, _ in held:
                os.close(fd)  # releases the locks, after the renames
        return results

    def _fetch_small(self, job: FileJob, final: Path, index: int, held: list[tuple[int, int, Path, Path]]) -> str:
        """One file of :meth:`download_small`: fetched, verified and added to ``held`` (its lock kept)."""
        if job.size > self.part_size_for(job.size, 0):
            return self.download(job, final)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        fd, new = _lock_partial(partial, final, job)
        if fd is None:
            return ""
        if not new:
            os.close(fd)
            return self.download(job, final)
        try:
            etag = self._fetch_whole(job, fd, partial, None)
        except BaseException:
            os.close(fd)
            raise
        held.append((index, fd, partial, final))
        return etag

    @staticmethod
    def _discard(reason: str, *paths: Path) -> TransferError:
        """Bad bytes never stay: remove them, and say a fresh attempt may succeed."""
        _unlink(*paths)
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

            md5, etags = self._run_parts(job, part_size, set(), fetch_part, _PayloadMd5(), None, self.buffer_slots)
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
        _unlink(partial)
        raise TransferError(f"local copy source {source} no longer matches MD5 {job.md5}", retry_file=True)
    os.replace(partial, final)
