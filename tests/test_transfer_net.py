"""The transfer path on the network as users meet it: HTTPS with a CA of their own, HTTP proxies,
addressing styles and regions, throttling and errors; the plain-HTTP GETs must behave as botocore's.

A CA and a server certificate are made here; ``rclone serve s3 --cert --key`` serves a small bucket over
TLS; a CONNECT proxy and a scripted S3 server run on loopback in threads.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config

from etl import source
from etl.config import Settings
from etl.fixtures import OLD_RELEASE
from etl.mirror import mirror_release
from etl.s3server import LoopbackPki, S3Server, make_loopback_pki, start_s3_server
from etl.transfer import FileJob, Transfer, TransferError, botocore_get_url
from etl.transfer.common import Failures
from etl.transfer.http_source import HttpSource

from .conftest import scoped_keys

MiB = 1 << 20
BUCKET = "bucket"
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
                   "ALL_PROXY", "all_proxy")
CA_VARIABLES = ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE")


# -- a CA, a server certificate, a bucket served over TLS ------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LoopbackPki:
    """A CA made for this test and a certificate it signed for 127.0.0.1 and localhost."""
    return make_loopback_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def objects() -> dict[str, bytes]:
    """A few objects in bucket ``bucket``: one of several parts, a small one, an empty one, odd key characters."""
    return {
        "data/multi part+1.bin": hashlib.shake_256(b"multi").digest(3 * MiB + 777),
        "data/small~x.csv": hashlib.shake_256(b"small").digest(10_000),
        "data/empty.txt": b"",
    }


@pytest.fixture(scope="module")
def served_root(tmp_path_factory: pytest.TempPathFactory, objects: dict[str, bytes]) -> Path:
    root = tmp_path_factory.mktemp("served")
    for key, body in objects.items():
        (root / BUCKET / key).parent.mkdir(parents=True, exist_ok=True)
        (root / BUCKET / key).write_bytes(body)
    return root


@pytest.fixture(scope="module")
def tls_server(served_root: Path, pki: LoopbackPki) -> Iterator[S3Server]:
    server = start_s3_server(served_root, tls=(pki.chain, pki.key))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_server(served_root: Path) -> Iterator[S3Server]:
    server = start_s3_server(served_root)
    yield server
    server.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy and no CA bundle from the machine's environment: each test sets its own."""
    for name in PROXY_VARIABLES + CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _download_all(transfer: Transfer, objects: dict[str, bytes], into: Path) -> None:
    """Fetch every object through ``transfer``, one at a time, then all at once as small files are (over plain-HTTP
    GETs, by the selector loop), and check their bytes (the transfer checks each MD5 itself)."""
    jobs = {key: FileJob(key, len(body), hashlib.md5(body).hexdigest()) for key, body in objects.items()}
    for key, body in objects.items():
        transfer.download(jobs[key], into / key)
        assert (into / key).read_bytes() == body, key
    results = transfer.download_small([(jobs[key], into / "together" / key) for key in objects])
    assert not [r for r in results if not isinstance(r, str)]
    for key, body in objects.items():
        assert (into / "together" / key).read_bytes() == body, key


# -- HTTPS -------------------------------------------------------------------------------------

def test_https_with_the_ca_bundle(tls_server, pki, objects, clean_env, tmp_path):
    """AWS_CA_BUNDLE names the test CA: botocore and the plain-HTTP path both trust the server."""
    clean_env.setenv("AWS_CA_BUNDLE", str(pki.ca))
    client = source.make_client(Settings(endpoint_url=tls_server.endpoint_url))
    transfer = Transfer(client, BUCKET, workers=3, part_size=MiB)
    try:
        assert transfer.http is not None and transfer.http.https and transfer.http.verify == str(pki.ca)
        _download_all(transfer, objects, tmp_path)
        assert transfer.http.connections  # the bytes came over the plain-HTTP path
    finally:
        transfer.close()


