"""Unsigned ranged GETs over plain ``http.client`` connections, as botocore would make them (its URL,
certificate checks, proxy and timeouts), the response read off the socket into the caller's buffer."""

from __future__ import annotations

import http.client
import io
import logging
import re
import socket
import ssl
import threading
from urllib.parse import quote, urlsplit

from botocore import UNSIGNED
from botocore.awsrequest import AWSPreparedRequest
from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError
from botocore.httpsession import URLLib3Session, get_cert_path, mask_proxy_url

from etl.transfer.common import HttpError

log = logging.getLogger(__name__)

MAX_HEADER_LINE = 65536  # http.client's limits on a response's header lines
MAX_HEADERS = 100
REDIRECT_STATUSES = {301, 302, 307, 308}


class HandOver(Exception):
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


class Head:
    """A response's status line and headers: what the GET path needs of them, and no more.

    http.client parses each response's headers into an ``email`` message, which costs more CPU than a
    small object's bytes.
    """

    def __init__(self, status_line: bytes, header_lines: list[bytes]) -> None:
        version, _, rest = status_line.partition(b" ")
        if not version.startswith(b"HTTP/") or not rest[:3].isdigit() or len(status_line) > MAX_HEADER_LINE:
            raise http.client.BadStatusLine(repr(status_line[:100]))
        if len(header_lines) > MAX_HEADERS:
            raise http.client.HTTPException(f"more than {MAX_HEADERS} headers")
        self.status = int(rest[:3])
        self.headers: dict[str, str] = {}
        for line in header_lines:
            if len(line) > MAX_HEADER_LINE:
                raise http.client.LineTooLong("header line")
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length", "")
        self.length = int(length) if length.isdigit() and not self.chunked else None
        self.reusable = version != b"HTTP/1.0" and self.headers.get("connection", "").lower() != "close"

    @classmethod
    def parse(cls, block: bytes) -> Head:
        """The head from its bytes, up to (not including) the blank line that ends it."""
        status_line, *header_lines = block.split(b"\r\n")
        return cls(status_line, header_lines)

    @property
    def interim(self) -> bool:
        """An informational answer (1xx): the real one follows it."""
        return 100 <= self.status < 200

    def getheader(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class _Response(Head):
    """A GET's response, read off the connection by hand: the :class:`Head`, then a body of known length.

    Informational (1xx) answers are skipped; a body without ``Content-Length`` is read to its end only
    for errors (chunked, or up to the connection's close), as :meth:`error_body`.
    """

    def __init__(self, reader: io.BufferedReader) -> None:
        self.reader = reader
        while True:
            status_line = reader.readline(MAX_HEADER_LINE + 1)
            if not status_line:
                raise http.client.RemoteDisconnected("the connection closed without a response")
            header_lines = []
            while (line := reader.readline(MAX_HEADER_LINE + 1)) not in (b"\r\n", b"\n", b""):
                header_lines.append(line.rstrip(b"\r\n"))
                if len(header_lines) > MAX_HEADERS:
                    break
            super().__init__(status_line.rstrip(b"\r\n"), header_lines)
            if not self.interim:
                break

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


class HttpSource:
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
    def for_client(cls, client: BaseClient, bucket: str) -> HttpSource | None:
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

    def new_connection(self) -> http.client.HTTPConnection:
        """A connection to the source (through the proxy, if any), not yet connected; :meth:`close` closes it."""
        host, port = (self.proxy.hostname, self.proxy.port or 80) if self.proxy else (self.host, self.port)
        if self.https:
            conn = _HttpsConnection(host, port, timeout=self.connect_timeout, context=self.context)
            if self.proxy:
                conn.set_tunnel(self.host, self.port, headers=self.proxy_headers)
        else:
            conn = _HttpConnection(host, port, timeout=self.connect_timeout)
        conn.read_timeout, conn.keepalive = self.read_timeout, self.keepalive
        with self.lock:
            self.connections.append(conn)
        return conn

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = self.new_connection()
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

        Raises :class:`HttpError` for an error status, :class:`HandOver` for a redirect or a body of
        unknown length.
        """
        conn = self._connection()
        if conn.sock is None:
            conn.connect()
        conn.sock.sendall(self.request(key, start, end))
        response = _Response(conn.reader)
        if response.status in REDIRECT_STATUSES:
            region = response.getheader("x-amz-bucket-region")
            raise HandOver(f"HTTP {response.status} from {self.origin}"
                            + (f" (the bucket is in {region})" if region else ""))
        if response.status not in (200, 206):
            found = re.search(rb"<Code>([^<]*)</Code>", response.error_body(64 << 10))
            raise HttpError(response.status, found.group(1).decode(errors="replace") if found else "")
        if response.length is None:
            raise HandOver(f"HTTP {response.status} from {self.origin} without a Content-Length")
        if not served_as_asked(response, start, end):
            served = response.getheader("Content-Range") or "no Content-Range"
            raise HttpError(response.status, f"RangeIgnored ({served})")
        return response

    def request(self, key: str, start: int, end: int) -> bytes:
        """The GET of bytes [start, end) of ``key``, as sent on a connection from :meth:`new_connection`."""
        url = self.url(key)
        return (f"GET {url if self.forwarded else url[len(self.origin):]} HTTP/1.1\r\n"
                f"Range: bytes={start}-{end - 1}\r\n{self.request_headers}\r\n").encode()


def served_as_asked(head: Head, start: int, end: int) -> bool:
    """Whether a 200/206 answer of known length holds bytes [start, end) as asked: the range, or the whole
    object from 0. An object shorter than the range is answered cut: the caller names both sizes."""
    content_range = head.getheader("Content-Range")
    if content_range is None:  # the whole object: fine only if that is what was asked for
        return start == 0 and head.length <= end
    served, _, total = content_range.removeprefix("bytes ").partition("/")
    return served == f"{start}-{end - 1}" or (total.isdigit() and int(total) < end)
