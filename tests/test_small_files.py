"""The selector loop that fetches small files (``etl.transfer.small_files``) against a server that misbehaves
on purpose: keep-alive connections closed while idle, throttling, missing keys, wrong bytes, a GET never
answered, a ``.partial`` another run holds, an interrupt."""

from __future__ import annotations

import fcntl
import hashlib
import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from etl import source
from etl.config import Settings
from etl.transfer import FileJob, Transfer, TransferError

N_FILES = 40


class _Server(http.server.BaseHTTPRequestHandler):
    """Serves ``/bucket/<key>`` from ``objects``; ``tricks[key]`` says how to misbehave for that key: once, or
    always if it starts with "always "."""

    protocol_version = "HTTP/1.1"
    objects: dict[str, bytes] = {}
    tricks: dict[str, str] = {}
    requests: list[tuple[str, int]] = []  # (key, client port)
    lock = threading.Lock()
    release = threading.Event()  # ends the "silent" answer's wait

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        key = self.path.removeprefix("/bucket/")
        with self.lock:
            self.requests.append((key, self.client_address[1]))
            trick = self.tricks.get(key, "")
            if not trick.startswith("always "):
                self.tricks.pop(key, None)
        if key not in self.objects:
            self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")
            return
        if trick == "503":
            self._send(503, b"<Error><Code>SlowDown</Code></Error>")
            return
        if trick.endswith("silent"):
            self.release.wait(30)
            self.close_connection = True
            return
        body = self.objects[key]
        if trick == "wrong":
            body = bytes(len(body))
        self._send(206, body, **{"Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}", "ETag": '"e"'})
        if trick == "close":  # the server drops the connection after this answer, without saying so
            self.close_connection = True


@pytest.fixture
def server(monkeypatch) -> Iterator[str]:
    monkeypatch.setattr("etl.transfer.common.backoff_delay", lambda attempt: 0.0)
    _Server.objects = {f"data/part{i % 3}/f{i:03d}.csv": hashlib.shake_256(str(i).encode()).digest(100 + 37 * i)
                       for i in range(N_FILES)}
    _Server.tricks, _Server.requests = {}, []
    _Server.release.clear()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Server.release.set()
    httpd.shutdown()
    httpd.server_close()


def _transfer(url: str, workers: int = 4, **config: object) -> Transfer:
    client = source.make_client(Settings(endpoint_url=url, source_config=config))
    transfer = Transfer(client, "bucket", workers=workers, retry_seconds=5)
    assert transfer.small_files_in_one_thread
    return transfer


def _jobs(root: Path, keys: list[str] | None = None) -> list[tuple[FileJob, Path]]:
    keys = sorted(_Server.objects) if keys is None else keys
    return [(FileJob(k, len(_Server.objects.get(k, b"x" * 10)), hashlib.md5(_Server.objects.get(k, b"")).hexdigest()),
             root / k) for k in keys]


def _placed(root: Path, keys: list[str]) -> None:
    for key in keys:
        assert (root / key).read_bytes() == _Server.objects[key], key
    assert not list(root.rglob("*.partial*"))


def test_small_files_come_over_few_connections_with_few_syncs(server, tmp_path):
    transfer = _transfer(server, workers=4)
    try:
        results = transfer.download_small(_jobs(tmp_path))
    finally:
        transfer.close()
    assert results == ["e"] * N_FILES
    _placed(tmp_path, sorted(_Server.objects))
    assert len(_Server.requests) == N_FILES
    assert len({port for _, port in _Server.requests}) <= 4  # one thread, four keep-alive connections
    assert transfer.group_sync.syncs == 1


def test_connections_the_server_closed_are_replaced_and_the_get_sent_again(server, tmp_path):
    """A keep-alive connection dropped after its answer (no ``Connection: close``): the next GET on it finds
    it closed, and goes again, once, on a new connection."""
    keys = sorted(_Server.objects)
    _Server.tricks = {key: "close" for key in keys[:12]}
    transfer = _transfer(server, workers=3)
    left: list[str] = []
    one_by_one = transfer._download_one_by_one
    transfer._download_one_by_one = lambda jobs: left.extend(j.key for j, _ in jobs) or one_by_one(jobs)
    try:
        results = transfer.download_small(_jobs(tmp_path))
    finally:
        transfer.close()
    assert results == ["e"] * N_FILES
    _placed(tmp_path, keys)
    assert len({port for _, port in _Server.requests}) > 3  # new connections were made
    assert left == [] and len(_Server.requests) == N_FILES  # by the loop itself, each GET answered once