def test_mirror_release_over_https(generated_bucket, database_url, engine, pki, clean_env, tmp_path):
    """A whole mirror run (manifest, listing, transfers) against an HTTPS endpoint with its own CA; the files
    come over the plain-HTTP path."""
    clean_env.setenv("AWS_CA_BUNDLE", str(pki.ca))
    fast_gets: list[str] = []
    request = HttpSource.request

    def counted(self, key: str, start: int, end: int) -> bytes:
        fast_gets.append(key)
        return request(self, key, start, end)

    clean_env.setattr(HttpSource, "request", counted)
    server = start_s3_server(generated_bucket.root, tls=(pki.chain, pki.key))
    try:
        settings = Settings(database_url=database_url, endpoint_url=server.endpoint_url,
                            mirror_root=str(tmp_path / "mirror"), workers=4)
        report = mirror_release(settings, engine, OLD_RELEASE, kinds=["metadata"], part_size=MiB, progress=False)
    finally:
        server.stop()
    assert report.failed == {} and report.fetched > 0
    keys = [k for k in scoped_keys(generated_bucket, OLD_RELEASE) if k.startswith("metadata/")]
    assert len(keys) == report.fetched
    assert set(fast_gets) == {k for k in keys if (tmp_path / "mirror" / k).stat().st_size}  # empty ones: HEAD
    for key in keys:
        assert (tmp_path / "mirror" / key).read_bytes() == (generated_bucket.bucket_dir / key).read_bytes(), key


def test_https_without_the_ca_fails_naming_the_certificate(tls_server, pki, objects, clean_env, tmp_path):
    """Without the CA (botocore's default bundle) the GET fails at once, saying the certificate is not trusted;
    ``verify=False`` on the client turns checking off for the plain-HTTP path as for botocore."""
    client = source.make_client(Settings(endpoint_url=tls_server.endpoint_url))
    key, body = "data/small~x.csv", objects["data/small~x.csv"]
    job = FileJob(key, len(body), hashlib.md5(body).hexdigest())
    transfer = Transfer(client, BUCKET, workers=1)
    try:
        with pytest.raises(TransferError, match="certificate verify failed") as failed:
            transfer.download(job, tmp_path / "untrusted" / key)
        assert "not trusted" in str(failed.value) and key in str(failed.value)
    finally:
        transfer.close()
    assert not (tmp_path / "untrusted" / key).exists()

    unchecked = boto3.client("s3", region_name="us-west-2", endpoint_url=tls_server.endpoint_url, verify=False,
                             config=Config(signature_version=UNSIGNED))
    transfer = Transfer(unchecked, BUCKET, workers=1)
    try:
        assert transfer.http is not None
        transfer.download(job, tmp_path / "unchecked" / key)
        assert (tmp_path / "unchecked" / key).read_bytes() == body
    finally:
        transfer.close()


def test_signed_client_over_https_uses_botocore(tls_server, pki, objects, clean_env, tmp_path):
    """Signed requests keep botocore for every GET; it trusts the same AWS_CA_BUNDLE."""
    clean_env.setenv("AWS_CA_BUNDLE", str(pki.ca))
    client = source.make_client(Settings(endpoint_url=tls_server.endpoint_url, unsigned=False,
                                         aws_access_key_id="test", aws_secret_access_key="test"))
    transfer = Transfer(client, BUCKET, workers=2, part_size=MiB)
    try:
        assert transfer.http is None
        _download_all(transfer, objects, tmp_path)
    finally:
        transfer.close()


# -- proxies -----------------------------------------------------------------------------------

class LoopbackProxy:
    """An HTTP proxy on 127.0.0.1: CONNECT tunnels and forwarded plain-HTTP requests, relayed byte for byte.

    ``seen`` holds the first request line of each connection: (method, target).
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen: list[tuple[str, str]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            head += chunk
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        self.seen.append((method, target))
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection((host, int(port)))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:  # forwarded as is: the server accepts the absolute URL as request target
            url = urlsplit(target)
            upstream = socket.create_connection((url.hostname, url.port or 80))
            upstream.sendall(head)
        threading.Thread(target=self._relay, args=(upstream, conn), daemon=True).start()
        self._relay(conn, upstream)

    @staticmethod
    def _relay(source_sock: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source_sock.recv(65536):
                target.sendall(chunk)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            source_sock.close()
            target.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy() -> Iterator[LoopbackProxy]:
    running = LoopbackProxy()
    yield running
    running.close()


def test_https_through_a_connect_proxy(tls_server, pki, objects, proxy, clean_env, tmp_path):
    """HTTPS_PROXY: the plain-HTTP path tunnels through the proxy as botocore does, certificate still checked."""
    clean_env.setenv("AWS_CA_BUNDLE", str(pki.ca))
    clean_env.setenv("HTTPS_PROXY", proxy.url)
    client = source.make_client(Settings(endpoint_url=tls_server.endpoint_url))
    transfer = Transfer(client, BUCKET, workers=3, part_size=MiB)
    try:
        _download_all(transfer, objects, tmp_path)
        assert transfer.http is not None and transfer.http.proxy is not None
        tunnels = [target for method, target in proxy.seen if method == "CONNECT"]
        assert tunnels and set(tunnels) == {f"127.0.0.1:{tls_server.port}"}
        assert len(tunnels) == len(proxy.seen) >= len(transfer.http.connections) > 0
    finally:
        transfer.close()


def test_no_proxy_excludes_the_host(tls_server, pki, objects, proxy, clean_env, tmp_path):
    clean_env.setenv("AWS_CA_BUNDLE", str(pki.ca))
    clean_env.setenv("HTTPS_PROXY", proxy.url)
    clean_env.setenv("NO_PROXY", "127.0.0.1")
    client = source.make_client(Settings(endpoint_url=tls_server.endpoint_url))
    transfer = Transfer(client, BUCKET, workers=3, part_size=MiB)
    try:
        _download_all(transfer, objects, tmp_path)
        assert transfer.http is not None and transfer.http.proxy is None and transfer.http.connections
    finally:
        transfer.close()
    assert proxy.seen == []


def test_plain_http_through_a_forwarding_proxy(plain_server, objects, proxy, clean_env, tmp_path):
    """HTTP_PROXY with an http:// endpoint: requests name the absolute URL, as botocore's do."""
    clean_env.setenv("HTTP_PROXY", proxy.url)
    client = source.make_client(Settings(endpoint_url=plain_server.endpoint_url))
    transfer = Transfer(client, BUCKET, workers=2, part_size=MiB)
    try:
        _download_all(transfer, objects, tmp_path)
        assert transfer.http is not None and transfer.http.forwarded
    finally:
        transfer.close()
    targets = {target for method, target in proxy.seen if method == "GET"}
    assert f"{plain_server.endpoint_url}/{BUCKET}/data/multi%20part%2B1.bin" in targets


def test_proxy_from_the_client_config(tls_server, pki, objects, proxy, clean_env, tmp_path):
    """``Config(proxies=...)`` (botocore's own setting, e.g. from the Airflow connection) is honoured too."""
    clean_env.setenv("AWS_CA_BUNDLE", str(pki.ca))
    client = source.make_client(Settings(endpoint_url=tls_server.endpoint_url,
                                         source_config={"proxies": {"https": proxy.url}}))
    transfer = Transfer(client, BUCKET, workers=1)
    try:
        _download_all(transfer, {"data/small~x.csv": objects["data/small~x.csv"]}, tmp_path)
        connections = len(transfer.http.connections)  # the blocking path's, the selector loop's
    finally:
        transfer.close()
    assert proxy.seen == [("CONNECT", f"127.0.0.1:{tls_server.port}")] * connections and connections == 2