def test_answers_other_than_the_bytes_go_to_the_blocking_path(server, tmp_path):
    """Throttling is retried (by the blocking path, with its policy); a missing key and wrong bytes fail that file
    alone, naming the problem; nothing of theirs is left on disk."""
    keys = sorted(_Server.objects)
    throttled, wrong = keys[5], keys[9]
    _Server.tricks = {throttled: "503", wrong: "wrong"}
    missing = "data/part0/missing.csv"
    transfer = _transfer(server)
    try:
        results = transfer.download_small(_jobs(tmp_path, [*keys, missing]))
    finally:
        transfer.close()
    outcome = dict(zip([*keys, missing], results, strict=True))
    assert outcome[throttled] == "e" and [k for k, _ in _Server.requests].count(throttled) == 2
    assert isinstance(outcome[wrong], TransferError) and outcome[wrong].retry_file
    assert "differs from the manifest" in str(outcome[wrong])
    assert isinstance(outcome[missing], TransferError) and "NoSuchKey" in str(outcome[missing])
    assert missing in str(outcome[missing])
    good = [k for k in keys if k != wrong]
    assert all(outcome[k] == "e" for k in good)
    assert not (tmp_path / wrong).exists() and not (tmp_path / missing).exists()
    _placed(tmp_path, good)


@pytest.mark.parametrize("trick", ["silent", "always silent"])
def test_a_get_not_answered_is_asked_again_by_the_blocking_path(server, tmp_path, trick):
    """No byte within the read timeout: the loop lets the GET go, and the blocking path asks again, with its
    retry policy; a source that never answers is given up, with an error naming the key."""
    keys = sorted(_Server.objects)[:8]
    silent = keys[3]
    _Server.tricks = {silent: trick}
    transfer = _transfer(server, read_timeout=1, retries={"max_attempts": 2, "mode": "standard"})
    try:
        results = transfer.download_small(_jobs(tmp_path, keys))
    finally:
        transfer.close()
    outcome = dict(zip(keys, results, strict=True))
    if trick == "silent":
        assert outcome[silent] == "e" and [k for k, _ in _Server.requests].count(silent) == 2
        _placed(tmp_path, keys)
    else:
        assert isinstance(outcome[silent], TransferError) and silent in str(outcome[silent])
        # The loop's GET, then the blocking path's attempts (its policy alone: one retry layer).
        attempts = transfer.retry.attempts
        assert f"gave up on {silent} after {attempts} attempts" in str(outcome[silent])
        assert [k for k, _ in _Server.requests].count(silent) == 1 + attempts
        assert not (tmp_path / silent).exists()
        _placed(tmp_path, [k for k in keys if k != silent])


def test_a_partial_another_run_holds_is_waited_for_after_the_others_are_placed(server, tmp_path):
    """The loop holds many .partial locks: it must not wait for another run's, or two runs could wait for each
    other. The file waits for the blocking path, which runs once the loop's own files are placed."""
    keys = sorted(_Server.objects)
    taken = keys[7]
    partial = tmp_path / f"{taken}.partial"
    partial.parent.mkdir(parents=True)
    fd = os.open(partial, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    transfer = _transfer(server)
    results: list = []
    worker = threading.Thread(target=lambda: results.extend(transfer.download_small(_jobs(tmp_path))))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        others = [k for k in keys if k != taken]
        while not all((tmp_path / k).exists() for k in others) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all((tmp_path / k).exists() for k in others)  # placed while the taken one is still locked
        assert worker.is_alive() and not (tmp_path / taken).exists()
    finally:
        os.close(fd)  # the other run gives its .partial up, unfinished
        worker.join(20)
        transfer.close()
    assert results == ["e"] * N_FILES
    _placed(tmp_path, keys)


def test_an_interrupt_stops_the_loop_and_says_so(server, tmp_path):
    transfer = _transfer(server)
    transfer.stopped.set()
    try:
        results = transfer.download_small(_jobs(tmp_path))
    finally:
        transfer.close()
    assert all(isinstance(r, TransferError) and str(r) == "interrupted" for r in results)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_over_a_connection_refused_the_files_get_the_blocking_paths_error(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    transfer = _transfer(f"http://127.0.0.1:{port}", retries={"max_attempts": 2, "mode": "standard"})
    _Server.objects = {"data/a.csv": b"abc"}
    try:
        results = transfer.download_small(_jobs(tmp_path))
    finally:
        transfer.close()
    assert isinstance(results[0], TransferError) and "data/a.csv" in str(results[0])
    assert "Connection refused" in str(results[0]) or "refused" in str(results[0]).lower()