@pytest.mark.parametrize("config", [
    {"client_cert": "/nonexistent/client.pem"},
    {"proxies": {"https": "https://127.0.0.1:9"}},
    {"proxies": {"https": "http://127.0.0.1:9"}, "proxies_config": {"proxy_use_forwarding_for_https": True}},
], ids=["client certificate", "proxy over TLS", "proxies_config"])
def test_transport_settings_not_reproduced_fall_back_to_botocore(config, clean_env):
    """The rule: a transport setting the plain-HTTP path does not reproduce means botocore makes every GET."""
    for settings, fast in ((Settings(endpoint_url="https://127.0.0.1:9", source_config=config), False),
                           (Settings(endpoint_url="https://127.0.0.1:9"), True)):
        transfer = Transfer(source.make_client(settings), BUCKET, workers=1)
        assert (transfer.http is not None) == fast
        transfer.close()


# -- addressing and regions --------------------------------------------------------------------

def _botocore_request_url(client, bucket: str, key: str) -> str:
    """The URL botocore sends a GetObject to, caught by an event handler of this test (nothing is sent)."""
    class Caught(Exception):
        pass

    urls = []

    def catch(request, **kwargs):
        urls.append(request.url)
        raise Caught

    client.meta.events.register("before-send.s3.GetObject", catch)
    with pytest.raises(Caught):
        client.get_object(Bucket=bucket, Key=key)
    client.meta.events.unregister("before-send.s3.GetObject", catch)
    return urls[0]


@pytest.mark.parametrize("region,s3,extra", [
    ("us-west-2", {}, {}),
    ("us-west-2", {"addressing_style": "path"}, {}),
    ("us-east-1", {}, {}),
    ("eu-central-1", {"addressing_style": "virtual"}, {}),
    ("us-west-2", {}, {"use_dualstack_endpoint": True}),
    ("us-west-2", {"use_accelerate_endpoint": True}, {}),
])
@pytest.mark.parametrize("bucket", ["allen-brain-cell-atlas", "dotted.bucket.name"])
def test_urls_are_botocores_for_each_region_and_addressing_style(region, s3, extra, bucket, clean_env):
    """Endpoint, region, addressing style and key quoting: the URL of each key is the one botocore requests."""
    if s3.get("use_accelerate_endpoint") and "." in bucket:
        pytest.skip("S3 accelerate refuses dotted bucket names")
    client = boto3.client("s3", region_name=region,
                          config=Config(signature_version=UNSIGNED, s3=s3 or None, **extra))
    transfer = Transfer(client, bucket, workers=1)
    assert transfer.http is not None
    for key in ("a/b.h5ad", "dir with space/x+y~z=1&2.csv", "ü/ñ%.txt"):
        assert transfer.http.url(key) == _botocore_request_url(client, bucket, key), key
    if not s3 and not extra and region == "us-west-2" and bucket == "allen-brain-cell-atlas":
        # The region's endpoint, as botocore uses it (a presigned URL would name the global one).
        assert transfer.http.url("k") == "https://allen-brain-cell-atlas.s3.us-west-2.amazonaws.com/k"
        assert "s3.amazonaws.com" in client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})


def test_botocore_get_url_leaves_other_requests_alone(plain_server, objects, clean_env):
    """The probe that reads botocore's URL stops only its own request and unhooks itself afterwards."""
    client = source.make_client(Settings(endpoint_url=plain_server.endpoint_url))
    assert botocore_get_url(client, BUCKET, "probe-key") == f"{plain_server.endpoint_url}/{BUCKET}/probe-key"
    assert client.get_object(Bucket=BUCKET, Key="data/small~x.csv")["Body"].read() == objects["data/small~x.csv"]


class ScriptedS3(http.server.BaseHTTPRequestHandler):
    """S3 GETs of ``objects`` by path-style or virtual-hosted URL (host ``<bucket>.s3.test``), with ranges.

    Each request is recorded in ``seen`` as (Host, path, User-Agent); while ``script`` holds answers,
    each request gets the next one instead: an error status and S3 code, ``cut`` (half the body,
    then the connection drops) or ``redirect`` for the plain-HTTP path's requests (301, as S3 answers
    for a bucket in another region; botocore's requests are served); ``chunked`` (403 AccessDenied,
    its body in chunks), ``interim`` (a 100 Continue first), ``close`` (the answer, then the connection
    closes), ``no-length`` (the body delimited by the connection's close, for the plain-HTTP path).
    """

    protocol_version = "HTTP/1.1"
    objects: dict[tuple[str, str], bytes] = {}
    script: list[tuple[int, str] | str] = []
    seen: list[tuple[str, str, str]] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        self._send(status, f"<Error><Code>{code}</Code></Error>".encode(), {"Content-Type": "application/xml"})

    def do_GET(self) -> None:
        host = self.headers.get("Host", "").rpartition(":")[0]
        self.seen.append((self.headers.get("Host", ""), self.path, self.headers.get("User-Agent", "")))
        path = urlsplit(self.path).path
        if host.endswith(".s3.test"):
            bucket, key = host.removesuffix(".s3.test"), path[1:]
        else:
            bucket, _, key = path[1:].partition("/")
        data = self.objects.get((bucket, unquote(key)))
        answer = self.script.pop(0) if self.script else None
        if answer == "redirect" and self.headers.get("User-Agent") == "abc-mirror":
            self._send(301, b"", {"x-amz-bucket-region": "eu-west-1"})
            return
        if answer == "chunked":
            self.send_response(403)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in (b"<Error><Code>Access", b"Denied</Code></Error>", b""):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            return
        if answer == "interim":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if isinstance(answer, tuple):
            self._error(*answer)
            return
        if data is None:
            self._error(404, "NoSuchKey")
            return
        first, _, last = self.headers.get("Range", f"bytes=0-{len(data) - 1}").removeprefix("bytes=").partition("-")
        body = data[int(first):int(last) + 1]
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}", "ETag": '"scripted"'}
        if answer == "close":
            headers["Connection"] = "close"
            self.close_connection = True
        if answer == "no-length" and self.headers.get("User-Agent") == "abc-mirror":
            self.send_response(206)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        if answer == "cut":
            self.send_response(206)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(206, body, headers)


@dataclass
class Scripted:
    port: int
    handler: type[ScriptedS3]
    data: bytes

    def client(self, host: str = "127.0.0.1", **settings: object) -> object:
        return source.make_client(Settings(endpoint_url=f"http://{host}:{self.port}", **settings))

    def gets(self) -> list[tuple[str, str, str]]:
        return list(self.handler.seen)


@pytest.fixture
def scripted(clean_env: pytest.MonkeyPatch) -> Iterator[Scripted]:
    """A scripted S3 server holding ``bucket/blob`` (3 MiB + 777 bytes), names ``*.s3.test`` resolving to it."""
    data = hashlib.shake_256(b"scripted").digest(3 * MiB + 777)
    handler = type("Handler", (ScriptedS3,), {"objects": {(BUCKET, "blob"): data, (BUCKET, "a b+c~d.bin"): data},
                                              "script": [], "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    getaddrinfo = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        return getaddrinfo("127.0.0.1" if str(host).endswith("s3.test") else host, *args, **kwargs)

    clean_env.setattr(socket, "getaddrinfo", resolve)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Scripted(server.server_address[1], handler, data)
    server.shutdown()
    server.server_close()


def _job(data: bytes, key: str = "blob") -> FileJob:
    return FileJob(key, len(data), hashlib.md5(data).hexdigest())


@pytest.mark.parametrize("addressing", ["path", "virtual", "auto"])
def test_addressing_style_is_botocores(scripted, addressing, tmp_path):
    """The server sees the same Host and path from the plain-HTTP path as from botocore, for the same config."""
    client = scripted.client("s3.test", source_config={"s3": {"addressing_style": addressing}})
    key = "a b+c~d.bin"
    client.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-9")["Body"].read()
    by_botocore = scripted.gets()
    transfer = Transfer(client, BUCKET, workers=1)
    try:
        assert transfer.http is not None
        assert transfer.read_range(key, 0, 10, len(scripted.data), lambda pos, chunk: None) == "scripted"
    finally:
        transfer.close()
    by_fast_path = scripted.gets()[len(by_botocore):]
    assert [(h, p) for h, p, _ in by_fast_path] == [(h, p) for h, p, _ in by_botocore]
    host, path, _ = by_fast_path[0]
    expected = ((f"{BUCKET}.s3.test:{scripted.port}", "/a%20b%2Bc~d.bin") if addressing == "virtual"
                else (f"s3.test:{scripted.port}", f"/{BUCKET}/a%20b%2Bc~d.bin"))
    if addressing != "auto":
        assert (host, path) == expected
    assert by_fast_path[0][2] == "abc-mirror"  # and it was the plain-HTTP path that sent it


# -- retries -----------------------------------------------------------------------------------

@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("etl.transfer.common.backoff_delay", lambda attempt: 0.0)


RETRIES = {"retries": {"total_max_attempts": 4, "mode": "standard"}}
SIGNED = {"unsigned": False, "aws_access_key_id": "test", "aws_secret_access_key": "test"}


def test_throttling_is_retried_then_succeeds(scripted, no_backoff, tmp_path):
    scripted.handler.script[:] = [(503, "SlowDown"), (503, "SlowDown"), "cut"]
    transfer = Transfer(scripted.client(source_config=RETRIES), BUCKET, workers=1, part_size=4 * MiB)
    try:
        transfer.download(_job(scripted.data), tmp_path / "blob")
    finally:
        transfer.close()
    assert (tmp_path / "blob").read_bytes() == scripted.data
    assert len(scripted.gets()) == 4 and scripted.handler.script == []


@pytest.mark.parametrize("signed", [False, True], ids=["plain-HTTP path", "botocore path"])
def test_a_failing_get_gives_up_after_the_clients_attempts(scripted, signed, no_backoff, tmp_path):
    """Always 500: exactly the client's attempts (4), not botocore's times ours; the error names key and reason."""
    scripted.handler.script[:] = [(500, "InternalError")] * 50
    client = scripted.client(source_config=RETRIES, **(SIGNED if signed else {}))
    transfer = Transfer(client, BUCKET, workers=1)
    try:
        assert (transfer.http is None) == signed
        with pytest.raises(TransferError, match="InternalError") as failed:
            transfer.download(_job(scripted.data), tmp_path / "blob")
    finally:
        transfer.close()
    assert "blob" in str(failed.value) and "500" in str(failed.value)
    assert len(scripted.gets()) == 4
    assert not failed.value.retry_file  # the mirror does not try the whole file again either


def test_giving_up_is_bounded_in_time(scripted, monkeypatch, tmp_path):
    """Attempts to spare (1000), a failing GET stops once ABC_TRANSFER_RETRY_SECONDS pass without progress;
    a GET that fails but makes progress each time keeps going. A fake clock: sleeping only advances it."""
    clock = types.SimpleNamespace(now=0.0, slept=[])

    def sleep(seconds: float) -> None:
        clock.slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr("etl.transfer.common.time", types.SimpleNamespace(monotonic=lambda: clock.now, sleep=sleep))
    client = scripted.client(source_config={"retries": {"total_max_attempts": 1000, "mode": "standard"}})
    transfer = Transfer(client, BUCKET, workers=1, retry_seconds=30)
    try:
        scripted.handler.script[:] = [(500, "InternalError")] * 1000
        with pytest.raises(TransferError, match=r"gave up on blob after (\d+) attempts") as failed:
            transfer.read_range("blob", 0, 100, len(scripted.data), lambda pos, chunk: None)
        attempts = len(scripted.gets())
        assert 1 < attempts < 1000 and f"after {attempts} attempts" in str(failed.value)
        assert "HTTP 500 InternalError" in str(failed.value) and sum(clock.slept) <= 30

        # Each attempt gets further than the last: its failures do not add up to the bound.
        scripted.handler.script[:] = ["cut"] * 9
        clock.slept.clear()
        received = bytearray()
        transfer.read_range("blob", 0, len(scripted.data), len(scripted.data),
                            lambda pos, chunk: received.extend(chunk))
        assert bytes(received) == scripted.data and scripted.handler.script == []
    finally:
        transfer.close()


@pytest.mark.parametrize("status,code", [(404, "NoSuchKey"), (403, "AccessDenied")])
@pytest.mark.parametrize("signed", [False, True], ids=["plain-HTTP path", "botocore path"])
def test_client_errors_are_not_retried(scripted, status, code, signed, tmp_path):
    scripted.handler.script[:] = [(status, code)] * 5
    client = scripted.client(**(SIGNED if signed else {}))
    transfer = Transfer(client, BUCKET, workers=1)
    try:
        with pytest.raises(TransferError, match=f"GET failed: {code} \\(HTTP {status}\\) for blob"):
            transfer.download(_job(scripted.data), tmp_path / "blob")
    finally:
        transfer.close()
    assert len(scripted.gets()) == 1


def test_responses_are_read_as_http_client_reads_them(scripted, no_backoff, monkeypatch, tmp_path):
    """The plain-HTTP path reads responses itself: an interim 100 Continue, a server closing the connection
    after its answer (the next GET opens another, not failing first), an error (503 SlowDown: retried on
    another connection)."""
    failures: list[str] = []
    failed = Failures.failed
    monkeypatch.setattr(Failures, "failed", lambda self, exc, pos: (failures.append(str(exc)), failed(self, exc, pos)))
    scripted.handler.script[:] = [(503, "SlowDown"), "interim", "close", "interim"]
    transfer = Transfer(scripted.client(source_config=RETRIES), BUCKET, workers=1, part_size=MiB)
    try:
        transfer.download(_job(scripted.data), tmp_path / "blob")
        assert transfer.http is not None and transfer.http.enabled and len(transfer.http.connections) == 3
    finally:
        transfer.close()
    assert (tmp_path / "blob").read_bytes() == scripted.data
    assert len(scripted.gets()) == 5 and scripted.handler.script == [] and failures == ["HTTP 503 SlowDown"]


def test_an_error_body_in_chunks_is_read_for_its_code(scripted, tmp_path):
    scripted.handler.script[:] = ["chunked"]
    transfer = Transfer(scripted.client(), BUCKET, workers=1)
    try:
        with pytest.raises(TransferError, match=r"GET failed: AccessDenied \(HTTP 403\) for blob"):
            transfer.download(_job(scripted.data), tmp_path / "blob")
    finally:
        transfer.close()


@pytest.mark.parametrize("answer", ["redirect", "no-length"])
def test_an_answer_the_plain_path_does_not_follow_hands_the_gets_to_botocore(scripted, answer, tmp_path):
    """A 301 (the bucket is in another region) or a body of unknown length is botocore's to read: the
    transfer switches to it for good, from where the range stood."""
    scripted.handler.script[:] = [answer]
    transfer = Transfer(scripted.client(), BUCKET, workers=1, part_size=4 * MiB)
    try:
        transfer.download(_job(scripted.data), tmp_path / "blob")
        assert transfer.http is not None and not transfer.http.enabled
    finally:
        transfer.close()
    assert (tmp_path / "blob").read_bytes() == scripted.data
    agents = [agent for _, _, agent in scripted.gets()]
    assert agents[0] == "abc-mirror" and len(agents) == 2 and agents[1].startswith("Boto3/")
